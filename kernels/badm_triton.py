r"""Triton kernels of the fused BADM step over tensor lists (the ``triton`` back end).

:func:`badm_step` computes :func:`badm_fast.reference.fused_step_` (the kernel contract) for any
number of tensors in ONE launch of :func:`_badm_step_kernel` (a multi-tensor apply), plus one
launch of a single-program reduction when residuals are requested.

Work table. Every call is described by one int64 device tensor (see :func:`_build_table`):

* one *chunk* entry per program, ``(record offset, chunk start)``: the chunk covers elements
  ``[start, start + BLOCK)`` of one tensor (chunk starts are multiples of ``BLOCK``);
* one *record* per item (a parameter whose gradient is not None and which has elements),
  ``(numel, aligned, z, g_0 .. g_{R-1}, d_0 .. d_{R-1})``: the data pointers of the parameter,
  of each row's gradient and of each row's dual, as integers; ``aligned`` is 1 when all of
  them are 16-byte aligned.

A program loads its chunk entry and record, converts each pointer with
``.to(tl.pointer_type(...))`` (the element types come from typed pointer arguments) and treats
every tensor as ``numel`` consecutive elements in memory order (the contract requires params,
grads and duals of an item to share shape and strides and to be non-overlapping and dense).
Full chunks of aligned items take an unmasked path with alignment and contiguity hints
(16-byte vector accesses); the tail chunk of each tensor and unaligned items take the masked
path. The table depends only on the data pointers, the element counts, the number of rows and
the block size, so it is cached under exactly that key (:data:`_TABLE_CACHE`): a repeated call
on the same tensors reuses it without any host-to-device copy, and a table found for reused
memory is still exact.

Per element, in the compute dtype (fp64 for fp64 storage, else fp32), each operation rounded
as written (compiled with ``enable_fp_fusion=False``): [decay: ``wz = wd*z``]; ``delta = 0``;
per row: ``g = G_r [* inv_scale]``; [maximize: ``g = g*sign``]; [decay: ``g = g + wz``];
``pi' = a*pi - b*g; t = c*g + d*pi; delta = delta + alpha_r*t``
[``l = (g + pi)*e; prim = prim + (alpha_r*l)*l``]; then ``z' = z + delta`` rounded to nearest
even to the storage dtype. The constants are derived on the device from the ``(4,)`` float64
``hyper`` tensor in float64, in the order of :func:`badm_fast.reference.step_constants`, then
rounded once to the compute dtype; ``decay`` (``weight_decay != 0``) and ``maximize``
(``maximize != 0``) are :func:`badm_fast.reference.step_switches`, read with the constants and
taken as uniform runtime branches of the program (the bracketed operations are skipped when
false). Every hyperparameter is a runtime value (changing them never recompiles).

Residuals: each program stores its two float64 partial sums to row ``pid`` of a
``(programs, 2)`` buffer (no atomics); :func:`_residual_reduce_kernel` (one program) adds them
in a fixed order to ``residuals``, so the bits are the same run to run.

``found_inf``: the flag is loaded together with the data, and when it is non-zero every store
is masked off (params, duals) and the partial sums are stored as zeros: nothing changes.

This module imports triton at import time; :mod:`badm_fast.kernels` imports it lazily. On CPU
tensors the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before
this module is imported), which dereferences the table's pointers on the host.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

__all__ = [
    "badm_step",
    "badm_nonfinite_check",
    "badm_copy_check",
    "INTERPRETED",
    "default_launch_config",
    "clear_table_cache",
]

# Launch configuration of a memory-bound streaming kernel on Hopper-class GPUs: 8 elements
# per thread per row for 4-byte arithmetic (two 16-byte fp32 vector accesses per row), 4 for
# fp64. Not yet measured on a GPU: `block_size=`/`num_warps=` of badm_step override them, and
# bench/gpu_check.py times the defaults against a device-to-device copy.
_BLOCK = 2048
_BLOCK_FP64 = 1024
_NUM_WARPS = 8
# The non-finite scan and the checked copy: a pure read (and one write) per element.
_CHECK_BLOCK = 4096
# The residual reduction: one program, this many partial rows per iteration.
_REDUCE_BLOCK = 1024
# The alignment (bytes) under which an item takes the vectorised path.
_ALIGN = 16
# Full chunks: the contiguity hint caps every access at 4 elements, i.e. 16-byte vectors for
# fp32 (duals, fp32 rows), 8-byte ones for bf16/fp16 rows and two 16-byte ones for fp64, all in
# one register layout (no layout conversion through shared memory between the 2-byte rows and
# the fp32 duals). Tail chunks (one per tensor, and the chunks of unaligned items) use masked
# scalar accesses; their stores take another layout than their loads, converted through
# shared memory (ptxas for sm_90: 4 KiB per program, 8 KiB for fp64), which costs nothing on
# full chunks and does not limit occupancy at 8 warps per program.
_CONTIGUITY = tl.constexpr(4)
# Other chunks are swept in masked blocks of BLOCK // _TAIL_SPLIT elements (one element per
# thread per row at the default launch configuration).
_TAIL_SPLIT = tl.constexpr(8)

_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------


@triton.jit
def _to_storage(x, dt: tl.constexpr):
    """``x`` (fp32 or fp64) rounded to nearest even to the storage dtype ``dt``.

    bf16 is rounded on the bits (add ``0x7FFF`` plus the lowest kept bit, keep the high half;
    NaN stays a quiet NaN of the same sign): the exact RNE of the GPU's conversion instruction,
    and the same in the interpreter, whose own fp32-to-bf16 conversion truncates.
    """
    if dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = ((bits >> 16) & 0x8000) | 0x7FC0
        out = tl.where(x != x, quiet_nan, rounded)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dt)


@triton.jit
def _ptrs(tab_ptr, index, start, dt: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr, VEC: tl.constexpr):
    """The ``BLOCK`` element pointers ``base + start + arange(BLOCK)`` of the data pointer stored at
    ``tab_ptr[index]`` (as a pointer to ``dt``). Full chunks: the base is hinted 16-byte aligned
    (the host checked it) and the offsets contiguous in runs of ``VEC`` (``start`` carries its
    multiple-of-BLOCK hint from the kernel). Hints attach to values defined in the function
    that applies them, not to its arguments, hence this helper."""
    base = tl.load(tab_ptr + index).to(tl.pointer_type(dt))
    if FULL:
        return tl.multiple_of(base, 16) + start + tl.max_contiguous(tl.arange(0, BLOCK), VEC)
    else:
        return base + start + tl.arange(0, BLOCK)


@triton.jit
def _step_block(
    tab_ptr,
    rec,
    start,
    numel,
    R,
    w_ptr,
    a,
    b,
    c,
    d,
    e,
    wd,
    sign,
    decay,
    neg,
    inv,
    flag,
    zdt: tl.constexpr,
    cdt: tl.constexpr,
    HAS_RESIDUALS: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    SIZE: tl.constexpr,
    FULL: tl.constexpr,
):
    """Elements ``[start, start + SIZE)`` of one item: unmasked with vector hints when ``FULL``
    (all inside the tensor, every pointer of the item 16-byte aligned), masked otherwise.
    ``decay`` / ``neg``: whether to add ``wd*z`` / multiply by ``sign`` (scalar branches, the same
    for the whole program). Returns the block's float64 residual sums (zeros without residuals)."""
    if HAS_FOUND_INF:
        # The flag as a block (a splat; the interpreter mishandles broadcasting a scalar
        # comparison result).
        ok = (tl.zeros([SIZE], dtype=tl.float32) + flag) == 0.0
    if FULL:
        mask = None
        other = None
        if HAS_FOUND_INF:
            store_mask = ok
        else:
            store_mask = None
    else:
        mask = tl.arange(0, SIZE) < numel - start
        other = 0.0
        if HAS_FOUND_INF:
            store_mask = mask & ok
        else:
            store_mask = mask
    zp = _ptrs(tab_ptr, rec + 2, start, zdt, SIZE, FULL, _CONTIGUITY)
    z = tl.load(zp, mask=mask, other=other).to(cdt)
    wz = z  # only read under `decay`
    if decay:
        wz = wd * z
    delta = tl.zeros([SIZE], dtype=cdt)
    prim = tl.zeros([SIZE], dtype=cdt)
    for r in range(0, R):
        gp = _ptrs(tab_ptr, rec + 3 + r, start, zdt, SIZE, FULL, _CONTIGUITY)
        dp = _ptrs(tab_ptr, rec + 3 + R + r, start, cdt, SIZE, FULL, _CONTIGUITY)
        alpha = tl.load(w_ptr + r)
        g = tl.load(gp, mask=mask, other=other, eviction_policy="evict_first").to(cdt)
        p = tl.load(dp, mask=mask, other=other, eviction_policy="evict_first")
        if HAS_INV_SCALE:
            g = g * inv
        if neg:
            g = g * sign
        if decay:
            g = g + wz
        new_p = a * p - b * g
        t = c * g + d * p
        delta = delta + alpha * t
        if HAS_RESIDUALS:
            local = (g + p) * e
            prim = prim + (alpha * local) * local
        tl.store(dp, new_p, mask=store_mask)
    tl.store(zp, _to_storage(z + delta, zdt), mask=store_mask)
    if HAS_RESIDUALS:
        dd = delta * delta
        if not FULL:  # masked lanes add nothing whatever the constants
            prim = tl.where(mask, prim, 0.0)
            dd = tl.where(mask, dd, 0.0)
        return tl.sum(prim.to(tl.float64), axis=0), tl.sum(dd.to(tl.float64), axis=0)
    else:
        return tl.zeros([], dtype=tl.float64), tl.zeros([], dtype=tl.float64)


@triton.jit
def _badm_step_kernel(
    tab_ptr,
    z_like_ptr,
    w_ptr,
    hyper_ptr,
    part_ptr,
    found_ptr,
    inv_scale_ptr,
    R,
    HAS_RESIDUALS: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per chunk of the table ``tab_ptr`` (see the module docstring).

    ``z_like_ptr`` gives the storage dtype (never read), ``w_ptr`` (the ``(R,)`` weights) the
    compute dtype. A full chunk of an aligned item is one unmasked ``BLOCK`` block; any other
    chunk is swept in masked blocks of ``BLOCK // _TAIL_SPLIT`` elements, only as many as it
    has elements (few registers for the masked path, little work for a small tensor).
    """
    zdt = z_like_ptr.dtype.element_ty
    cdt = w_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    rec = tl.load(tab_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(tab_ptr + 2 * pid + 1), BLOCK)  # chunk starts are multiples of BLOCK
    numel = tl.load(tab_ptr + rec)
    aligned = tl.load(tab_ptr + rec + 1)
    # Constants in float64, in the order of reference.step_constants, rounded once to cdt.
    lr = tl.load(hyper_ptr)
    mu = tl.load(hyper_ptr + 1)
    weight_decay = tl.load(hyper_ptr + 2)
    maximize = tl.load(hyper_ptr + 3)
    one_minus = 1.0 - mu
    two_mu_minus_one = 2.0 * mu - 1.0
    a = mu.to(cdt)
    b = one_minus.to(cdt)
    c = (-2.0 * lr).to(cdt)
    d = ((lr * two_mu_minus_one) / one_minus).to(cdt)
    e = lr.to(cdt)
    wd = weight_decay.to(cdt)
    sign = (1.0 - 2.0 * maximize).to(cdt)
    decay = weight_decay != 0.0  # reference.step_switches
    neg = maximize != 0.0
    if HAS_INV_SCALE:
        inv = tl.load(inv_scale_ptr).to(cdt)
    else:
        inv = 1.0
    if HAS_FOUND_INF:
        # Only the stores wait for the flag; the data loads are issued regardless.
        flag = tl.load(found_ptr)
    else:
        flag = 0.0
    if (aligned != 0) & (start + BLOCK <= numel):
        prim_sum, dual_sum = _step_block(
            tab_ptr, rec, start, numel, R, w_ptr, a, b, c, d, e, wd, sign, decay, neg, inv, flag,
            zdt, cdt, HAS_RESIDUALS, HAS_FOUND_INF, HAS_INV_SCALE, BLOCK, True,
        )  # fmt: skip
    else:
        SUB: tl.constexpr = BLOCK // _TAIL_SPLIT
        prim_sum = tl.zeros([], dtype=tl.float64)
        dual_sum = tl.zeros([], dtype=tl.float64)
        for sub in range(0, tl.minimum(numel - start, BLOCK), SUB):
            ps, ds = _step_block(
                tab_ptr, rec, start + sub, numel, R, w_ptr, a, b, c, d, e, wd, sign, decay, neg, inv, flag,
                zdt, cdt, HAS_RESIDUALS, HAS_FOUND_INF, HAS_INV_SCALE, SUB, False,
            )  # fmt: skip
            prim_sum = prim_sum + ps
            dual_sum = dual_sum + ds
    if HAS_RESIDUALS:
        if HAS_FOUND_INF:
            prim_sum = tl.where(flag == 0.0, prim_sum, 0.0)
            dual_sum = tl.where(flag == 0.0, dual_sum, 0.0)
        tl.store(part_ptr + 2 * pid, prim_sum)
        tl.store(part_ptr + 2 * pid + 1, dual_sum)


@triton.jit
def _residual_reduce_kernel(part_ptr, n, res_ptr, res_stride, RBLOCK: tl.constexpr):
    """``res[0] += sum(part[:, 0]); res[res_stride] += sum(part[:, 1])`` in one program: the
    partial rows are added to ``RBLOCK`` accumulators in row order, then tree-summed; a fixed
    order, so the bits do not depend on the schedule of the step kernel's programs."""
    offs = tl.arange(0, RBLOCK).to(tl.int64)
    acc0 = tl.zeros([RBLOCK], dtype=tl.float64)
    acc1 = tl.zeros([RBLOCK], dtype=tl.float64)
    for i in range(0, n, RBLOCK):
        rows = i + offs
        m = rows < n
        acc0 = acc0 + tl.load(part_ptr + 2 * rows, mask=m, other=0.0)
        acc1 = acc1 + tl.load(part_ptr + 2 * rows + 1, mask=m, other=0.0)
    tl.store(res_ptr, tl.load(res_ptr) + tl.sum(acc0, axis=0))
    tl.store(res_ptr + res_stride, tl.load(res_ptr + res_stride) + tl.sum(acc1, axis=0))


@triton.jit
def _flag_nonfinite(x, mask, found_ptr, dt: tl.constexpr):
    """Raise ``*found_ptr`` to 1 when a lane of ``x`` (under ``mask``) is a NaN or an infinity.
    Programs that find one store the same value (no atomics); the flag is never lowered, and a
    NaN flag stays (the reference's ``maximum``)."""
    if dt != tl.float64:  # fp64 stays fp64: a value above 3.4e38 is finite
        x = x.to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    if mask is not None:
        bad = bad & mask
    if tl.sum(bad.to(tl.int32), axis=0) > 0:
        old = tl.load(found_ptr)
        tl.store(found_ptr, 1.0, mask=old < 1.0)


@triton.jit
def _copy_block(
    tab_ptr,
    rec,
    start,
    numel,
    found_ptr,
    dt: tl.constexpr,
    COPY: tl.constexpr,
    CHECK: tl.constexpr,
    SIZE: tl.constexpr,
    FULL: tl.constexpr,
):
    """Elements ``[start, start + SIZE)`` of one record ``(numel, aligned, x[, src])``: read
    ``x`` (``COPY``: read ``src`` and store it to ``x``) and, when ``CHECK``, raise the flag on a
    non-finite value. Unmasked with vector hints when ``FULL``, masked otherwise. One dtype:
    no contiguity cap (Triton's own 16-byte vector limit applies)."""
    if FULL:
        mask = None
        other = None
    else:
        mask = tl.arange(0, SIZE) < numel - start
        other = 0.0
    xp = _ptrs(tab_ptr, rec + 2, start, dt, SIZE, FULL, SIZE)
    if COPY:
        src = _ptrs(tab_ptr, rec + 3, start, dt, SIZE, FULL, SIZE)
        x = tl.load(src, mask=mask, other=other, eviction_policy="evict_first")
        tl.store(xp, x, mask=mask)
    else:
        x = tl.load(xp, mask=mask, other=other, eviction_policy="evict_first")
    if CHECK:
        _flag_nonfinite(x, mask, found_ptr, dt)


@triton.jit
def _copy_check_program(
    tab_ptr, found_ptr, dt: tl.constexpr, COPY: tl.constexpr, CHECK: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    rec = tl.load(tab_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(tab_ptr + 2 * pid + 1), BLOCK)  # chunk starts are multiples of BLOCK
    numel = tl.load(tab_ptr + rec)
    aligned = tl.load(tab_ptr + rec + 1)
    if (aligned != 0) & (start + BLOCK <= numel):
        _copy_block(tab_ptr, rec, start, numel, found_ptr, dt, COPY, CHECK, BLOCK, True)
    else:
        SUB: tl.constexpr = BLOCK // _TAIL_SPLIT
        for sub in range(0, tl.minimum(numel - start, BLOCK), SUB):
            _copy_block(tab_ptr, rec, start + sub, numel, found_ptr, dt, COPY, CHECK, SUB, False)


@triton.jit
def _badm_nonfinite_kernel(tab_ptr, like_ptr, found_ptr, BLOCK: tl.constexpr):
    """Read-only scan of the tensors of the table (records ``(numel, aligned, ptr)``);
    ``like_ptr`` gives the dtype (never read)."""
    _copy_check_program(tab_ptr, found_ptr, like_ptr.dtype.element_ty, False, True, BLOCK)


@triton.jit
def _badm_copy_kernel(tab_ptr, like_ptr, found_ptr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """``dst <- src`` over the table (records ``(numel, aligned, dst, src)``), raising the flag
    on a non-finite value in the same read when ``HAS_FOUND_INF``; ``like_ptr`` gives the dtype."""
    _copy_check_program(tab_ptr, found_ptr, like_ptr.dtype.element_ty, True, HAS_FOUND_INF, BLOCK)


INTERPRETED = not isinstance(_badm_step_kernel, triton.runtime.JITFunction)


# --------------------------------------------------------------------------------------------
# Host code
# --------------------------------------------------------------------------------------------


def default_launch_config(dtype: torch.dtype) -> tuple[int, int]:
    """``(block_size, num_warps)`` of the step kernel for storage ``dtype`` when none is given."""
    return (_BLOCK_FP64 if dtype == torch.float64 else _BLOCK), _NUM_WARPS


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Work tables by (kind, device, block, rows, per-item ints); least recently used dropped first.
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 32


def clear_table_cache() -> None:
    """Drop every cached work table (their device memory is freed)."""
    _TABLE_CACHE.clear()


def _build_table(items, width, block, device):
    """The int64 work table of ``items`` (each ``(numel, ptr, ptr, ...)`` with ``width - 2``
    pointers): chunk entries ``(record offset, start)``, then records ``(numel, aligned, ptrs)``.
    Returns ``(table, programs, stream)``: the stream the table was allocated on (CUDA)."""
    chunks = []
    records = []
    n_chunks = sum(-(-it[0] // block) for it in items)
    base = 2 * n_chunks
    for k, it in enumerate(items):
        numel = it[0]
        rec = base + k * width
        aligned = int(all(p % _ALIGN == 0 for p in it[1:]))
        records.extend((numel, aligned))
        records.extend(it[1:])
        for start in range(0, numel, block):
            chunks.extend((rec, start))
    table = torch.tensor(chunks + records, dtype=torch.int64)
    stream = None
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        table = table.to(device)
    return table, n_chunks, stream


def _table(kind, items, width, block, device):
    """The cached work table of ``items`` (see :func:`_build_table`): the table holds nothing
    but these integers, so the key is exact. Returns ``(table, programs)``."""
    key = (kind, device, block, width, tuple(items))
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        hit = _build_table(items, width, block, device)
        _TABLE_CACHE[key] = hit
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
        if hit[2] is not None:
            stream = torch.cuda.current_stream(device)
            if stream != hit[2]:  # read on another stream: not reused before that stream is done with it
                hit[0].record_stream(stream)
    return hit[0], hit[1]


def _check_device_usable(device):
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton back end got CPU tensors but Triton is not in interpreter mode; "
            "set TRITON_INTERPRET=1 before badm_fast.kernels is first used, or use CUDA tensors"
        )
    if device.type != "cpu" and INTERPRETED:
        raise RuntimeError(
            "the Triton interpreter (TRITON_INTERPRET=1) runs the tensor-list kernels on CPU tensors only, "
            f"got {device}"
        )


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension with more than one element."""
    if t.shape != ref.shape:
        return False
    return all(a == b for a, b, n in zip(t.stride(), ref.stride(), ref.shape) if n > 1)


def _check_block(name, value, default, lo=16):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {lo}, got {value!r}")
    return value


def _check_warps(value, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 32 or value & (value - 1):
        raise ValueError(f"num_warps must be a power of two in [1, 32], got {value!r}")
    return value


def _check_flag(name, t, device):
    """``found_inf`` / ``inv_scale``: None or a one-element float32 tensor on ``device``."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32 or t.device != device:
        got = f"shape {tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a one-element float32 tensor on {device}, got {got}")
    return t


def _describe(t):
    return f"shape {tuple(t.shape)} strides {t.stride()} {t.dtype} on {t.device}"


def _validate_step(params, grads, duals, weights, hyper, residuals):
    """Check the whole call (nothing is launched before); returns ``(rows, dtype, device, items)``
    with ``items[k] = (numel, z, g_0 .. g_{R-1}, d_0 .. d_{R-1})`` (data pointers) for every item
    that the step changes."""
    n = len(params)
    if n == 0:
        return 0, None, None, []
    for i, z in enumerate(params):
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"params[{i}] is a {type(z).__name__}, expected a tensor")
    z0 = params[0]
    dtype, device = z0.dtype, z0.device
    if dtype not in _SUPPORTED:
        raise ValueError(f"params have dtype {dtype}; supported: float32, float64, bfloat16, float16")
    cdt = _compute_dtype(dtype)
    if len(grads) == 0 or len(grads) % n != 0:
        raise ValueError(f"grads must hold R*N tensors (R >= 1 rows of N = {n}), got {len(grads)}")
    rows = len(grads) // n
    if len(duals) != rows * n:
        raise ValueError(f"duals must hold R*N = {rows * n} tensors like grads, got {len(duals)}")
    for name, t, shape, dt in (("weights", weights, (rows,), cdt), ("hyper", hyper, (4,), torch.float64)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dt or t.device != device:
            got = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a {shape} {dt} tensor on {device}, got {got}")
    if residuals is not None:
        if (
            not isinstance(residuals, torch.Tensor)
            or tuple(residuals.shape) != (2,)
            or residuals.dtype != torch.float64
            or residuals.device != device
            or residuals.stride(0) == 0
        ):
            got = _describe(residuals) if isinstance(residuals, torch.Tensor) else type(residuals).__name__
            raise ValueError(f"residuals must be a (2,) float64 tensor on {device} with a non-zero stride, got {got}")
    items = []
    for i, z in enumerate(params):
        if z.dtype != dtype or z.device != device:
            raise ValueError(f"params[{i}] is {z.dtype} on {z.device}; params[0] is {dtype} on {device}")
        if grads[i] is None or z.numel() == 0:
            continue
        if not z.is_contiguous() and not _dense(z):
            raise ValueError(f"params[{i}] is not non-overlapping and dense ({_describe(z)})")
        shape, strides = z.shape, z.stride()
        ptrs = [z.numel(), z.data_ptr()]
        for k in range(i, rows * n, n):  # the gradient rows of item i, then its dual rows
            g = grads[k]
            try:  # the common case in one expression; anything else is decided by _row_error
                ok = g.dtype == dtype and g.shape == shape and g.stride() == strides and g.device == device
            except AttributeError:
                ok = False
            if not ok:
                _row_error("grads", k, g, z, i, n, dtype, device)
            ptrs.append(g.data_ptr())
        for k in range(i, rows * n, n):
            p = duals[k]
            try:
                ok = p.dtype == cdt and p.shape == shape and p.stride() == strides and p.device == device
            except AttributeError:
                ok = False
            if not ok:
                _row_error("duals", k, p, z, i, n, cdt, device)
            ptrs.append(p.data_ptr())
        items.append(tuple(ptrs))
    return rows, dtype, device, items


def _row_error(name, k, t, z, i, n, dtype, device):
    """Raise the ValueError of ``grads[k]`` / ``duals[k]`` (row ``k // n`` of item ``i``), or
    return when it is acceptable after all (strides that differ only on one-element dimensions)."""
    if not isinstance(t, torch.Tensor):
        if name == "grads":
            raise ValueError(f"grads[{k}] (row {k // n} of item {i}) is {type(t).__name__} but grads[{i}] is a tensor")
        raise ValueError(f"duals[{k}] (row {k // n} of item {i}) is a {type(t).__name__}, expected a tensor")
    if t.dtype == dtype and t.device == device and _same_layout(t, z):
        return
    if name == "grads":
        raise ValueError(
            f"grads[{k}] must match params[{i}] ({_describe(z)}) in dtype, shape and strides, got {_describe(t)}"
        )
    raise ValueError(
        f"duals[{k}] must be {dtype} with the shape and strides of params[{i}] ({_describe(z)}), got {_describe(t)}"
    )


def _launch(kernel, grid, device, *args, **kwargs):
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def badm_step(
    params,
    grads,
    duals,
    weights,
    hyper,
    residuals=None,
    *,
    found_inf=None,
    inv_scale=None,
    block_size=None,
    num_warps=None,
):
    r"""One fused BADM step over tensor lists, in place on ``params`` and ``duals``: the
    contract of :func:`badm_fast.reference.fused_step_`, in one launch of the step kernel
    whatever the number of tensors (plus one single-program launch for the residuals).

    Args:
        params: ``N`` tensors of one dtype (float32, float64, bfloat16, float16) on one device,
            each non-overlapping and dense.
        grads: ``R*N`` tensors or None; ``grads[r*N + i]`` (row ``r`` of item ``i``) has the
            dtype, shape and strides of ``params[i]``. Item ``i`` is skipped when ``grads[i]``
            is None.
        duals: ``R*N`` tensors in the compute dtype (float64 for float64 params, else float32)
            with the shape and strides of their parameter; updated in place.
        weights: ``(R,)`` sub-batch weights in the compute dtype.
        hyper: ``(4,)`` float64 ``[lr, momentum, weight_decay, maximize]``, read on the device.
        residuals: optional ``(2,)`` float64; the two sums of this call are added to it.
        found_inf: optional one-element float32; when non-zero nothing changes.
        inv_scale: optional one-element float32; every gradient is multiplied by it first.
        block_size: elements per program, a power of two >= 16 (default:
            :func:`default_launch_config`).
        num_warps: warps per program (default: :func:`default_launch_config`).

    Raises:
        ValueError: an argument breaks the contract (nothing is changed).
        RuntimeError: CPU tensors without the interpreter, or GPU tensors under it.
    """
    params = list(params)
    grads = list(grads)
    duals = list(duals)
    rows, dtype, device, items = _validate_step(params, grads, duals, weights, hyper, residuals)
    if device is None:
        return
    found_inf = _check_flag("found_inf", found_inf, device)
    inv_scale = _check_flag("inv_scale", inv_scale, device)
    block, warps = default_launch_config(dtype)
    block = _check_block("block_size", block_size, block)
    warps = _check_warps(num_warps, warps)
    _check_device_usable(device)
    if not items:
        return
    table, programs = _table("step", items, 3 + 2 * rows, block, device)
    part = torch.empty((programs, 2), dtype=torch.float64, device=device) if residuals is not None else table
    dummy = hyper
    _launch(
        _badm_step_kernel,
        (programs,),
        device,
        table,
        params[0],
        weights.contiguous(),
        hyper.contiguous(),
        part,
        found_inf if found_inf is not None else dummy,
        inv_scale if inv_scale is not None else dummy,
        rows,
        HAS_RESIDUALS=residuals is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_INV_SCALE=inv_scale is not None,
        BLOCK=block,
        num_warps=warps,
        # Each operation rounded as written, like the reference (and independent of Triton's
        # default, see TRITON_DEFAULT_FP_FUSION).
        enable_fp_fusion=False,
    )
    if residuals is not None:
        _launch(
            _residual_reduce_kernel,
            (1,),
            device,
            part,
            programs,
            residuals,
            residuals.stride(0),
            RBLOCK=_REDUCE_BLOCK,
            num_warps=4,
        )


def badm_nonfinite_check(tensors, found_inf, *, block_size=None):
    """Set ``found_inf`` to 1 when any tensor holds a NaN or an infinity (the contract of
    :func:`badm_fast.reference.nonfinite_check_`): never lowered, None entries skipped, no host
    synchronisation. One launch per distinct dtype among the tensors; a tensor that is not
    dense is scanned from a contiguous copy.

    Args:
        tensors: tensors (float32, float64, bfloat16, float16) or None, on ``found_inf``'s device.
        found_inf: one-element float32 tensor.
        block_size: elements per program, a power of two >= 16 (default 4096).
    """
    if not isinstance(found_inf, torch.Tensor):
        raise ValueError(f"found_inf must be a one-element float32 tensor, got {type(found_inf).__name__}")
    device = found_inf.device
    _check_flag("found_inf", found_inf, device)
    block = _check_block("block_size", block_size, _CHECK_BLOCK)
    scanned = []
    for k, t in enumerate(tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{k}] is a {type(t).__name__}, expected a tensor or None")
        if t.dtype not in _SUPPORTED:
            raise ValueError(f"tensors[{k}] has dtype {t.dtype}; supported: float32, float64, bfloat16, float16")
        if t.device != device:
            raise ValueError(f"tensors[{k}] is on {t.device}, found_inf on {device}")
        if t.numel() > 0:
            scanned.append(t)
    _check_device_usable(device)
    copies = []  # contiguous copies of the tensors that are not dense, alive until the launches
    groups: dict = {}
    for t in scanned:
        if not _dense(t):
            t = t.contiguous()
            copies.append(t)
        groups.setdefault(t.dtype, ([], t))[0].append((t.numel(), t.data_ptr()))
    for items, like in groups.values():
        if copies:  # pointers of temporaries: not worth a cache entry
            table, programs, _ = _build_table(items, 3, block, device)
        else:
            table, programs = _table("check", items, 3, block, device)
        _launch(_badm_nonfinite_kernel, (programs,), device, table, like, found_inf, BLOCK=block, num_warps=_NUM_WARPS)


def badm_copy_check(dst, src, found_inf=None, *, block_size=None):
    """``dst[i].copy_(src[i])`` for every non-None ``src[i]`` and, when ``found_inf`` is given,
    raise it when a copied value is a NaN or an infinity, in the same read (the contract of
    :func:`badm_fast.reference.copy_check_`).

    Pairs of one dtype with the same shape and strides, dense, are copied by the Triton kernel
    :func:`_badm_copy_kernel` (one launch per dtype); any other pair (dtype conversion,
    broadcasting, other layouts) by ``torch.Tensor.copy_`` followed by the non-finite scan of
    its destination.

    Args:
        dst: tensors, written in place.
        src: tensors or None, as many as ``dst``.
        found_inf: optional one-element float32 tensor on the tensors' device.
        block_size: elements per program, a power of two >= 16 (default 4096).
    """
    dst, src = list(dst), list(src)
    if len(dst) != len(src):
        raise ValueError(f"dst and src must have the same length, got {len(dst)} and {len(src)}")
    block = _check_block("block_size", block_size, _CHECK_BLOCK)
    device = None
    groups: dict = {}
    others = []
    for k, (d, s) in enumerate(zip(dst, src)):
        if s is None:
            continue
        if not isinstance(d, torch.Tensor) or not isinstance(s, torch.Tensor):
            raise ValueError(f"dst[{k}] and src[{k}] must be tensors (src may be None)")
        if device is None:
            device = d.device
        if d.device != device or s.device != device:
            raise ValueError(f"dst[{k}] is on {d.device} and src[{k}] on {s.device}; expected {device}")
        try:
            broadcast_ok = torch.broadcast_shapes(s.shape, d.shape) == d.shape
        except RuntimeError:
            broadcast_ok = False
        if not broadcast_ok:
            raise ValueError(
                f"src[{k}] of shape {tuple(s.shape)} cannot be copied into dst[{k}] of shape {tuple(d.shape)}"
            )
        if d.numel() == 0:
            continue
        if d.dtype == s.dtype and d.dtype in _SUPPORTED and _same_layout(s, d) and _dense(d):
            groups.setdefault(d.dtype, ([], d))[0].append((d.numel(), d.data_ptr(), s.data_ptr()))
        else:
            others.append((d, s))
    if device is None:
        return
    if found_inf is not None:
        _check_flag("found_inf", found_inf, device)
    _check_device_usable(device)
    for d, s in others:
        d.copy_(s)
    for dt, (items, like) in groups.items():
        table, programs = _table("copy", items, 4, block, device)
        _launch(
            _badm_copy_kernel,
            (programs,),
            device,
            table,
            like,
            found_inf if found_inf is not None else like,
            HAS_FOUND_INF=found_inf is not None,
            BLOCK=block,
            num_warps=_NUM_WARPS,
        )
    if found_inf is not None and others:
        badm_nonfinite_check([d for d, _ in others], found_inf, block_size=block)
