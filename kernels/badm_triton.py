r"""Triton kernel of the fused BADM step (the ``triton`` back end).

One program owns ``BLOCK`` consecutive elements of the flat buffer and loops over the ``S``
sub-batch rows: it reads ``z`` once, every gradient row and every dual row once, writes every
dual row once and ``z`` once, i.e. the (3S + 2) values per element of docs/algorithm.md. Per
element (fp32 arithmetic, fp64 for fp64 storage; :math:`\pi_s` is the old dual):

.. math::
    c &= 1 / (\rho + \sigma) \\
    \pi_s' &= (\rho \pi_s - \sigma g_s)\, c \\
    z' &= z + \textstyle\sum_s \alpha_s \big[-2 g_s c + (\rho - \sigma) \pi_s\, c / \sigma\big]

Hyperparameters and weights are runtime values: ``rho``/``sigma`` arrive as scalar arguments
(each an fp32 pair ``hi + lo`` rebuilt in fp64, see :func:`_split_double`) or are loaded from
one-element device tensors (the capture-safe form) and ``alpha_s`` is read from the
weights tensor, so changing any of them never recompiles. Offsets are 64-bit.

Mixed precision and skipped steps without a host synchronisation: with ``found_inf`` and
``inv_scale`` (one-element fp32 device tensors, e.g. from ``torch.amp.GradScaler``) every
program first reads the flag and returns without touching anything when it is non-zero, and
otherwise multiplies every gradient by ``inv_scale`` in the same pass (the unscale costs no
extra traffic). :func:`badm_nonfinite_check` is the read-only scan that raises the flag when
any gradient row holds a NaN or an infinity; it runs over every buffer before the first step
kernel so that a step is skipped as a whole.

This module imports triton at import time; :mod:`badm_fast.kernels` imports it lazily so that
``import badm_fast`` works without triton. On CPU tensors the kernel runs only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
"""

import struct

import torch
import triton
import triton.language as tl

__all__ = ["badm_step", "badm_nonfinite_check", "INTERPRETED", "default_launch_config"]

# Launch configuration of a memory-bound streaming kernel on Hopper-class GPUs: 8 elements
# per thread per row for 4-byte arithmetic (two 16-byte fp32 vector accesses per row), 4 for
# fp64. Register use reported by ptxas for sm_90a with residuals on (no spills anywhere):
#   fp32  BLOCK 2048 / 8 warps:  57 regs -> 4 programs (32 warps) per SM, 64 KiB of g+d in flight
#   fp32  BLOCK 4096 / 8 warps: 126 regs -> 2 programs per SM (16 elements per thread)
#   fp64  BLOCK 1024 / 8 warps:  72 regs;  BLOCK 2048 / 8 warps: 128 regs
# so 8 elements per thread keeps half occupancy with the same bytes in flight. Throughput of
# the alternatives is measured by the block-size sweep of bench/gpu_check.py.
_BLOCK = 2048
_BLOCK_FP64 = 1024
_NUM_WARPS = 8
# The contiguity hint caps every access at 4 elements: 16-byte vectors for the fp32 duals and
# fp32 rows, 8-byte ones for bf16/fp16 rows, all in one register layout. Without it Triton
# gives the 2-byte rows 8 elements per thread and converts every fp32 dual store to the other
# layout through shared memory (ptxas, sm_90a, BLOCK 2048: 8 KiB of shared memory per program).
_CONTIGUITY = 4

_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@triton.jit
def _badm_element(g, p, rho, sigma, c, c_over_sigma):
    """Fused BADM terms of one sub-batch, as in docs/algorithm.md (``c = 1/(rho+sigma)``).

    Returns ``(new_dual, z_term)``; ``z' = z + sum_s alpha_s * z_term_s``.
    """
    new_dual = (rho * p - sigma * g) * c
    z_term = -2.0 * g * c + (rho - sigma) * p * c_over_sigma
    return new_dual, z_term


@triton.jit
def _badm_step_kernel(
    z_ptr,
    g_ptr,
    d_ptr,
    w_ptr,
    res_ptr,
    rho_ptr,
    sigma_ptr,
    found_ptr,
    inv_scale_ptr,
    rho_hi,
    rho_lo,
    sigma_hi,
    sigma_lo,
    P: tl.int64,
    S: tl.int32,
    stride_g: tl.int64,
    stride_d: tl.int64,
    RHO_FROM_PTR: tl.constexpr,
    SIGMA_FROM_PTR: tl.constexpr,
    HAS_RESIDUALS: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    CONTIGUITY: tl.constexpr,
):
    # Arithmetic dtype = dual dtype (fp64 for fp64 storage, else fp32).
    cdt = d_ptr.dtype.element_ty
    if HAS_FOUND_INF:
        # A skipped step (non-finite gradient somewhere, or GradScaler's found_inf): every
        # program returns before reading or writing anything.
        if tl.load(found_ptr) != 0.0:
            return
    # rho and sigma in fp64: from the device tensors, or rebuilt from their fp32 (hi, lo) split.
    if RHO_FROM_PTR:
        rho = tl.load(rho_ptr).to(tl.float64)
    else:
        rho = tl.cast(rho_hi, tl.float64) + tl.cast(rho_lo, tl.float64)
    if SIGMA_FROM_PTR:
        sigma = tl.load(sigma_ptr).to(tl.float64)
    else:
        sigma = tl.cast(sigma_hi, tl.float64) + tl.cast(sigma_lo, tl.float64)
    # Scalar coefficients, once per program, in fp64 then rounded to the arithmetic dtype.
    c = (1.0 / (rho + sigma)).to(cdt)
    c_over_sigma = (1.0 / (rho + sigma) / sigma).to(cdt)
    rho_c = rho.to(cdt)
    sigma_c = sigma.to(cdt)

    pid = tl.program_id(0).to(tl.int64)
    offs = tl.max_contiguous(pid * BLOCK + tl.arange(0, BLOCK), CONTIGUITY)
    mask = offs < P

    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(cdt)
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr).to(cdt)
    delta = tl.zeros([BLOCK], dtype=cdt)
    primal = tl.zeros([BLOCK], dtype=cdt)
    for s in range(0, S):
        alpha = tl.load(w_ptr + s).to(cdt)
        g_row = g_ptr + s * stride_g
        d_row = d_ptr + s * stride_d
        g = tl.load(g_row + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(cdt)
        if HAS_INV_SCALE:
            g = g * inv_scale  # unscaled in the arithmetic dtype, never rounded to the storage dtype
        p = tl.load(d_row + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        new_dual, z_term = _badm_element(g, p, rho_c, sigma_c, c, c_over_sigma)
        tl.store(d_row + offs, new_dual, mask=mask)
        delta += alpha * z_term
        if HAS_RESIDUALS:
            # w_s' - z = -(g_s + pi_s) / (rho + sigma)
            local = (g + p) * c
            primal += alpha * local * local
    tl.store(z_ptr + offs, (z + delta).to(z_ptr.dtype.element_ty), mask=mask)
    if HAS_RESIDUALS:
        # Masked lanes loaded zeros, so they add nothing. Block sums in fp64.
        tl.atomic_add(res_ptr, tl.sum(primal.to(tl.float64), axis=0))
        tl.atomic_add(res_ptr + 1, tl.sum((delta * delta).to(tl.float64), axis=0))


@triton.jit
def _badm_nonfinite_kernel(g_ptr, found_ptr, P: tl.int64, S: tl.int32, stride_g: tl.int64, BLOCK: tl.constexpr):
    """Sets ``*found_ptr = 1.0`` when any of the S gradient rows holds a NaN or an infinity.

    Read-only over the gradients; programs that find one store the same value (no atomics
    needed), the others store nothing.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(0, S):
        g = tl.load(g_ptr + s * stride_g + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        if g_ptr.dtype.element_ty != tl.float64:  # fp64 stays fp64: a value above 3.4e38 is finite
            g = g.to(tl.float32)
        # NaN is the only value unequal to itself.
        bad = bad | ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
    n_bad = tl.sum(bad, axis=0)
    tl.store(found_ptr, 1.0, mask=n_bad > 0)


INTERPRETED = not isinstance(_badm_step_kernel, triton.runtime.JITFunction)


def default_launch_config(dtype: torch.dtype) -> tuple[int, int]:
    """``(block_size, num_warps)`` used for storage ``dtype`` when none is given."""
    return (_BLOCK_FP64 if dtype == torch.float64 else _BLOCK), _NUM_WARPS


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _split_double(x: float) -> tuple[float, float]:
    """``(hi, lo)``, two fp32 values with ``hi + lo == x`` to about 2**-48 relative.

    Triton passes Python floats as fp32 scalars (the interpreter ignores fp64 annotations and
    several Triton releases mis-passed annotated floats, triton-lang/triton#6176), so fp64
    hyperparameters travel as an unevaluated fp32 sum that every Triton version passes intact.
    """
    hi = _to_fp32(x)
    return hi, _to_fp32(x - hi)


def _check_hyper(name, value, device, positive):
    """Validate rho/sigma; returns (scalar float, tensor or None)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{name} as a tensor must hold one floating-point value, got shape "
                f"{tuple(value.shape)} of {value.dtype}"
            )
        if value.device != device:
            raise ValueError(f"{name} tensor is on {value.device}, expected {device} (the device of z)")
        return 0.0, value  # the value is read on the device, never on the host
    value = float(value)
    if not abs(value) < 3e38:
        raise ValueError(f"Invalid {name} value: {value} (must be finite and below 3e38)")
    if positive and not value > 0.0:
        raise ValueError(f"Invalid {name} value: {value} (must be > 0)")
    if not positive and not value >= 0.0:
        raise ValueError(f"Invalid {name} value: {value} (must be >= 0)")
    return value, None


def _validate(z, grads, duals, weights, residuals):
    if z.dtype not in _SUPPORTED:
        raise ValueError(f"z has dtype {z.dtype}; supported: float32, float64, bfloat16, float16")
    if z.dim() != 1 or (z.numel() > 1 and z.stride(0) != 1):
        raise ValueError(f"z must be a 1-D contiguous tensor, got shape {tuple(z.shape)} stride {z.stride()}")
    P = z.numel()
    if grads.dim() != 2 or grads.shape[1] != P or grads.shape[0] < 1:
        raise ValueError(f"grads must have shape (S, {P}) with S >= 1, got {tuple(grads.shape)}")
    S = grads.shape[0]
    if duals.shape != (S, P):
        raise ValueError(f"duals must have shape ({S}, {P}) like grads, got {tuple(duals.shape)}")
    cdt = _compute_dtype(z.dtype)
    if grads.dtype != z.dtype:
        raise ValueError(f"grads dtype {grads.dtype} differs from z dtype {z.dtype}")
    if duals.dtype != cdt:
        raise ValueError(f"duals must be {cdt} for {z.dtype} parameters, got {duals.dtype}")
    for name, t in (("grads", grads), ("duals", duals)):
        if P > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} rows must be contiguous (stride(1) == 1), got strides {t.stride()}")
        if S > 1 and t.stride(0) < P:
            raise ValueError(f"{name} row stride {t.stride(0)} is smaller than P = {P} (rows overlap)")
    if weights.shape != (S,):
        raise ValueError(f"weights must have shape ({S},), got {tuple(weights.shape)}")
    if weights.dtype != cdt:
        raise ValueError(f"weights must be {cdt} for {z.dtype} parameters, got {weights.dtype}")
    for name, t in (("grads", grads), ("duals", duals), ("weights", weights)):
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device}, expected {z.device} (the device of z)")
    if residuals is not None:
        if residuals.shape != (2,) or residuals.dtype != torch.float64 or residuals.device != z.device:
            raise ValueError(
                f"residuals must be a (2,) float64 tensor on {z.device}, got shape "
                f"{tuple(residuals.shape)} {residuals.dtype} on {residuals.device}"
            )
    _check_device_usable(z.device)
    return S, P


def _check_device_usable(device):
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton back end got CPU tensors but Triton is not in interpreter mode; "
            "set TRITON_INTERPRET=1 before badm_fast.kernels is first used, or use CUDA tensors"
        )


def _check_flag(name, t, device):
    """``found_inf`` / ``inv_scale``: None or a one-element float32 tensor on ``device``."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32 or t.device != device:
        got = f"shape {tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a one-element float32 tensor on {device}, got {got}")
    return t


def badm_step(
    z,
    grads,
    duals,
    weights,
    rho,
    sigma,
    residuals=None,
    *,
    found_inf=None,
    inv_scale=None,
    block_size=None,
    num_warps=None,
):
    r"""One fused BADM step in place on ``z`` and ``duals``, by the Triton kernel.

    Computes exactly :func:`badm_fast.reference.fused_step_` (on ``grads * inv_scale`` when
    ``inv_scale`` is given; not at all when ``found_inf`` is non-zero).

    Args:
        z (Tensor): global weights, 1-D contiguous ``(P,)``, float32/float64/bfloat16/float16.
        grads (Tensor): ``(S, P)`` sub-batch gradients in z's dtype; rows contiguous, any row stride.
        duals (Tensor): ``(S, P)`` duals in the arithmetic dtype (float64 for float64 z, else
            float32); rows contiguous, any row stride. Updated in place.
        weights (Tensor): ``(S,)`` normalised sub-batch weights in the arithmetic dtype.
        rho (float or Tensor): proximal coefficient (>= 0); a one-element device tensor is read
            on the device (no host synchronisation, CUDA-graph safe).
        sigma (float or Tensor): penalty (> 0); float or one-element device tensor like ``rho``.
        residuals (Tensor, optional): ``(2,)`` float64; ``sum_s alpha_s ||w_s' - z||^2`` and
            ``||z' - z||^2`` over the elements are added to it (default: None).
        found_inf (Tensor, optional): one-element float32 device tensor read by the kernel: when
            non-zero the call changes nothing (z, duals and residuals keep their values);
            e.g. GradScaler's ``found_inf`` or the flag of :func:`badm_nonfinite_check`.
        inv_scale (Tensor, optional): one-element float32 device tensor: the gradients are
            multiplied by it in fp32 (fp64 for fp64) before use, i.e. unscaled in this pass.
        block_size (int, optional): elements per program, a power of two (default: by dtype,
            see :func:`default_launch_config`).
        num_warps (int, optional): warps per program (default: see :func:`default_launch_config`).
    """
    S, P = _validate(z, grads, duals, weights, residuals)
    rho_f, rho_t = _check_hyper("rho", rho, z.device, positive=False)
    sigma_f, sigma_t = _check_hyper("sigma", sigma, z.device, positive=True)
    found_inf = _check_flag("found_inf", found_inf, z.device)
    inv_scale = _check_flag("inv_scale", inv_scale, z.device)
    block, warps = default_launch_config(z.dtype)
    if block_size is not None:
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        block = block_size
    if num_warps is not None:
        warps = num_warps
    if P == 0:
        return
    # Unused pointer arguments get z (never read: their constexpr switch is off).
    grid = (triton.cdiv(P, block),)
    args = (
        z,
        grads,
        duals,
        weights.contiguous(),
        residuals if residuals is not None else z,
        rho_t if rho_t is not None else z,
        sigma_t if sigma_t is not None else z,
        found_inf if found_inf is not None else z,
        inv_scale if inv_scale is not None else z,
        *_split_double(rho_f),
        *_split_double(sigma_f),
        P,
        S,
        grads.stride(0),
        duals.stride(0),
    )
    kwargs = dict(
        RHO_FROM_PTR=rho_t is not None,
        SIGMA_FROM_PTR=sigma_t is not None,
        HAS_RESIDUALS=residuals is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_INV_SCALE=inv_scale is not None,
        BLOCK=block,
        CONTIGUITY=_CONTIGUITY,
        num_warps=warps,
        # Each operation rounded as written, like the reference (and independent of Triton's
        # changing default, see TRITON_DEFAULT_FP_FUSION).
        enable_fp_fusion=False,
    )
    if z.device.type == "cuda":
        with torch.cuda.device(z.device):
            _badm_step_kernel[grid](*args, **kwargs)
    else:
        _badm_step_kernel[grid](*args, **kwargs)


# The scan is a pure read of S rows: 4096 elements per program keeps 16 elements per thread
# per row in flight at 8 warps (untuned; the scan runs only in the capture-safe and fused
# GradScaler paths, see bench/gpu_check.py for its time).
_CHECK_BLOCK = 4096


def badm_nonfinite_check(grads, found_inf, *, block_size=None):
    """Set ``found_inf`` to 1.0 when any element of ``grads`` is NaN or infinite (in place).

    Never clears the flag, so calls over several buffers accumulate. No host synchronisation.

    Args:
        grads (Tensor): ``(S, P)`` gradients (any supported dtype), rows contiguous, any row stride.
        found_inf (Tensor): one-element float32 tensor on the device of ``grads``.
        block_size (int, optional): elements per program, a power of two (default: 4096).
    """
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"grads must have shape (S, P) with S >= 1, got {tuple(grads.shape)}")
    if grads.dtype not in _SUPPORTED:
        raise ValueError(f"grads has dtype {grads.dtype}; supported: float32, float64, bfloat16, float16")
    S, P = grads.shape
    if P > 1 and grads.stride(1) != 1:
        raise ValueError(f"grads rows must be contiguous (stride(1) == 1), got strides {grads.stride()}")
    if found_inf is None:
        raise ValueError("found_inf must be a one-element float32 tensor, got None")
    _check_flag("found_inf", found_inf, grads.device)
    _check_device_usable(grads.device)
    block = _CHECK_BLOCK if block_size is None else block_size
    if block < 16 or block & (block - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block}")
    if P == 0:
        return
    grid = (triton.cdiv(P, block),)
    args = (grads, found_inf, P, S, grads.stride(0))
    if grads.device.type == "cuda":
        with torch.cuda.device(grads.device):
            _badm_nonfinite_kernel[grid](*args, BLOCK=block, num_warps=_NUM_WARPS)
    else:
        _badm_nonfinite_kernel[grid](*args, BLOCK=block, num_warps=_NUM_WARPS)
