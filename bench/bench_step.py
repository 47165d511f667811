#!/usr/bin/env python
"""Time one BADM step against the memory-bandwidth limit and against torch.optim's anchors.

The step is memory-bound, so the metric is bandwidth: bytes moved per step over the median
step time. Per case (size P, layout, sub-batches S, dtype) it times

- ``kernel <backend>``: the fused kernel of each available back end (cpp on CPU; triton and
  cuda on GPUs) called directly on flat buffers z (P,), grads (S, P), duals (S, P) fp32,
  weights (S,) (the Triton interpreter on CPU is never benchmarked);
- ``BADM.step <backend>``: the same step through :class:`badm_fast.BADM` (its Python
  bookkeeping and the non-finite check, which reads the S gradient rows once more), and
  ``... ignore`` with ``on_nonfinite="ignore"`` (no check);
- ``plain``: :func:`badm_fast.reference.fused_step_`, the plain PyTorch step, and
  ``compiled``: the same function under ``torch.compile`` (compiled once, outside the timing);
- the anchors ``Adam fused`` (``torch.optim.Adam(fused=True)``), ``Adam foreach`` and
  ``SGD foreach`` (``SGD(momentum=0.9, foreach=True)``),

with P as one tensor ("flat") and as ResNet-50's 161 parameter tensors ("list", each tensor
scaled by the same factor so that they add up to P; ``--sizes resnet50`` uses the real
shapes, 25,557,032 elements). The kernel, plain and compiled steps work on flat buffers by
definition and run for the flat layout only.

Bytes moved per step (docs/algorithm.md): BADM reads z, S gradient rows and S dual rows and writes
S dual rows and z: ``P * (2*isz + S*isz + 2*S*4)`` with ``isz`` the parameter dtype's item
size and fp32 duals, i.e. (3S + 2) values per element. Adam moves 7 values per element (param
read/write, grad read, exp_avg read/write, exp_avg_sq read/write), SGD with momentum 5, each
counted with the item size of its actual tensor (taken from the optimizer's state).

Ratios, all from the same run: ``xAdam`` = GB/s / GB/s of Adam(fused=True) on the same
parameters; ``xcopy`` = GB/s / GB/s of ``dst.copy_(src)`` moving as many bytes (read + write
counted; capped at 2 GB moved, where the bandwidth has long reached its DRAM plateau), and
``xadd_`` the same against the in-place stream ``x.add_(y)``; ``xplain`` = time of the plain
PyTorch step / time (a speed-up); ``xcompiled`` = GB/s / GB/s of the compiled step.

A markdown report goes to stdout, and to a file only where asked: ``--md PATH`` writes it,
``--csv PATH`` appends one row per case (with the machine, versions, commit and date); by
default nothing is written.

    python bench/bench_step.py --quick     # under a minute, prints only
    python bench/bench_step.py             # the full matrix (about 10 minutes on 2 CPU cores)
    python bench/bench_step.py --threads 1 --md bench/results/cpu_step_1thread.md --csv bench/results/bench_step.csv
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as bc  # noqa: E402
import torch  # noqa: E402

import badm_fast  # noqa: E402
from badm_fast import backends, reference  # noqa: E402

M = 1 << 20
RHO, SIGMA = 9.0, 10.0  # momentum 0.9 at learning rate 0.1; the values do not change the time
GRAD_SCALE = 1e-3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# Methods, in table order. S-independent anchors first.
ANCHORS = ("adam-fused", "adam-foreach", "sgd-foreach")
BADM_FLAT_ONLY = ("kernel", "compiled", "plain")
BADM_OPT = ("optimizer", "optimizer-ignore")
METHODS = ANCHORS + ("kernel", "optimizer", "optimizer-ignore", "compiled", "plain")
LABELS = {
    "adam-fused": "Adam fused",
    "adam-foreach": "Adam foreach",
    "sgd-foreach": "SGD foreach",
    "kernel": "kernel {backend}",
    "optimizer": "BADM.step {backend}",
    "optimizer-ignore": "BADM.step {backend} ignore",
    "compiled": "compiled",
    "plain": "plain",
}

CSV_FIELDS = [
    "date", "commit", "platform", "cpu", "cores", "threads", "device", "gpu", "torch", "triton", "python",
    "load", "method", "backend", "layout", "n_tensors", "P", "S", "dtype", "median_ms", "p20_ms", "p80_ms",
    "reps", "bytes", "gbps", "copy_gbps", "add_gbps", "adam_fused_gbps", "x_adam_fused", "x_copy", "x_add", "x_plain",
    "x_compiled", "status",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Parameter shapes
# ---------------------------------------------------------------------------------------------


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (25,557,032 elements): the stem,
    bottleneck stages of 3, 4, 6, 3 blocks (1x1, 3x3, 1x1 convolutions with batch norms, a
    projection in each stage's first block) and the 1000-way classifier."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            out = 4 * width
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


RESNET50_NUMEL = 25_557_032


def layout_shapes(layout: str, P: int) -> list[tuple[int, ...]]:
    """Shapes of the parameters of a case: one tensor of P elements ("flat"), or ResNet-50's
    161 tensors ("list"): as they are when P is ResNet-50's size, else each one's size scaled
    by P / 25,557,032 (at least 1 element; the largest absorbs the rounding so the sizes add
    up to P exactly)."""
    if layout == "flat":
        return [(P,)]
    if layout != "list":
        raise ValueError(f"unknown layout {layout!r}; choose 'flat' or 'list'")
    base = resnet50_shapes()
    if P == RESNET50_NUMEL:
        return base
    sizes = [max(1, round(math.prod(s) * P / RESNET50_NUMEL)) for s in base]
    big = max(range(len(sizes)), key=sizes.__getitem__)
    sizes[big] += P - sum(sizes)
    if sizes[big] < 1:
        raise ValueError(f"P={P} is too small for {len(base)} tensors")
    return [(n,) for n in sizes]


# ---------------------------------------------------------------------------------------------
# Bytes moved
# ---------------------------------------------------------------------------------------------


def badm_bytes(P: int, S: int, dtype: torch.dtype) -> int:
    """Bytes one fused BADM step moves: read z, S gradient rows, S dual rows; write S dual rows
    and z; z and the gradients in ``dtype``, the duals in its compute dtype."""
    isz = torch.empty((), dtype=dtype).element_size()
    dsz = torch.empty((), dtype=reference.compute_dtype(dtype)).element_size()
    return P * (2 * isz + S * isz + 2 * S * dsz)


torch_optimizer_bytes = bc.torch_optimizer_bytes


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """Measured memory of an optimizer over its parameters: ``(state, grads, params)`` bytes,
    each counted once per underlying storage: the ``.grad`` tensors, and for BADM with several
    sub-batches its gradient rows (``(S, *shape)`` per parameter, counted whole). During a
    backward pass autograd's fresh ``.grad`` of the running sub-batch adds one gradient more."""

    def storages(tensors):
        seen = {}
        for t in tensors:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    params = [p for g in opt.param_groups for p in g["params"]]
    state = [t for p in params for t in opt.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in params if p.grad is not None]
    if isinstance(opt, badm_fast.BADM) and opt.mode == "sub_batch" and opt.sub_batches > 1:
        grads += [g for g in (opt.sub_batch_grad(p, 0) for p in params) if g is not None]
    return storages(state), storages(grads), storages(params)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A case ready to time: ``fn()`` runs one step; ``nbytes`` is what one step moves."""

    fn: Callable[[], Any]
    nbytes: int
    n_tensors: int
    keep: list = field(default_factory=list)  # tensors/optimizers kept alive while timing

    def close(self) -> None:
        for obj in self.keep:
            if isinstance(obj, badm_fast.BADM):
                release_badm(obj)
        self.keep.clear()


def release_badm(opt: badm_fast.BADM) -> None:
    """Drop the optimizer's state now (its duals and gradient rows), before the next case allocates."""
    opt.state.clear()
    opt._records.clear()
    opt._layout = None


def _params(shapes, dtype, device, seed=0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Leaf parameters of the given shapes and a gradient for each (views of two flat buffers
    filled with small random values)."""
    P = sum(math.prod(s) for s in shapes)
    values = bc.fill_random_(torch.empty(P, dtype=dtype, device=device), seed=seed)
    grads_flat = bc.fill_random_(torch.empty(P, dtype=dtype, device=device), seed=seed + 1, scale=GRAD_SCALE)
    params, grads, off = [], [], 0
    for s in shapes:
        n = math.prod(s)
        params.append(values[off : off + n].view(s).clone().requires_grad_())
        grads.append(grads_flat[off : off + n].view(s))
        off += n
    return params, grads


def prepare_torch_optimizer(method: str, shapes, dtype, device) -> Prepared:
    params, grads = _params(shapes, dtype, device)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    del grads
    if method == "adam-fused":
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    elif method == "adam-foreach":
        opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    elif method == "sgd-foreach":
        opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=True)
    else:
        raise ValueError(f"not a torch.optim method: {method!r}")
    opt.step()  # materialises the state, so the bytes come from the actual state tensors
    return Prepared(fn=opt.step, nbytes=torch_optimizer_bytes(opt), n_tensors=len(params), keep=[opt, params])


def make_badm(shapes, S, dtype, device, backend="auto", mode="sub_batch", on_nonfinite="raise", grads=True):
    """A BADM optimizer over fresh parameters with every gradient row filled (a step can be
    repeated: the rows stay filled until zero_grad)."""
    params, gsrc = _params(shapes, dtype, device)
    opt = badm_fast.BADM(
        params, sub_batches=S, rho=RHO, sigma=SIGMA, backend=backend, mode=mode, on_nonfinite=on_nonfinite
    )
    if grads:
        for s in range(1 if mode == "merged" else S):
            opt.set_grads(s, params, gsrc)
    return opt, params


def prepare_badm_optimizer(method: str, backend: str, shapes, S, dtype, device) -> Prepared:
    check = "ignore" if method == "optimizer-ignore" else "raise"
    opt, params = make_badm(shapes, S, dtype, device, backend=backend, on_nonfinite=check)
    if opt.backend != backend:
        raise RuntimeError(f"BADM ran backend {opt.backend!r}, asked for {backend!r}")
    opt.step()
    P = sum(p.numel() for p in params)
    return Prepared(fn=opt.step, nbytes=badm_bytes(P, S, dtype), n_tensors=len(params), keep=[opt, params])


class FlatBuffers:
    """z (P,), grads (S, P), duals (S, P) in the compute dtype, weights (S,): the kernel's inputs."""

    def __init__(self, P: int, S: int, dtype: torch.dtype, device: torch.device):
        cdt = reference.compute_dtype(dtype)
        self.z = bc.fill_random_(torch.empty(P, dtype=dtype, device=device), seed=3)
        self.grads = bc.fill_random_(torch.empty(S, P, dtype=dtype, device=device), seed=4, scale=GRAD_SCALE)
        self.duals = bc.fill_random_(torch.empty(S, P, dtype=cdt, device=device), seed=5, scale=GRAD_SCALE)
        self.weights = torch.full((S,), 1.0 / S, dtype=cdt, device=device)
        self.P, self.S, self.dtype = P, S, dtype

    def step_fn(self, kernel: Callable[..., None]) -> Callable[[], None]:
        """The kernel contract's call on this one-tensor layout (rows of the flat buffers)."""
        z, g, d, w = [self.z], list(self.grads.unbind(0)), list(self.duals.unbind(0)), self.weights
        hyper = reference.hyper_tensor(*reference.lr_momentum(RHO, SIGMA), device=self.z.device)
        return lambda: kernel(z, g, d, w, hyper, None)

    @property
    def nbytes(self) -> int:
        return badm_bytes(self.P, self.S, self.dtype)


_COMPILED: dict[str, Callable[..., None]] = {}


def compiled_step() -> Callable[..., None]:
    """``torch.compile(reference.fused_step_, dynamic=True)``: one compiled function for every
    size (the first call per dtype and S compiles; :func:`run` makes it outside the timing)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(reference.fused_step_, dynamic=True)
    return _COMPILED["fn"]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    sizes: list[int]
    sub_batches: list[int]
    dtypes: list[torch.dtype]
    layouts: list[str]
    methods: list[str]
    backends: list[str]
    device: torch.device
    target_s: float = 1.0
    min_reps: int = 5
    plain_limit_bytes: float = math.inf
    baseline_cap_bytes: int = 2_000_000_000
    memory: bool = True
    memory_shapes_P: int = RESNET50_NUMEL


def kernel_backends(device: torch.device) -> tuple[list[str], list[str]]:
    """The compiled back ends that can be timed on ``device`` and notes on those that cannot."""
    names, notes = [], []
    for name in ("cpp", "triton", "cuda"):
        if name == "triton" and device.type != "cuda":
            notes.append("triton: GPU only here (the CPU interpreter is not benchmarked)")
            continue
        ok, reason, _ = backends.availability(name, device.type)
        if ok:
            names.append(name)
        elif not (device.type == "cpu" and name == "cuda") and not (device.type == "cuda" and name == "cpp"):
            notes.append(f"{name}: {reason}")
    return names, notes


class Baselines:
    """Copy and in-place-add bandwidth, measured once per byte count (capped) in the run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.copy: dict[int, float] = {}
        self.add: dict[int, float] = {}

    def key(self, nbytes: int) -> int:
        return int(min(nbytes, self.cfg.baseline_cap_bytes))

    def ensure(self, nbytes: int) -> None:
        k = self.key(nbytes)
        if k in self.copy:
            return
        kw = dict(min_reps=self.cfg.min_reps, target_s=self.cfg.target_s / 3)
        self.copy[k], _ = bc.copy_gbps(k, self.cfg.device, **kw)
        self.add[k], _ = bc.inplace_add_gbps(k, self.cfg.device, **kw)
        bc.free_memory(self.cfg.device)

    def get(self, nbytes: int) -> tuple[float, float]:
        self.ensure(nbytes)
        k = self.key(nbytes)
        return self.copy[k], self.add[k]


def _row(method, backend, layout, n_tensors, P, S, dtype, stats=None, nbytes=None, status="ok"):
    row = dict(
        method=method, backend=backend, layout=layout, n_tensors=n_tensors, P=P, S=S,
        dtype=SHORT_DTYPE[dtype], status=status, bytes=nbytes,
    )  # fmt: skip
    if stats is not None:
        row.update(
            median_ms=stats.median * 1e3, p20_ms=stats.p20 * 1e3, p80_ms=stats.p80 * 1e3, reps=stats.reps,
            gbps=stats.gbps(nbytes),
        )  # fmt: skip
    return row


def _error(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {msg[:160]}"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _measure(cfg: Config, fns: list[Callable[[], Any]]) -> list[bc.Stats]:
    return bc.measure_group(fns, cfg.device, min_reps=cfg.min_reps, target_s=cfg.target_s)


def run_size(cfg: Config, base: Baselines, dtype: torch.dtype, P: int, log=print) -> list[dict[str, Any]]:
    """Every case of one (dtype, P). Cases that are compared are timed side by side
    (:func:`common.measure_group`): the anchors of one layout together; per S the kernels,
    the compiled and the plain step together with a second timing of Adam(fused=True) on one
    flat tensor, which gives their xAdam ratio. The BADM.step cases run one after the other."""
    rows: list[dict[str, Any]] = []
    dev = cfg.device
    # Bandwidth baselines first, while no case buffers are held.
    for S in cfg.sub_batches:
        base.ensure(badm_bytes(P, S, dtype))
    base.ensure(7 * P * _itemsize(dtype))
    base.ensure(5 * P * _itemsize(dtype))

    def emit(row):
        rows.append(row)
        log(_progress(row))

    twin = None  # Adam(fused=True) on one flat tensor of P elements, timed beside the flat BADM steps
    for layout in cfg.layouts:
        shapes = layout_shapes(layout, P)
        members = []
        for method in (m for m in ANCHORS if m in cfg.methods):
            try:
                members.append((method, prepare_torch_optimizer(method, shapes, dtype, dev)))
            except Exception as exc:
                emit(_row(method, "", layout, len(shapes), P, 0, dtype, status=_error(exc)))
        if members:
            for (method, prep), st in zip(members, _measure(cfg, [p.fn for _, p in members])):
                emit(_row(method, "", layout, prep.n_tensors, P, 0, dtype, stats=st, nbytes=prep.nbytes))
                if method == "adam-fused" and layout == "flat":
                    twin = prep
        del members
        bc.free_memory(dev)

    for S in cfg.sub_batches:
        if "flat" in cfg.layouts and any(m in cfg.methods for m in BADM_FLAT_ONLY):
            flat = FlatBuffers(P, S, dtype, dev)
            members = []
            if "kernel" in cfg.methods:
                for b in cfg.backends:
                    try:
                        members.append(("kernel", b, flat.step_fn(backends.get(b)[0])))
                    except Exception as exc:
                        emit(_row("kernel", b, "flat", 1, P, S, dtype, status=_error(exc)))
            if "compiled" in cfg.methods:
                try:
                    fn = flat.step_fn(compiled_step())
                    fn()  # compile (or fetch from the cache) outside the timing
                    bc.synchronize(dev)
                    members.append(("compiled", "", fn))
                except Exception as exc:  # report it in the table, keep going
                    emit(_row("compiled", "", "flat", 1, P, S, dtype, status=_error(exc)))
            if "plain" in cfg.methods:
                if flat.nbytes > cfg.plain_limit_bytes:
                    why = f"skipped: moves > {cfg.plain_limit_bytes / 1e9:g} GB (--all runs it)"
                    emit(_row("plain", "", "flat", 1, P, S, dtype, status=why))
                else:
                    members.append(("plain", "", flat.step_fn(reference.fused_step_)))
            if members:
                fns = [fn for _, _, fn in members] + ([twin.fn] if twin is not None else [])
                try:
                    stats = _measure(cfg, fns)
                except Exception as exc:
                    for method, b, _ in members:
                        emit(_row(method, b, "flat", 1, P, S, dtype, status=_error(exc)))
                else:
                    adam = stats[-1].gbps(twin.nbytes) if twin is not None else None
                    for (method, b, _), st in zip(members, stats):
                        row = _row(method, b, "flat", 1, P, S, dtype, stats=st, nbytes=flat.nbytes)
                        row["adam_fused_gbps"] = adam
                        emit(row)
            del flat, members
            bc.free_memory(dev)
        for layout in cfg.layouts:
            for method in (m for m in BADM_OPT if m in cfg.methods):
                for b in cfg.backends:
                    emit(run_optimizer_case(cfg, method, b, layout, P, S, dtype))
                    bc.free_memory(dev)
    del twin
    bc.free_memory(dev)
    return rows


def run_optimizer_case(cfg: Config, method: str, backend: str, layout: str, P: int, S: int,
                       dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    """Time ``BADM.step()`` (with or without the non-finite check) on its own."""
    shapes = layout_shapes(layout, P)
    try:
        prepared = prepare_badm_optimizer(method, backend, shapes, S, dtype, cfg.device)
        try:
            (stats,) = _measure(cfg, [prepared.fn])
        finally:
            prepared.close()
    except Exception as exc:  # report it in the table, keep going
        return _row(method, backend, layout, len(shapes), P, S, dtype, status=_error(exc))
    return _row(method, backend, layout, prepared.n_tensors, P, S, dtype, stats=stats, nbytes=prepared.nbytes)


def run(cfg: Config, log=print) -> list[dict[str, Any]]:
    """Time every case of ``cfg``; returns its rows with the bandwidth ratios filled in."""
    rows: list[dict[str, Any]] = []
    base = Baselines(cfg)
    for dtype in cfg.dtypes:
        for P in cfg.sizes:
            rows += run_size(cfg, base, dtype, P, log=log)
    add_ratios(rows, base)
    return rows


_T0 = time.perf_counter()


def _progress(row: dict[str, Any]) -> str:
    what = f"[{time.perf_counter() - _T0:6.1f}s] {row['dtype']} {row['layout']:4} P={size_label(row['P']):>6} "
    what += f"S={row['S']} {label(row):28}"
    if row["status"] != "ok":
        return f"  {what} {row['status']}"
    return f"  {what} {row['median_ms']:9.3f} ms {row['gbps']:7.2f} GB/s ({row['reps']} reps)"


def add_ratios(rows: list[dict[str, Any]], base: Baselines) -> None:
    """Fill the ratio columns from rows of the same run. xAdam uses the Adam(fused=True) timing
    taken beside the row where there is one, else the anchor row of the same parameters."""
    ok = [r for r in rows if r["status"] == "ok"]
    adam = {(r["dtype"], r["layout"], r["P"]): r for r in ok if r["method"] == "adam-fused"}
    plain = {(r["dtype"], r["P"], r["S"]): r for r in ok if r["method"] == "plain"}
    comp = {(r["dtype"], r["P"], r["S"]): r for r in ok if r["method"] == "compiled"}
    for r in ok:
        r["copy_gbps"], r["add_gbps"] = base.get(r["bytes"])
        r["x_copy"] = r["gbps"] / r["copy_gbps"]
        r["x_add"] = r["gbps"] / r["add_gbps"]
        if r.get("adam_fused_gbps") is None:
            a = adam.get((r["dtype"], r["layout"], r["P"]))
            r["adam_fused_gbps"] = a["gbps"] if a else None
        r["x_adam_fused"] = r["gbps"] / r["adam_fused_gbps"] if r["adam_fused_gbps"] else None
        if r["S"]:
            p = plain.get((r["dtype"], r["P"], r["S"]))
            c = comp.get((r["dtype"], r["P"], r["S"]))
            r["x_plain"] = p["median_ms"] / r["median_ms"] if p else None
            r["x_compiled"] = r["gbps"] / c["gbps"] if c else None


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


MEMORY_CONFIGS = ("badm", "badm-merged", "adam-fused", "sgd-foreach")


def build_optimizer(kind: str, shapes, dtype, device, S: int = 4, backend: str = "auto") -> torch.optim.Optimizer:
    """An optimizer of ``kind`` over fresh parameters of ``shapes`` after one step (its state
    materialised), for the memory table."""
    if kind in ("badm", "badm-merged"):
        mode = "merged" if kind == "badm-merged" else "sub_batch"
        opt, _ = make_badm(shapes, S, dtype, device, backend=backend, mode=mode)
        opt.step()
        return opt
    return prepare_torch_optimizer(kind, shapes, dtype, device).keep[0]


def memory_rows(P: int, dtypes, device, sub_batches=(1, 4, 8), backend="auto") -> list[dict[str, Any]]:
    """Measured optimizer memory per parameter element on ResNet-50's shapes (scaled to P)."""
    shapes = layout_shapes("list", P)
    numel = sum(math.prod(s) for s in shapes)
    configs = [(f"BADM per-sub-batch S={S}", "badm", S) for S in sub_batches]
    configs += [("BADM merged S=4", "badm-merged", 4), ("Adam(fused=True)", "adam-fused", 0)]
    configs += [("SGD(momentum=0.9)", "sgd-foreach", 0)]
    rows = []
    for dtype in dtypes:
        for name, kind, S in configs:
            opt = build_optimizer(kind, shapes, dtype, device, S=S, backend=backend)
            st, gr, pa = state_bytes(opt)
            if isinstance(opt, badm_fast.BADM):
                release_badm(opt)
            rows.append(dict(
                optimizer=name, dtype=SHORT_DTYPE[dtype], P=numel, n_tensors=len(shapes),
                state_B=st / numel, grads_B=gr / numel, params_B=pa / numel, total_B=(st + gr + pa) / numel,
            ))  # fmt: skip
            del opt
            bc.free_memory(device)
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def size_label(P: int) -> str:
    if P == RESNET50_NUMEL:
        return "R50"
    if P >= M and P % M == 0:
        return f"{P // M}M"
    if P >= 1024 and P % 1024 == 0:
        return f"{P // 1024}K"
    return str(P)


def label(row: dict[str, Any]) -> str:
    return LABELS[row["method"]].format(backend=row["backend"])


MAIN_COLUMNS = [
    ("dtype", "dtype"), ("size", "P"), ("S", "S"), ("label", "method"),
    ("median_ms", "median ms"), ("spread", "p20–p80 ms"), ("GB", "GB/step"), ("gbps", "GB/s"),
    ("x_adam_fused", "×Adam fused"), ("x_copy", "×copy"), ("x_add", "×add_"), ("x_plain", "×plain (speed-up)"),
    ("x_compiled", "×compiled"),
]  # fmt: skip


def _display(rows):
    out = []
    for r in rows:
        d = dict(r)
        d["tensors"] = r["n_tensors"]
        d["size"] = size_label(r["P"])
        d["S"] = r["S"] if r["S"] else "-"
        d["label"] = label(r)
        if r["status"] == "ok":
            d["spread"] = f"{bc.fmt(r['p20_ms'])}–{bc.fmt(r['p80_ms'])}"
            d["GB"] = r["bytes"] / 1e9
        else:
            d["spread"] = r["status"]
        out.append(d)
    return out


def target_rows(rows: list[dict[str, Any]], min_P: int = 16 * M, S_values=(1, 4)) -> list[dict[str, Any]]:
    """The issue's targets for each compiled back end: at P >= 16M and S in {1, 4},
    xAdam(fused) >= 1, xcompiled >= 1, xplain >= 10."""
    out = []
    for r in rows:
        if r["method"] != "kernel" or r["status"] != "ok" or r["P"] < min_P or r["S"] not in S_values:
            continue

        def verdict(x, need):
            return "n/a" if x is None else f"{x:.2f} {'✓' if x >= need else '✗'}"

        out.append(dict(
            backend=r["backend"], dtype=r["dtype"], size=size_label(r["P"]), S=r["S"], gbps=r["gbps"],
            adam=verdict(r.get("x_adam_fused"), 1.0), compiled=verdict(r.get("x_compiled"), 1.0),
            plain=verdict(r.get("x_plain"), 10.0),
        ))  # fmt: skip
    return out


def report(cfg: Config, rows, mem_rows, info, command: str, notes: list[str], load_end: str = "") -> str:
    lines = bc.report_header("BADM step", info, command, load_end, versions="torch,triton") + [
        "Median of ≥ {0} timed calls (about {1:g} s per case) after a warm-up; GB/step by the formulas "
        "of bench/bench_step.py (BADM (3S+2)·P values, Adam 7, SGD momentum 5, at their actual item sizes; "
        "duals fp32). ×Adam fused: GB/s over Adam(fused=True)'s on the same parameters; ×copy / ×add_: "
        "over `dst.copy_(src)` / `x.add_(y)` moving as many bytes (capped at {2:g} GB); ×plain: time of the "
        "plain PyTorch step over this one; ×compiled: GB/s over torch.compile'd plain step's.".format(
            cfg.min_reps, cfg.target_s, cfg.baseline_cap_bytes / 1e9
        ),
    ]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    for layout, title in (("flat", "One tensor of P elements"), ("list", "ResNet-50's 161 parameter tensors")):
        part = [r for r in rows if r["layout"] == layout]
        if part:
            n = max(r["n_tensors"] for r in part)
            head = f"{title} ({n} tensor{'s' if n > 1 else ''}):"
            lines += ["", head, "", bc.markdown_table(_display(part), MAIN_COLUMNS)]
    targets = target_rows(rows)
    if targets:
        lines += [
            "",
            "Targets (P ≥ 16M, S ∈ {1, 4}): ×Adam fused ≥ 1, ×compiled ≥ 1, ×plain ≥ 10.",
            "",
            bc.markdown_table(targets, [
                ("backend", "back end"), ("dtype", "dtype"), ("size", "P"), ("S", "S"), ("gbps", "GB/s"),
                ("adam", "×Adam fused"), ("compiled", "×compiled"), ("plain", "×plain"),
            ]),
        ]  # fmt: skip
    if mem_rows:
        lines += [
            "",
            f"Optimizer memory per parameter element, measured from the optimizers' tensors after one step "
            f"(ResNet-50's {mem_rows[0]['n_tensors']} parameter shapes, {mem_rows[0]['P']:,} elements): "
            "state (BADM: the duals buffer; Adam: exp_avg, exp_avg_sq; SGD: momentum_buffer), gradient "
            "storage (BADM: the S-row gradient buffer; torch.optim: one .grad per parameter), parameters.",
            "",
            bc.markdown_table(mem_rows, [
                ("optimizer", "optimizer"), ("dtype", "dtype"), ("state_B", "state B/elem"),
                ("grads_B", "grads B/elem"), ("params_B", "params B/elem"), ("total_B", "total B/elem"),
            ]),
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    t = text.strip().lower()
    if t in ("resnet50", "r50"):
        return RESNET50_NUMEL
    mult = {"k": 1024, "m": M, "g": 1024 * M}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if t[-1:] in "kmg" else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 1M, 16M, resnet50)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 1, got {text!r}")
    return n


def _sizes(text: str) -> list[int]:
    return [parse_size(x) for x in text.split(",") if x.strip()]


def _csv_list(kind, choices=None):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {kind} {bad}; choose from {list(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, S in {1,4}, fp32: under a minute")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--sizes", type=_sizes, default=None, help="e.g. 1M,16M,64M,resnet50")
    ap.add_argument("--sub-batches", type=_csv_list("S"), default=None, help="e.g. 1,4,8")
    ap.add_argument("--dtypes", type=_csv_list("dtype", DTYPES), default=None, help="float32,bfloat16,...")
    ap.add_argument("--layouts", type=_csv_list("layout", ("flat", "list")), default=None, help="flat,list")
    ap.add_argument("--methods", type=_csv_list("method", METHODS), default=None, help=",".join(METHODS))
    ap.add_argument("--backends", type=_csv_list("backend", ("cpp", "triton", "cuda")), default=None)
    ap.add_argument("--target-s", type=float, default=None, help="seconds of timed calls per case (0.5; --quick 0.1)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--plain-limit-gb", type=float, default=None,
                    help="skip the plain PyTorch step above this many GB moved (default 1.5 on CPU)")
    ap.add_argument("--all", action="store_true", help="no limit on the plain step")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--csv", default=None, metavar="PATH", help="append one row per case to this CSV (default: none)")
    ap.add_argument("--no-csv", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
    ap.add_argument("--md", default=None, metavar="PATH", help="also write the markdown report to this file")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory table")
    return ap


def config_from_args(args: argparse.Namespace) -> tuple[Config, list[str]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names, notes = kernel_backends(device)
    if args.backends is not None:
        missing = [b for b in args.backends if b not in names]
        if missing:
            raise SystemExit(f"back end(s) {missing} cannot be timed on {device}: " + "; ".join(notes))
        names = args.backends
    if args.quick:
        sizes, subs, dts, target = [256 * 1024, M], [1, 4], [torch.float32], 0.1
    else:
        sizes, subs, dts, target = [M, 16 * M, 64 * M], [1, 4, 8], [torch.float32, torch.bfloat16], 0.5
    if args.sizes is not None:
        sizes = args.sizes
    if args.sub_batches is not None:
        subs = [int(s) for s in args.sub_batches]
        if any(s < 1 for s in subs):
            raise SystemExit("--sub-batches must be >= 1")
    if args.dtypes is not None:
        dts = [DTYPES[d] for d in args.dtypes]
    if args.target_s is not None:
        target = args.target_s
    if args.plain_limit_gb is not None:
        limit = args.plain_limit_gb * 1e9
    else:
        limit = 1.5e9 if device.type == "cpu" else math.inf
    if args.all:
        limit = math.inf
    cfg = Config(
        sizes=sizes, sub_batches=subs, dtypes=dts, layouts=args.layouts or ["flat", "list"],
        methods=args.methods or list(METHODS), backends=names, device=device, target_s=target,
        min_reps=args.min_reps, plain_limit_bytes=limit, memory=not args.no_memory,
        memory_shapes_P=M if args.quick else RESNET50_NUMEL,
    )  # fmt: skip
    return cfg, notes


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, notes = config_from_args(args)
    info = bc.machine_info(cfg.device)
    command = "python bench/bench_step.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"bench_step: {info['device']}, {info['cpu']}, {info['threads']} threads, load {info['load']}, "
          f"back ends {cfg.backends}", file=sys.stderr)  # fmt: skip
    rows = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    mem = []
    if cfg.memory:
        backend = cfg.backends[0] if cfg.backends else "auto"
        mem = memory_rows(cfg.memory_shapes_P, cfg.dtypes, cfg.device, backend=backend)
    text = report(cfg, rows, mem, info, command.strip(), notes, load_end=bc.load_average())
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text)
    if args.csv and not args.no_csv:
        path = bc.append_csv(args.csv, [dict(info, **r) for r in rows], CSV_FIELDS)
        print(f"appended {len(rows)} rows to {path}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
