"""The BADM optimizer: a torch.optim.Optimizer over the user's parameters and one fused kernel."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from . import _ops, backends, distributed
from . import overlap as _overlap
from .layout import (
    SUPPORTED_DTYPES,
    Bucket,
    GradRecord,
    alloc_like,
    bucket_key,
    is_dense,
    is_dtensor,
    kernel_view,
    local,
)
from .reference import compute_dtype, lr_momentum, rho_sigma

__all__ = ["BADM", "STATE_VERSION"]

# Version of the state_dict layout written by BADM.state_dict(); load_state_dict refuses newer
# ones and converts older ones.
#   1: per-parameter duals, param groups with rho/sigma, metadata (sub_batches, mode, step, merged_alpha).
#   2: adds "alpha", the last step's normalised weights, which makes a per-sub-batch state
#      convertible into a merged one (pi_bar = sum_s alpha_s pi_s).
#   3: param groups carry lr, momentum, weight_decay, maximize (rho/sigma shown beside them).
STATE_VERSION = 3
MODES = ("sub_batch", "merged")
NONFINITE = ("raise", "skip", "ignore")
_HYPER_KEYS = ("lr", "momentum", "weight_decay", "maximize")


def _same_sharding(a: Any, b: Any) -> bool:
    """Whether two DTensors have the same mesh, placements and local shape (a shard copies as is)."""
    same_local = a._local_tensor.shape[1:] == b._local_tensor.shape[1:]
    return a.device_mesh == b.device_mesh and a.placements == b.placements and same_local


def _number(name: str, value: Any) -> float:
    """A real number from a Python, numpy or one-element tensor scalar (read on the host)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"Invalid {name}: {value!r} (a real number or a one-element real tensor)")
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (a real number)")
    return float(value)


def check_hyper(lr: Any, momentum: Any, weight_decay: Any = 0.0) -> tuple[float, float, float]:
    """Validate lr >= 0, 0 <= momentum < 1, weight_decay >= 0 (all finite); returns floats."""
    lr_f, mu_f, wd_f = _number("lr", lr), _number("momentum", momentum), _number("weight_decay", weight_decay)
    if not math.isfinite(lr_f) or lr_f < 0:
        raise ValueError(f"Invalid lr: {lr!r} (a finite number >= 0)")
    if not math.isfinite(mu_f) or not 0 <= mu_f < 1:
        raise ValueError(f"Invalid momentum: {momentum!r} (a number in [0, 1))")
    if not math.isfinite(wd_f) or wd_f < 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (a finite number >= 0)")
    return lr_f, mu_f, wd_f


def _local_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Norm of a rank's shards; 0 where they are all empty (a parameter smaller than the mesh)."""
    full = [t for t in tensors if t.numel()]
    if not full:
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    return torch.nn.utils.get_total_norm(full, norm_type)


def _scale_to_norm(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale ``grads`` in place so that their total norm is at most ``max_norm`` (the rule of
    torch.nn.utils.clip_grad_norm_: factor ``max_norm / (norm + 1e-6)`` capped at 1)."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(device=g.device, dtype=g.dtype))


def _check_maximize(value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid maximize: {value!r} (True or False)")


def _from_rho_sigma(rho: Any, sigma: Any) -> tuple[float, float]:
    rho_f, sigma_f = _number("rho", rho), _number("sigma", sigma)
    if not math.isfinite(sigma_f) or sigma_f <= 0:
        raise ValueError(f"Invalid sigma: {sigma!r} (the penalty must be a finite number > 0)")
    if not math.isfinite(rho_f) or rho_f < 0:
        raise ValueError(f"Invalid rho: {rho!r} (the proximal coefficient must be a finite number >= 0)")
    lr, mu = lr_momentum(rho_f, sigma_f)
    if not math.isfinite(lr) or lr <= 0 or not mu < 1:
        raise ValueError(f"Invalid rho/sigma: {rho!r}/{sigma!r} (rho + sigma overflows or rho dwarfs sigma)")
    return lr, mu


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def normalize_weights(weights: Any, sub_batches: int) -> list[float]:
    """Validate this step's sub-batch weights and normalise them to sum 1."""
    if weights is None:
        return [1.0 / sub_batches] * sub_batches
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"weights must be 1-D, got shape {tuple(weights.shape)}")
        if weights.is_complex():
            raise ValueError(f"weights must be real numbers, got a {weights.dtype} tensor")
        weights = weights.detach().cpu().double().tolist()
    if isinstance(weights, (str, bytes, Mapping, Set)):  # iterable, but not a sequence of weights
        raise ValueError(f"weights must be a sequence of {sub_batches} numbers, got {weights!r}")
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a sequence of {sub_batches} numbers, got {weights!r}") from None
    if len(w) != sub_batches:
        raise ValueError(f"expected {sub_batches} weights (one per sub-batch), got {len(w)}")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights must be finite, got {w}")
    if any(x < 0 for x in w):
        raise ValueError(f"weights must be >= 0, got {w}")
    top = max(w)
    if top <= 0:
        raise ValueError(f"weights must not all be zero, got {w}")
    w = [x / top for x in w]  # first scale to [0, 1]: the sum of huge weights must not overflow
    total = sum(w)
    return [x / total for x in w]


@dataclass
class _Plan:
    """What one step works on, decided on the host before any kernel runs."""

    buckets: list[Bucket]
    groups: list[dict[str, Any]]  # each bucket's param group
    grads: list[list[torch.Tensor | None]]
    hypers: list[torch.Tensor]
    weights: list[torch.Tensor]
    devices: list[torch.device]
    flags: dict[torch.device, torch.Tensor]
    check: bool
    recheck_rows: bool
    found_inf: Any
    inv: torch.Tensor | None
    invalid: torch.Tensor | None
    host_decides: bool
    meshes: list[tuple[Any, tuple]]  # (mesh, placements) of the DTensor buckets (FSDP2), in order


class BADM(Optimizer):
    r"""Implements BADM, batch ADMM (Wang, Zhou and Li, arXiv:2407.01640).

    Each batch is split into :math:`S` sub-batches; sub-batch :math:`s` keeps a dual
    :math:`\pi_s`. With :math:`g_s` the gradient of sub-batch :math:`s`'s mean loss at the
    global weights :math:`z` (plus :math:`\lambda z` with weight decay :math:`\lambda`),
    :math:`\alpha_s` this step's normalised sub-batch weights, learning rate :math:`\eta` and
    momentum :math:`\mu`, one step is (the fused form of the paper's primal, dual and aggregation
    steps, docs/algorithm.md):

    .. math::
        \pi_s &\leftarrow \mu\,\pi_s - (1 - \mu)\,g_s \\
        z &\leftarrow z + \eta \sum_s \alpha_s \Big[-2 g_s + \frac{2\mu - 1}{1 - \mu}\,\pi_s^{\text{old}}\Big]

    The paper's penalty :math:`\sigma` and proximal coefficient :math:`\rho` are the same
    hyperparameters in another form: :math:`\eta = 1/(\rho+\sigma)`, :math:`\mu = \rho/(\rho+\sigma)`
    (so :math:`\rho = \mu/\eta`, :math:`\sigma = (1-\mu)/\eta`). Under a constant gradient the
    step equals ``torch.optim.SGD(lr=lr, momentum=momentum)``'s (no dampening); ``momentum=0.5``
    is plain SGD with learning rate :math:`2\eta`.

    The parameters stay the user's tensors. Inside ``with opt.sub_batch(s):`` the gradients of a
    backward pass belong to sub-batch ``s`` (copied into row ``s`` of the optimizer's gradient rows
    when the context ends; ``sub_batch(s, weight=w)`` also gives the sub-batch's weight in the next
    step), and :meth:`step` makes one fused kernel call per (param group, device, dtype) over all
    its parameters.

    Args:
        params (iterable): parameters, ``(name, parameter)`` pairs, or dicts defining parameter
            groups. A parameter with ``requires_grad=False`` gets state when it first has a gradient.
        lr (float or Tensor, optional): learning rate :math:`\eta \ge 0` (default: 0.01). A
            scheduler may drive it; ``lr = 0`` leaves the weights while the duals go on.
        momentum (float or Tensor, optional): :math:`\mu \in [0, 1)` (default: 0.9).
        weight_decay (float, optional): L2 penalty :math:`\lambda \ge 0`, added to every sub-batch's
            gradient inside the fused pass (default: 0).
        maximize (bool, optional): maximise the objective instead (default: False).
        sub_batches (int, optional): :math:`S`, sub-batches per batch (default: 1).
        rho, sigma (float, optional): the paper's form of ``lr``/``momentum`` (not together with
            them); one given alone is completed with the paper form's defaults ``rho=9``, ``sigma=10``.
        backend (str, optional): ``"auto"`` (default), ``"triton"``, ``"cuda"``, ``"cpp"`` or
            ``"torch"``; see :mod:`badm_fast.backends`. :attr:`backend` tells what runs.
        mode (str, optional): ``"sub_batch"`` (default; the paper's form: one dual per
            sub-batch, one backward pass per sub-batch) or ``"merged"``: the exact fast path
            for constant weights — one dual and one backward pass over the whole batch, giving
            the same trajectory with :math:`S` times less state. ``step`` then refuses
            weights that differ from the first step's.
        on_nonfinite (str, optional): what a NaN or infinite gradient does: ``"raise"`` (default)
            refuses the step and raises a RuntimeError naming the parameter and sub-batch (on CUDA
            the step is refused on the device and the error is raised by a later ``step()``,
            ``zero_grad()`` or ``sub_batch()`` once the device has finished that step, or by
            ``state_dict()``, which waits for it: no step waits for the device); ``"skip"``
            refuses the step and counts it in :attr:`skipped_steps`. Weights and duals stay exactly
            as they were. ``"ignore"`` does no check.
        process_group (ProcessGroup, optional): run distributed: every rank of the group holds the
            same weights and its own ``sub_batches`` sub-batches, aggregated with one all-reduce per
            bucket; see :mod:`badm_fast.distributed`.
        overlap (bool, optional): with ``process_group``: start the all-reduce during the backward
            pass of the last local sub-batch (default: False; see :mod:`badm_fast.overlap`). Run that
            backward pass inside ``with opt.sub_batch(sub_batches - 1, weight=w):`` (``sub_batches=1``:
            ``sub_batch(0, ...)``), give every sub-batch's weight to its context (default 1) and call
            ``step()`` without weights; leave the gradients as the backward pass made them until
            ``step()`` (no second backward pass, no clipping after it in that context). A step whose
            early reduction no longer matches (other weights, changed gradients, a GradScaler's new
            scale) is reduced again without overlap, with the same result and a warning. Costs a copy
            of the duals per step (from which a refused step restores them). Every rank must give
            the same ``overlap`` and ``bucket_cap_mb``.
        bucket_cap_mb (float, optional): with ``overlap=True``, the size of the all-reduce buckets
            in MiB (default: 25, the first bucket 1 MiB, like DDP's).
        capturable (bool, optional): capture-safe mode (default: False): every decision of
            :meth:`step` is taken on the device (never a host read), so ``opt.step()`` can be
            captured in a CUDA graph and replayed; ``lr``/``momentum`` may be tensors.

    The defaults ``lr=0.01, momentum=0.9`` are those of the most common ``torch.optim.SGD``
    setting, whose steady-state step BADM then takes; with one sub-batch and constant weights
    BADM is quasi-hyperbolic momentum, and the sub-batch duals are what it adds.

    Mixed precision: ``torch.amp.GradScaler`` works (``scaler.step(opt)``): the gradients of every
    sub-batch are unscaled inside the fused pass and a step with a non-finite gradient is skipped
    on the device without touching any state. Call ``scaler.unscale_(opt)`` only with one
    sub-batch (it unscales the ``.grad`` tensors, i.e. one sub-batch).

    Gradients: a parameter that gets no gradient in any sub-batch of a step is skipped (its
    weights and duals do not change), like torch.optim skips parameters whose ``.grad`` is None;
    one that gets a gradient in some sub-batches only has gradient zero in the others.
    ``model.zero_grad()`` and ``opt.zero_grad()`` clear every sub-batch.
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale/found_inf (see step)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Any = None,
        momentum: Any = None,
        weight_decay: Any = 0.0,
        maximize: bool = False,
        *,
        sub_batches: int = 1,
        rho: Any = None,
        sigma: Any = None,
        backend: str = "auto",
        mode: str = "sub_batch",
        on_nonfinite: str = "raise",
        process_group: Any = None,
        capturable: bool = False,
        overlap: bool = False,
        bucket_cap_mb: float = 25.0,
    ):
        if isinstance(sub_batches, bool) or not isinstance(sub_batches, numbers.Integral) or sub_batches < 1:
            raise ValueError(f"Invalid sub_batches: {sub_batches!r} (an int >= 1)")
        sub_batches = int(sub_batches)
        lr, momentum = self._initial_lr_momentum(lr, momentum, rho, sigma)
        check_hyper(lr, momentum, weight_decay)
        _check_maximize(maximize)
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r}; choose one of {MODES}")
        if on_nonfinite not in NONFINITE:
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r}; choose one of {NONFINITE}")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; choose one of {('auto',) + backends.BACKENDS}")
        if not isinstance(capturable, bool):
            raise ValueError(f"Invalid capturable: {capturable!r} (True or False)")
        if capturable and process_group is not None:
            raise ValueError("capturable=True is not supported with a process_group (the all-reduce step syncs)")
        if process_group is not None:
            distributed.validate_process_group(process_group)
        if not isinstance(overlap, bool):
            raise ValueError(f"Invalid overlap: {overlap!r} (True or False)")
        cap = _number("bucket_cap_mb", bucket_cap_mb)
        if not math.isfinite(cap) or cap <= 0:
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb!r} (a finite number of MiB > 0)")
        if overlap and process_group is None:
            raise ValueError("overlap=True overlaps the all-reduce of a process_group with the backward pass; "
                             "give process_group=... (or leave overlap=False)")
        if overlap and mode == "merged":
            raise ValueError("overlap=True starts the all-reduce inside the last sub-batch's context, which "
                             "mode='merged' does not have; use mode='sub_batch' or overlap=False")
        if isinstance(lr, torch.Tensor) and not capturable:
            if lr.numel() != 1:
                raise ValueError(f"Invalid lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        self.process_group = process_group
        self.capturable = capturable
        self.sub_batches = sub_batches
        self.mode = mode
        self.on_nonfinite = on_nonfinite
        self.requested_backend = backend
        self._rows = 1 if mode == "merged" else sub_batches
        self._backend: dict[str, str] = {}  # device type -> back-end name
        self._fns: dict[str, tuple[Callable[..., None], ...]] = {}
        self._records: dict[int, GradRecord] = {}  # id(param) -> gradient rows (R > 1)
        self._layout: list[list[Bucket]] | None = None
        self._inactive: list[list[torch.Tensor]] = []  # per group: parameters without state yet
        self._active_row: int | None = None
        self._step_count = 0
        self._skipped = 0
        self._skipped_dev: dict[torch.device, torch.Tensor] = {}
        self._pending: list[tuple[Any, torch.Tensor, Any]] = []  # refused CUDA steps to report
        self._sub_weights: list[float | None] = [None] * sub_batches  # sub_batch(s, weight=w) of this step
        self.overlap = overlap
        self.bucket_cap_mb = cap
        self._overlap = _overlap.Overlap(self, cap) if overlap else None
        self._no_overlap = False  # set by split_step while it clips after the backward passes
        self._merged_alpha: list[float] | None = None
        self._last_alpha: list[float] | None = None
        self._weights_cache: dict[tuple, torch.Tensor] = {}
        self._hyper_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, tuple]] = {}
        self._flags: dict[torch.device, torch.Tensor] = {}  # per device: this step's refusal flag
        self._rows_fresh = True  # gradient rows cleared since the last step (their checks are complete)
        self._device_alpha: torch.Tensor | None = None
        self.residuals: dict[str, torch.Tensor] | None = None
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        self._buckets()  # resolves the back ends now: an unavailable one is refused at construction
        if process_group is not None:  # same layout and weights on every rank, or RuntimeError on all
            distributed.check_replicas(self)

    @staticmethod
    def _initial_lr_momentum(lr: Any, momentum: Any, rho: Any, sigma: Any) -> tuple[Any, Any]:
        if rho is not None or sigma is not None:
            if lr is not None or momentum is not None:
                raise ValueError(
                    "give either lr/momentum or rho/sigma, not both (lr = 1/(rho+sigma), momentum = rho/(rho+sigma))"
                )
            # the paper form's own defaults fill the one not given (rho = 9, sigma = 10)
            return _from_rho_sigma(9.0 if rho is None else rho, 10.0 if sigma is None else sigma)
        return (0.01 if lr is None else lr), (0.9 if momentum is None else momentum)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if ("rho" in group) or ("sigma" in group):
            if "lr" in group or "momentum" in group:
                raise ValueError("a param group gives either lr/momentum or rho/sigma, not both")
            rho0, sigma0 = rho_sigma(_number("lr", self.defaults["lr"]), _number("momentum", self.defaults["momentum"]))
            group["lr"], group["momentum"] = _from_rho_sigma(group.pop("rho", rho0), group.pop("sigma", sigma0))
        for p in group["params"]:
            if isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], torch.Tensor):
                continue  # (name, parameter): checked by the base class
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(p).__name__}")
        for key in _HYPER_KEYS:
            if key in group:
                continue
            group[key] = self.defaults[key]
        check_hyper(group["lr"], group["momentum"], group["weight_decay"])
        _check_maximize(group["maximize"])
        super().add_param_group(group)  # checks duplicates, fills defaults, records param_names
        added = self.param_groups[-1]
        try:
            for p in added["params"]:
                self._check_param(p)
        except Exception:
            self.param_groups.pop()
            raise
        inactive = []
        for p in added["params"]:
            if p.requires_grad:
                self._init_state(p)
            else:
                inactive.append(p)
        self._inactive.append(inactive)
        self._layout = None
        if hasattr(self, "_backend") and len(self.param_groups) > 1:  # after construction: resolve now
            try:
                self._buckets()
            except Exception:
                for p in added["params"]:
                    self.state.pop(p, None)
                    self._records.pop(id(p), None)
                self.param_groups.pop()
                self._inactive.pop()
                self._layout = None
                raise

    def _check_param(self, p: torch.Tensor) -> None:
        if p.dtype not in SUPPORTED_DTYPES and not p.is_complex():
            raise ValueError(f"BADM supports {[str(d) for d in SUPPORTED_DTYPES]} parameters, got {p.dtype}")
        if p.is_complex() and torch.view_as_real(p.detach()).dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"BADM supports complex parameters of real dtypes {SUPPORTED_DTYPES}, got {p.dtype}")
        if not p.is_leaf:
            raise ValueError("can't optimize a non-leaf Tensor")
        if self.process_group is not None and is_dtensor(p):
            raise ValueError(
                "process_group is for parameters replicated on every rank; DTensor parameters (FSDP2's fully_shard) "
                "are stepped on their local shards without it: construct BADM without process_group"
            )
        if not is_dense(local(p)):
            raise ValueError(
                f"BADM needs parameters whose elements are dense in memory, got shape {tuple(p.shape)} with "
                f"strides {p.stride()}"
            )

    def _init_state(self, p: torch.Tensor) -> None:
        """Zero duals (and gradient rows for R > 1) for ``p``."""
        base = torch.view_as_real(p.detach()) if p.is_complex() else p
        self.state[p] = {"duals": alloc_like(base, self._rows, compute_dtype(base.dtype))}
        if self._rows > 1:
            self._records[id(p)] = GradRecord(alloc_like(base, self._rows, base.dtype), self._rows)

    # ------------------------------------------------------------------ layout
    def _buckets(self) -> list[list[Bucket]]:
        if self._layout is None:
            self._layout = [self._group_buckets(g) for g in self.param_groups]
            for bufs in self._layout:
                for b in bufs:
                    if b.device.type not in self._backend:
                        name = backends.resolve(self.requested_backend, b.device.type)
                        self._backend[b.device.type] = name
                        self._fns[b.device.type] = backends.get(name)
            if self.capturable:
                devices = {b.device for bufs in self._layout for b in bufs}
                if len(devices) > 1:
                    raise ValueError(
                        f"capturable=True needs every parameter on one device, got {sorted(map(str, devices))}"
                    )
        return self._layout

    def _group_buckets(self, group: dict[str, Any]) -> list[Bucket]:
        by_key: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}
        for k, p in enumerate(group["params"]):
            if p not in self.state:
                continue
            entry = by_key.setdefault(bucket_key(p), ([], []))
            entry[0].append(p)
            entry[1].append(k)
        records = self._records if self._rows > 1 else None
        return [Bucket(ps, idx, self.state, records, self._rows) for ps, idx in by_key.values()]

    def _all_buckets(self) -> Iterable[Bucket]:
        for bufs in self._buckets():
            yield from bufs

    def _activate_new(self) -> None:
        """Give state to parameters that had none and now have a gradient (unfrozen ones)."""
        for inactive in self._inactive:
            for p in [p for p in inactive if p.grad is not None]:
                self._activate(p)

    def _activate(self, p: torch.Tensor) -> None:
        """Fresh zero state for ``p`` (one without state, or whose state no longer fits it)."""
        self._check_param(p)
        self._init_state(p)
        for inactive in self._inactive:
            inactive[:] = [q for q in inactive if q is not p]
        self._layout = None

    def _revalidate(self) -> None:
        """Compare every parameter with its state: before the first step, a parameter that was
        moved or cast (``model.to(...)``, ``.double()``) gets fresh zero state; after it, that is
        an error (its duals belong to the old tensor)."""
        changed = False
        for g, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                st = self.state.get(p)
                if st is None:
                    continue
                d = local(st["duals"])
                t = kernel_view(p)
                ok = d.device == t.device and d.dtype == compute_dtype(t.dtype) and tuple(d.shape[1:]) == tuple(t.shape)
                ok = ok and (d.dim() < 2 or d[0].stride() == t.stride() or t.numel() <= 1)
                if ok:
                    continue
                if self._step_count > 0:
                    raise RuntimeError(
                        f"parameter {k} of param group {g} changed to shape {tuple(t.shape)}, {t.dtype}, {t.device} "
                        f"after the first step (its duals are {tuple(d.shape[1:])}, {d.dtype}, {d.device}); "
                        "move or cast "
                        "the model before the first step, or load a state_dict saved for the new layout"
                    )
                self._activate(p)
                changed = True
        if changed:
            self._weights_cache.clear()
            self._hyper_cache.clear()

    @property
    def backend(self) -> str | dict[str, str]:
        """The back end that runs the fused step (a dict by device type if they differ)."""
        self._buckets()
        names = dict(self._backend)
        if len(set(names.values())) == 1:
            return next(iter(names.values()))
        return names if names else backends.resolve(self.requested_backend, "cpu")

    # ------------------------------------------------------------------ gradients
    @contextlib.contextmanager
    def sub_batch(self, s: int, weight: Any = None):
        """Gradients of backward passes inside this context belong to sub-batch ``s``.

        With several sub-batches, ``p.grad`` inside the context is this sub-batch's gradient
        (clip or inspect it there); when the context ends it is copied into row ``s``.

        ``weight`` (optional, a finite number >= 0, e.g. the sub-batch's size): sub-batch ``s``'s
        weight in the next step, used when :meth:`step` is called without ``weights`` (the
        sub-batches given none weigh 1). With ``overlap=True`` the context of the last sub-batch
        (``s = sub_batches - 1``) starts the all-reduce during its backward pass, with these weights.
        """
        if self.mode == "merged":
            raise ValueError(
                "mode='merged' takes one backward pass over the whole batch; sub_batch() is for mode='sub_batch'"
            )
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < self.sub_batches:
            raise ValueError(f"sub-batch index {s!r} out of range [0, {self.sub_batches})")
        if weight is not None:
            weight = _number("weight", weight)
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"Invalid weight: {weight!r} (a finite number >= 0)")
        if self._active_row is not None:
            raise RuntimeError(f"already inside sub_batch({self._active_row}); contexts do not nest")
        s = int(s)
        before = self._sub_weights[s]
        ovl = self._overlap if s == self.sub_batches - 1 and not self._no_overlap else None
        rows = self._rows > 1  # several rows: .grad starts empty and is copied into row s at the end
        if rows:
            self._report_pending()
            if self._step_count == 0 or not self._native:
                self._revalidate()  # a model moved or cast before the first step gets fresh state now
            self._sync_grads()
            for p in self._managed():
                p.grad = None
        self._active_row = s
        if weight is not None:
            self._sub_weights[s] = weight
        if ovl is not None:
            ovl.arm()
        try:
            yield self
        except BaseException:
            if rows:
                for p in self._managed():  # a failed sub-batch leaves its row as it was
                    p.grad = None
                for b in self._all_buckets():
                    for rec in b.records:
                        rec.left = None
            self._sub_weights[s] = before
            if ovl is not None:
                ovl.abort("the last sub-batch's context raised")
            raise
        finally:
            self._active_row = None
            if ovl is not None:
                ovl.disarm()
        if not rows:  # one sub-batch: .grad is its gradient
            return
        if ovl is not None:
            ovl.before_absorb()
        self._absorb(s)
        if ovl is not None:
            ovl.after_absorb()

    def _context_raw_weights(self) -> list[float]:
        """The step's weights as the sub-batches' contexts gave them (1 for those given none)."""
        return [1.0 if w is None else w for w in self._sub_weights]

    def sub_batch_grad(self, p: torch.Tensor, s: int) -> torch.Tensor | None:
        """Sub-batch ``s``'s gradient of parameter ``p`` as the next step will use it (a view: writing
        to it changes it), or None when ``p`` has none in any sub-batch. With one row, ``p.grad``."""
        if self._rows == 1:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s != 0:
                raise ValueError(f"sub-batch index {s!r} out of range [0, 1) (one gradient row)")
            return p.grad
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < self._rows:
            raise ValueError(f"sub-batch index {s!r} out of range [0, {self._rows})")
        rec = self._records.get(id(p))
        if rec is None:
            raise ValueError(f"parameter of shape {tuple(p.shape)} has no gradient rows in this optimizer")
        self._sync_grads()
        self._prepare_rows()
        if not any(rec.state):
            return None
        self._rows_fresh = False  # the caller may write into the row: check the rows again at the step
        return rec.rows[s]

    def _managed(self) -> Iterable[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _flag(self, device: torch.device) -> torch.Tensor:
        f = self._flags.get(device)
        if f is None:
            f = torch.zeros(1, dtype=torch.float32, device=device)
            self._flags[device] = f
        return f

    def _check(self) -> bool:
        return self.on_nonfinite != "ignore"

    @torch.no_grad()
    def _absorb(self, s: int) -> None:
        """Copy every ``p.grad`` of sub-batch ``s`` into row ``s`` (checking it in the same read)."""
        self._activate_new()
        check = self._check()
        for b in self._all_buckets():
            grads = b.grads()
            n = len(grads)
            fresh: list[torch.Tensor | None] = []
            again = []
            for i, (g, rec) in enumerate(zip(grads, b.records)):
                if g is not None and rec.state[s] == 1:
                    again.append(i)
                    fresh.append(None)
                else:
                    fresh.append(g)
            dst = b.grad_rows[s * n : (s + 1) * n]
            if any(g is not None for g in fresh):
                if not all(d.stride() == g.stride() for d, g in zip(dst, fresh) if g is not None):
                    fresh = [self._like(d, g) for d, g in zip(dst, fresh)]
                flag = self._flag(b.device) if check else None
                if torch.compiler.is_compiling():
                    _ops.copy_check(dst, fresh, flag, self._backend[b.device.type])
                else:
                    self._fns[b.device.type][2](dst, fresh, flag)
            if again:  # a second context for the same sub-batch: accumulate
                torch._foreach_add_([dst[i] for i in again], [grads[i] for i in again])
                if check:
                    self._fns[b.device.type][1]([dst[i] for i in again], self._flag(b.device))
            for p, g, rec in zip(b.params, grads, b.records):
                if g is not None:
                    rec.state[s] = 1
                rec.left = p.grad
                rec.left_version = p.grad._version if p.grad is not None else 0

    @staticmethod
    def _like(d: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor | None:
        """``g`` in the memory layout of ``d`` (a gradient assigned with other strides)."""
        if g is None or g.stride() == d.stride():
            return g
        out = torch.empty_like(d)
        out.copy_(g)
        return out

    def _sync_grads(self) -> None:
        """With several sub-batches, take in what happened to ``.grad`` since the last sub-batch
        ended: ``model.zero_grad()`` (None) clears the parameter's rows; an in-place zeroing
        (``zero_grad(set_to_none=False)``) zeroes them; any other change is refused, because it
        would reach one sub-batch only."""
        for b in self._all_buckets():
            for k, p, rec in zip(b.index, b.params, b.records):
                g = p.grad
                if g is rec.left:
                    if g is None or g._version == rec.left_version:
                        continue
                    if not bool((g == 0).all()):
                        raise RuntimeError(self._changed_message(k, p, "was modified in place"))
                    rec.state = [2] * self._rows
                    rec.left_version = g._version
                elif g is None:
                    rec.state = [0] * self._rows
                    rec.left = None
                else:
                    raise RuntimeError(self._changed_message(k, p, "was assigned"))

    def _changed_message(self, k: int, p: torch.Tensor, what: str) -> str:
        return (
            f"BADM(sub_batches={self.sub_batches}): the .grad of parameter {k} (shape {tuple(p.shape)}) {what} "
            "outside `with opt.sub_batch(s):` — by a backward pass outside any sub-batch, an assignment, or an "
            "in-place edit such as clip_grad_norm_ after the last sub-batch — which would reach one sub-batch only. "
            "Run each sub-batch's backward and clipping inside its context, use opt.clip_grad_norm_(max_norm) or "
            "opt.set_grads(s, params, grads), and clear gradients with opt.zero_grad() or model.zero_grad()"
        )

    def set_grads(self, s: int, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Write the gradients of sub-batch ``s`` directly (as if its backward pass had run
        inside ``sub_batch(s)``), e.g. gradients computed by ``torch.func``."""
        rows = self._rows
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < rows:
            raise ValueError(f"sub-batch index {s!r} out of range [0, {rows})")
        params, grads = list(params), list(grads)
        if len(params) != len(grads):
            raise ValueError(f"got {len(params)} parameters but {len(grads)} gradients")
        managed = {id(p) for p in self._managed()}
        for p, g in zip(params, grads):  # check everything before writing anything
            if id(p) not in managed:
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not managed by this optimizer")
            if not isinstance(g, torch.Tensor):
                raise ValueError(f"gradient must be a tensor, got {type(g).__name__}")
            if g.is_sparse:
                raise RuntimeError(
                    f"BADM does not support sparse gradients (shape {tuple(p.shape)}); use a dense layer "
                    "(e.g. nn.Embedding(sparse=False))"
                )
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")
        with torch.no_grad():
            if rows == 1:
                for p, g in zip(params, grads):
                    out = torch.empty_like(p)
                    out.copy_(g.detach())
                    p.grad = out
                return
            for p in params:
                if p not in self.state:
                    self._activate(p)
            self._sync_grads()
            where = {id(p): rec for b in self._all_buckets() for p, rec in zip(b.params, b.records)}
            for p, g in zip(params, grads):
                rec = where[id(p)]
                row = local(rec.rows)[s]
                row.copy_(g.detach())
                if self._check():
                    self._fns[row.device.type][1]([row], self._flag(row.device))
                rec.state[s] = 1

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every sub-batch (``p.grad`` is None, or zero)."""
        self._report_pending()
        for p in self._managed():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()
        if self._rows > 1 and self._layout is not None:
            for b in self._layout:
                for bucket in b:
                    for p, rec in zip(bucket.params, bucket.records):
                        rec.state = [0 if set_to_none else 2] * self._rows
                        rec.left = p.grad
                        rec.left_version = p.grad._version if p.grad is not None else 0
        for f in self._flags.values():
            f.zero_()
        self._rows_fresh = True
        self._sub_weights = [None] * self.sub_batches

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradient of every sub-batch to ``max_norm`` (over all parameters of this
        optimizer, like ``torch.nn.utils.clip_grad_norm_`` does for one gradient); returns the
        norms before clipping, one per sub-batch (shape ``(S,)``; ``(1,)`` with one row)."""
        max_norm = _number("max_norm", max_norm)
        if self._rows == 1:
            grads = [p.grad for p in self._managed() if p.grad is not None]
            if not grads:
                return torch.zeros(1)
            entries = [(local(g), g.device_mesh, tuple(g.placements)) if is_dtensor(g) else (g, None, None)
                       for g in grads]
            return self._clip(entries, max_norm, norm_type).reshape(1)
        self._sync_grads()
        self._prepare_rows()
        norms = []
        for s in range(self._rows):
            entries = [(local(rec.rows)[s], b.mesh, b.placements)
                       for b in self._all_buckets() for rec in b.records if any(rec.state)]
            if not entries:
                norms.append(torch.zeros((), dtype=torch.float32))
                continue
            norms.append(self._clip(entries, max_norm, norm_type).to(entries[0][0].device))
        return torch.stack([n.to(norms[0].device) for n in norms])

    @staticmethod
    def _clip(entries: list[tuple[torch.Tensor, Any, Any]], max_norm: float, norm_type: float) -> torch.Tensor:
        """Total norm of ``(tensor, mesh, placements)`` entries (mesh None: a plain tensor; else the
        local shard of a DTensor, its partial norms reduced over the mesh), then scale them to it."""
        tensors = [t for t, _, _ in entries]
        if all(mesh is None for _, mesh, _ in entries):
            norm = torch.nn.utils.get_total_norm(tensors, norm_type)
        else:
            by_mesh: dict[tuple, list[torch.Tensor]] = {}
            for t, mesh, placements in entries:  # parameter order: the same collectives on every rank
                by_mesh.setdefault((mesh, placements), []).append(t)
            norm = distributed.sharded_total_norm(
                [(_local_norm(ts, norm_type), m, pl) for (m, pl), ts in by_mesh.items()], norm_type
            )
        _scale_to_norm(tensors, max_norm, norm)
        return norm

    @torch.no_grad()
    def _prepare_rows(self) -> None:
        """Zero the rows that hold no gradient of a parameter that has one in some row."""
        for b in self._all_buckets():
            for rec in b.records:
                st = rec.state
                if all(x == 1 for x in st) or not any(st):
                    continue
                rows = local(rec.rows)
                for r, x in enumerate(st):
                    if x != 1:
                        rows[r].zero_()
                        st[r] = 1

    # ------------------------------------------------------------------ step
    @property
    def skipped_steps(self) -> int:
        """Steps refused so far (a non-finite gradient, GradScaler's found_inf, invalid device weights).
        Reading it synchronises with devices that decided on their own."""
        return self._skipped + sum(int(t.item()) for t in self._skipped_dev.values())

    @property
    def skipped_steps_tensor(self) -> torch.Tensor:
        """Steps refused on the device, a 0-dim int64 tensor on the parameters' device (no host
        synchronisation to keep it); steps refused by a host decision count in :attr:`skipped_steps`."""
        device = next(iter(b.device for b in self._all_buckets()), torch.device("cpu"))
        return self._skipped_counter(device)

    def _skipped_counter(self, device: torch.device) -> torch.Tensor:
        t = self._skipped_dev.get(device)
        if t is None:
            t = torch.zeros((), dtype=torch.int64, device=device)
            self._skipped_dev[device] = t
        return t

    def _weights_tensor(self, alpha: Sequence[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(alpha), device, dtype)
        t = self._weights_cache.get(key)
        if t is None:
            if _capturing(device):
                raise RuntimeError(
                    f"step(weights=...) got host weights {list(alpha)} while a CUDA graph is being captured; the "
                    "graph would replay a copy of them. Pass a float device tensor of shape "
                    f"({self.sub_batches},) with capturable=True and update it in place before each replay"
                )
            if len(self._weights_cache) > 64:
                self._weights_cache.clear()
            t = torch.tensor(alpha, dtype=dtype, device=device)
            self._weights_cache[key] = t
        return t

    def _step_alpha(self, weights: Any) -> list[float]:
        """This step's normalised weights (validated; merged mode: the same at every step)."""
        alpha = normalize_weights(weights, self.sub_batches)
        if self.mode == "merged" and self._merged_alpha is not None:
            if any(abs(a - b) > 1e-12 for a, b in zip(alpha, self._merged_alpha)):
                raise ValueError(
                    "mode='merged' requires the same sub-batch weights at every step (its exactness rests on "
                    f"constant weights); got {alpha}, earlier {self._merged_alpha}. Use mode='sub_batch' for "
                    "ragged or re-weighted batches"
                )
        return alpha

    def _group_hyper(self, g: int, group: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The group's ``[lr, momentum, weight_decay, maximize]`` in a float64 tensor on ``device``,
        rewritten only when a value changed (tensor values are copied on the device, every step).
        Values are validated first; an invalid one raises and leaves the group as it was."""
        if "rho" in group or "sigma" in group:  # written in the paper's form: honoured
            cur_rho, cur_sigma = rho_sigma(_number("lr", group["lr"]), _number("momentum", group["momentum"]))
            lr, mu = _from_rho_sigma(group.get("rho", cur_rho), group.get("sigma", cur_sigma))
            group.pop("rho", None)
            group.pop("sigma", None)
            group["lr"], group["momentum"] = lr, mu
        key = (g, device)
        raw = tuple(group[k] for k in _HYPER_KEYS)
        tensors = any(isinstance(v, torch.Tensor) for v in raw)
        cached = self._hyper_cache.get(key)
        if cached is not None and not tensors and cached[1] == raw:
            return cached[0]
        _check_maximize(raw[3])
        if not (tensors and self.capturable):  # a capture-safe step never reads a tensor on the host
            check_hyper(*raw[:3])
        values = tuple(v if isinstance(v, torch.Tensor) else float(v) for v in raw)
        t = cached[0] if cached is not None else torch.zeros(4, dtype=torch.float64, device=device)
        if tensors:
            for i, v in enumerate(values):
                if isinstance(v, torch.Tensor):
                    t[i].copy_(v.detach().reshape(()))
                else:
                    t[i].fill_(v)
        else:
            if _capturing(device):
                raise RuntimeError(
                    f"lr/momentum/weight_decay of param group {g} changed since the last step outside the CUDA graph "
                    "capture; a write during capture would be replayed and pin the value. Run opt.step() once "
                    "before capturing, or give lr/momentum as tensors (capturable=True) and update them in place"
                )
            t.copy_(torch.tensor(values, dtype=torch.float64))
        self._hyper_cache[key] = (t, raw)
        return t

    def _device_weights(self, weights: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Capture-safe weights: normalised on the device; returns a 0-dim bool 'invalid' tensor."""
        S = self.sub_batches
        if weights.shape != (S,) or not weights.is_floating_point():
            raise ValueError(
                f"weights as a device tensor must be a floating-point tensor of shape ({S},), got "
                f"{tuple(weights.shape)} {weights.dtype}"
            )
        if self._device_alpha is None:
            self._device_alpha = torch.full((S,), 1.0 / S, dtype=torch.float64, device=device)
        w = weights.detach().to(torch.float64)
        total = w.sum()
        invalid = ~(torch.isfinite(w).all() & (w >= 0).all() & (total > 0))
        self._device_alpha.copy_(torch.where(invalid, self._device_alpha, w / torch.where(invalid, 1.0, total)))
        return invalid

    def _report_pending(self, wait: bool = False) -> None:
        """Raise for a step refused on the device with on_nonfinite="raise" (reported at a later
        host-side call, so that no step waits for the device): a refusal whose step has finished on
        the device is raised now; one still running stays pending (``wait=True`` waits for it)."""
        if not self._pending:
            return
        still = []
        for event, host_flag, where in self._pending:
            if event is not None and not wait and not event.query() and len(self._pending) <= 8:
                still.append((event, host_flag, where))
                continue
            if event is not None:
                event.synchronize()
            if float(host_flag[0]) != 0:
                self._pending = []
                raise RuntimeError(
                    f"an earlier step was refused: a non-finite gradient {where}; weights and duals are "
                    "unchanged by it (BADM(..., on_nonfinite='skip') skips such steps without raising)"
                )
        self._pending = still

    def _locate_nonfinite(self) -> str:
        for b in self._all_buckets():
            g_idx = next(i for i, bufs in enumerate(self._buckets()) if b in bufs)
            if b.grad_rows is not None:
                n = len(b.params)
                for r in range(self._rows):
                    for i, k in enumerate(b.index):
                        if not bool(torch.isfinite(b.grad_rows[r * n + i]).all()):
                            shape = tuple(b.params[i].shape)
                            return f"in parameter {k} of param group {g_idx} (shape {shape}), sub-batch {r}"
            else:
                for i, (k, g) in enumerate(zip(b.index, b.grads())):
                    if g is not None and not bool(torch.isfinite(g).all()):
                        shape = tuple(b.params[i].shape)
                        return f"in parameter {k} of param group {g_idx} (shape {shape}), sub-batch 0"
        if any(b.dtensor for b in self._all_buckets()):
            return "in a shard held by another rank"
        return "(the gradients overflowed the step's arithmetic)"

    def step(self, closure: Callable[[], Any] | None = None, *, weights: Any = None, residuals: bool = False):
        r"""Performs one BADM step: updates every dual and aggregates into the weights.

        Args:
            closure (Callable, optional): re-evaluates the model (running the sub-batches'
                backward passes) and returns the loss.
            weights (sequence of float or Tensor, optional): this step's sub-batch weights,
                e.g. the sub-batch sizes; normalised to sum 1 (default: those given to
                ``sub_batch(s, weight=w)``, 1 for the others; without any: equal). With
                ``capturable=True`` a float tensor on the parameters' device is read there.
            residuals (bool, optional): also compute, in the same pass, the primal residual
                :math:`\sqrt{\sum_s \alpha_s \|w_s' - z\|^2}` and the dual residual
                :math:`\sigma \|z' - z\|` over all parameters; stored in :attr:`residuals`
                as 0-dim float64 tensors on the parameters' device (no host synchronisation).
        """
        if self._overlap is not None:
            try:
                return self._step_impl(closure, weights, residuals)
            except BaseException:
                self._overlap.abort("step() raised before it finished")
                raise
        return self._step_impl(closure, weights, residuals)

    def _step_impl(self, closure: Callable[[], Any] | None, weights: Any, residuals: bool):
        self._report_pending()
        device_weights = (
            self.capturable and isinstance(weights, torch.Tensor) and weights.device == self._param_device()
        )
        given = weights is not None
        alpha = None if device_weights or not given else self._step_alpha(weights)  # refused before the closure
        if device_weights and self.mode == "merged":
            raise ValueError(
                "mode='merged' checks on the host that the weights stay constant; pass them as a list, or use "
                "mode='sub_batch' for weights in a device tensor"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not given:  # the weights given to the sub-batches' contexts, if any (the closure may have run them)
            if any(w is not None for w in self._sub_weights):
                weights = self._context_raw_weights()
            alpha = self._step_alpha(weights)
        self._raw_step_weights = weights
        try:
            ran = self._step(alpha, weights if device_weights else None, residuals)
        finally:
            self._clear_sub_weights()
        self._record_step(alpha, ran)
        return loss

    @_ops.not_traced
    def _clear_sub_weights(self) -> None:
        self._sub_weights = [None] * self.sub_batches

    def _param_device(self) -> torch.device | None:
        for b in self._all_buckets():
            return b.device
        return None

    @_ops.not_traced
    def _prepare(self) -> list[list[Bucket]]:
        """Host bookkeeping before a step: new, moved or cast parameters; gradient rows."""
        self._activate_new()
        if self._step_count == 0 or not self._native:  # compiled back ends check the layout themselves
            self._revalidate()
        layout = self._buckets()
        for bufs in layout:
            for b in bufs:
                if b.dtensor or b.complex:  # views of the parameters' current local tensors
                    b.locals = [kernel_view(p) for p in b.params]
                t = b.locals[0]
                if t.dtype != b.dtype or t.device != b.device:  # a model cast or moved since the layout was made
                    self._layout = None
                    self._revalidate()
                    return self._prepare()
        if self._rows > 1:
            self._sync_grads()
            self._prepare_rows()
        return layout

    def _step(self, alpha: list[float] | None, device_weights: torch.Tensor | None, residuals: bool) -> bool:
        """The one step loop of every mode (host-checked, capture-safe, compiled, distributed).
        Returns False when the step was refused by a host decision."""
        plan = self._plan(alpha, device_weights)
        with torch.no_grad():
            if self._overlap is not None:  # the all-reduces started during the backward pass, or now
                sums = self._overlap.step(plan, residuals)
            else:
                self._raise_flags(plan)
                sums = self._fused_pass(plan, residuals)
        return self._decide(plan, sums, residuals)

    @_ops.not_traced  # host bookkeeping and validation: runs eagerly, so no value here is a graph constant
    def _plan(self, alpha: list[float] | None, device_weights: torch.Tensor | None) -> _Plan:
        layout = self._prepare()
        found_inf_in = getattr(self, "found_inf", None)  # set by GradScaler.step around our step()
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf_in is not None and grad_scale is None and self._rows > 1:
            raise RuntimeError(
                "scaler.unscale_(opt) unscales only the .grad tensors, i.e. one sub-batch; with "
                "sub_batches > 1 let scaler.step(opt) unscale all rows (do not call scaler.unscale_)"
            )
        check = self._check()
        if self.process_group is not None and self._overlap is None and not (check or found_inf_in is not None):
            distributed.agree(self, {})  # the layout check after add_param_group
        buckets = [b for bufs in layout for b in bufs]
        devices = sorted({b.device for b in buckets}, key=str)
        # every group's hyperparameters, validated before anything changes
        groups = [group for group, bufs in zip(self.param_groups, layout) for _ in bufs]
        hypers = [self._group_hyper(g, group, b.device)
                  for g, (group, bufs) in enumerate(zip(self.param_groups, layout)) for b in bufs]
        if not self._native:
            for b in buckets:
                self._check_grads(b)
        invalid = None
        if device_weights is not None:
            invalid = self._device_weights(device_weights, devices[0] if devices else device_weights.device)
        flags: dict[torch.device, torch.Tensor] = {}
        if check or found_inf_in is not None or invalid is not None:
            for d in devices:
                f = self._flag(d)
                if self._rows == 1:
                    f.zero_()
                flags[d] = f
        inv = None
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal().float().reshape(1)
        weights = [self._kernel_weights(alpha, b) for b in buckets]
        return _Plan(
            buckets=buckets,
            groups=groups,
            grads=[b.grads() if b.grad_rows is None else self._row_grads(b) for b in buckets],
            hypers=hypers,
            weights=weights,
            devices=devices,
            flags=flags,
            check=check,
            recheck_rows=self._rows > 1 and not self._rows_fresh,
            found_inf=found_inf_in,
            inv=inv,
            invalid=invalid,
            host_decides=not self.capturable and (len(devices) > 1 or all(d.type == "cpu" for d in devices)),
            meshes=list(dict.fromkeys((b.mesh, b.placements) for b in buckets if b.dtensor)),
        )

    def _raise_flags(self, plan: _Plan) -> None:
        """The refusal flag of each device: non-finite gradients, GradScaler's found_inf, invalid
        device weights; all read on the device."""
        if not plan.flags:
            return
        if plan.check:
            for b, grads in zip(plan.buckets, plan.grads):
                if self._rows == 1:
                    self._nonfinite(b, grads, plan.flags[b.device])
                elif plan.recheck_rows:  # rows carried over from an earlier step: check them again
                    self._nonfinite(b, b.grad_rows, plan.flags[b.device])
        extra = None
        if isinstance(plan.found_inf, torch.Tensor):
            extra = plan.found_inf.reshape(-1)[:1].to(torch.float32)
        elif plan.found_inf:
            extra = torch.ones(1)
        if plan.invalid is not None:
            inv_f = plan.invalid.reshape(1).to(torch.float32)
            extra = inv_f if extra is None else torch.maximum(extra.to(inv_f.device), inv_f)
        if extra is not None:
            for d, f in plan.flags.items():
                f.copy_(torch.maximum(f, extra.to(d)))
        if self.process_group is not None:
            distributed.agree(self, plan.flags)
        for mesh, placements in plan.meshes:  # FSDP2: the ranks holding the shards decide together
            for f in plan.flags.values():
                distributed.mesh_reduce_(f, mesh, placements, "max")
        if plan.host_decides and len(plan.flags) > 1:
            self._one_decision(plan.flags)

    @_ops.not_traced
    def _one_decision(self, flags: dict[torch.device, torch.Tensor]) -> None:
        """Parameters on several devices: one refusal for all of them (a host read)."""
        bad = any(float(f[0]) != 0 for f in flags.values())
        for f in flags.values():
            f.fill_(1.0 if bad else 0.0)

    def _nonfinite(self, b: Bucket, tensors: list, flag: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            _ops.nonfinite_check(tensors, flag, self._backend[b.device.type])
        else:
            self._fns[b.device.type][1](tensors, flag)

    def _fused_pass(self, plan: _Plan, residuals: bool) -> torch.Tensor | None:
        """One kernel call per bucket; returns the residual sums ``[primal^2, dual^2]`` if asked."""
        sums = None
        for b, group, grads, hyper, w in zip(plan.buckets, plan.groups, plan.grads, plan.hypers, plan.weights):
            res = torch.zeros(2, dtype=torch.float64, device=b.device) if residuals else None
            flag = plan.flags.get(b.device)
            inv_b = plan.inv.to(b.device) if plan.inv is not None else None
            if self.process_group is not None:
                distributed.bucket_step(self, b, group, grads, hyper, res, flag, inv_b)
            else:
                self._run_kernel(b, grads, w, hyper, res, flag, inv_b)
            if residuals:
                lr, mu = hyper[0], hyper[1]
                sigma = torch.where(lr > 0, (1.0 - mu) / torch.where(lr > 0, lr, 1.0), 0.0)
                part = torch.stack((res[0], res[1] * sigma * sigma))
                if b.dtensor:  # the shards' partial sums
                    distributed.mesh_reduce_(part, b.mesh, b.placements, "sum")
                sums = part if sums is None else sums + part.to(sums.device)
        return sums

    @_ops.not_traced  # reads the flags on the host (CPU) or queues their report (CUDA)
    def _decide(self, plan: _Plan, sums: torch.Tensor | None, residuals: bool) -> bool:
        ran = True
        own_check = plan.found_inf is None and plan.invalid is None
        if plan.flags:
            if plan.host_decides:
                if any(float(f[0]) != 0 for f in plan.flags.values()):
                    ran = False
                    if not (self.on_nonfinite == "raise" and own_check):
                        self._skipped += 1
                    if self.on_nonfinite == "raise" and own_check:
                        where = self._locate_nonfinite()
                        self._rows_fresh = False
                        if self.process_group is not None:
                            raise RuntimeError(distributed.refusal_message(self, where))
                        raise RuntimeError(
                            f"non-finite gradient {where}; the step was refused and weights and duals are "
                            "unchanged (BADM(..., on_nonfinite='skip') skips such steps instead)"
                        )
            else:
                for d, f in plan.flags.items():
                    self._skipped_counter(d).add_((f != 0).sum())
                if self.on_nonfinite == "raise" and own_check and not self.capturable:
                    for d, f in plan.flags.items():
                        host = torch.empty(1, dtype=torch.float32, pin_memory=d.type == "cuda")
                        host.copy_(f, non_blocking=True)
                        event = torch.cuda.Event() if d.type == "cuda" else None
                        if event is not None:
                            event.record()
                        self._pending.append((event, host, f"on {d}"))
        if residuals:
            if sums is None:
                sums = torch.zeros(2, dtype=torch.float64, device=plan.devices[0] if plan.devices else "cpu")
            self.residuals = {"primal": sums[0].sqrt(), "dual": sums[1].sqrt()}
        self._rows_fresh = False
        return ran

    def _kernel_weights(self, alpha: list[float] | None, b: Bucket) -> torch.Tensor:
        if self._rows == 1:
            return self._weights_tensor((1.0,), b.device, b.compute_dtype)
        if alpha is None:  # device weights (capturable)
            return self._device_alpha.to(b.compute_dtype)
        return self._weights_tensor(alpha, b.device, b.compute_dtype)

    def _run_kernel(self, b: Bucket, grads, w, hyper, res, flag, inv) -> None:
        native = self._backend[b.device.type] in ("cpp", "cuda")  # they check the strides themselves
        if b.grad_rows is None and not native and not all(
            g is None or g.stride() == t.stride() for g, t in zip(grads, b.locals)
        ):
            grads = [self._like(t, g) for t, g in zip(b.locals, grads)]
        name = self._backend[b.device.type]
        if torch.compiler.is_compiling():
            _ops.fused_step(b.locals, grads, b.duals, w, hyper, res, flag, inv, name)
            return
        try:
            self._fns[b.device.type][0](b.locals, grads, b.duals, w, hyper, res, flag, inv)
        except (RuntimeError, ValueError):
            self._layout = None
            self._revalidate()  # a clearer error for a parameter cast or moved after the first step
            self._check_grads(b)
            raise

    @property
    def _native(self) -> bool:
        """Whether every bucket runs a compiled back end (which validates its arguments itself)."""
        return all(name in ("cpp", "cuda") for name in self._backend.values())

    def _check_grads(self, b: Bucket) -> None:
        """Raise a clear error for a gradient no kernel can read (sparse)."""
        for k, p in zip(b.index, b.params):
            g = p.grad
            if g is not None and g.layout != torch.strided:
                raise RuntimeError(
                    f"BADM does not support sparse gradients (parameter {k}, shape {tuple(p.shape)}); "
                    "use a dense layer (e.g. nn.Embedding(sparse=False))"
                )

    def _row_grads(self, b: Bucket) -> list[torch.Tensor | None]:
        """Row views for R > 1, with row 0 None for a parameter without a gradient in any row."""
        n = len(b.params)
        if all(all(x == 1 for x in rec.state) for rec in b.records):
            return b.grad_rows
        grads = list(b.grad_rows)
        for i, rec in enumerate(b.records):
            if not any(rec.state):
                grads[i] = None
        assert len(grads) == n * self._rows
        return grads

    # Attribute writes on an Optimizer made in code Dynamo traces are dropped (torch 2.13; see
    # pytorch/pytorch#171590), so the step's bookkeeping always runs eagerly.
    @_ops.not_traced
    def _record_step(self, alpha: list[float] | None, ran: bool) -> None:
        if not ran:
            return
        if self.mode == "merged" and self._merged_alpha is None:
            self._merged_alpha = alpha
        self._last_alpha = alpha
        self._step_count += 1

    # ------------------------------------------------------------------ state
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """torch.optim-compatible state (its hooks run in torch's order): per-parameter ``duals``
        under the parameter's index, the param groups (lr/momentum, and rho/sigma beside them),
        ``param_names`` where the groups have names, and BADM's metadata under ``"badm"`` (versioned).
        The metadata is repeated in every param group (key ``"badm"``, as a JSON string) so that tools which keep only
        ``"state"`` and ``"param_groups"`` (``torch.distributed.checkpoint.state_dict``) carry it; on
        load the top-level copy wins where both are present."""
        self._report_pending(wait=True)
        if self._overlap is not None:  # the committed duals, not those of an all-reduce started since
            self._overlap.abort("state_dict() between the last backward pass and step()")
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            lr = _number("lr", group["lr"])
            mu = _number("momentum", group["momentum"])
            packed["rho"], packed["sigma"] = rho_sigma(lr, mu)
            packed["params"] = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                packed["params"].append(index[id(p)])
            groups.append(packed)
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st is not None:
                    state[index[id(p)]] = {"duals": st["duals"].clone()}
        meta = {
            "version": STATE_VERSION,
            "sub_batches": self.sub_batches,
            "mode": self.mode,
            "step": self._step_count,
            "merged_alpha": list(self._merged_alpha) if self._merged_alpha is not None else None,
            "alpha": list(self._last_alpha) if self._last_alpha is not None else None,
        }
        for packed in groups:  # one string: a leaf of the same shape whatever the step (DCP's flattening)
            packed["badm"] = json.dumps(meta)
        state_dict = {"state": state, "param_groups": groups, "badm": meta}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (versions 1 to 3; torch's load_state_dict hooks run
        in torch's order). Everything is checked before anything changes: a state whose layout does
        not match (version, sub-batches, mode, groups, shapes) raises ValueError and leaves the
        optimizer as it was."""
        if not isinstance(state_dict, dict):
            raise ValueError("not an optimizer state_dict (needs 'state' and 'param_groups')")
        if self._overlap is not None:
            self._overlap.abort("load_state_dict() between the last backward pass and step()")
        state_dict = state_dict.copy()  # shallow, like torch.optim
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict (needs 'state' and 'param_groups')")
        meta = state_dict.get("badm")
        if meta is None:  # a state that kept only 'state' and 'param_groups' (e.g. DCP): the groups' copies
            metas = [sg.get("badm") for sg in state_dict["param_groups"] if isinstance(sg, dict)]
            if any(m != metas[0] for m in metas):
                raise ValueError("the param groups of the state carry different 'badm' metadata")
            meta = metas[0] if metas else None
            if isinstance(meta, str):
                try:
                    meta = json.loads(meta)
                except ValueError:
                    raise ValueError(
                        f"the 'badm' metadata of the state's param groups is not JSON: {meta[:80]!r}"
                    ) from None
        if not isinstance(meta, dict):
            raise ValueError("not a BADM state_dict (no 'badm' metadata)")
        meta = dict(meta)  # annotated below; the caller's dict stays as it was
        version = meta.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version > STATE_VERSION or version < 1:
            raise ValueError(f"unsupported BADM state version {version!r} (this badm_fast reads 1..{STATE_VERSION})")
        convert = self._dual_converter(meta)
        step = meta.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state has an invalid step count {step!r}")
        saved_alphas = {}
        for key in ("merged_alpha", "alpha"):
            value = meta.get(key)
            try:
                saved_alphas[key] = None if value is None else normalize_weights(value, meta["sub_batches"])
            except ValueError as exc:
                raise ValueError(f"state has invalid {key!r}: {exc}") from None
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_state, dict):
            raise ValueError(f"state['state'] must be a dict, got {type(saved_state).__name__}")
        if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(sg, dict) and isinstance(sg.get("params"), (list, tuple)) for sg in saved_groups
        ):
            raise ValueError("state['param_groups'] must be a list of dicts, each with a 'params' list")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state has {len(saved_groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        new_hyper = []
        for k, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"parameter group {k} has {len(g['params'])} parameters, the state {len(sg['params'])}"
                )
            try:
                if version >= 3 and "lr" in sg:
                    lr, mu = sg["lr"], sg.get("momentum", g["momentum"])
                elif "rho" in sg or "sigma" in sg:
                    lr, mu = _from_rho_sigma(sg.get("rho"), sg.get("sigma"))
                else:
                    lr, mu = g["lr"], g["momentum"]
                check_hyper(lr, mu, sg.get("weight_decay", g.get("weight_decay", 0.0)))
                _check_maximize(sg.get("maximize", g.get("maximize", False)))
            except ValueError as exc:
                raise ValueError(f"param group {k} of the state: {exc}") from None
            new_hyper.append((lr, mu))
        # Map saved indices to our parameters and check every dual's shape first.
        updates = []
        for g, sg in zip(self.param_groups, saved_groups):
            for p, idx in zip(g["params"], sg["params"]):
                entry = saved_state.get(idx)
                if entry is None and p not in self.state:
                    continue  # no state saved and none here: stays without state
                if entry is None:
                    if not p.requires_grad:
                        continue  # frozen here and without state there: its state stays
                    raise ValueError(f"state has no duals for parameter {idx} (shape {tuple(p.shape)})")
                if not isinstance(entry, dict) or "duals" not in entry:
                    raise ValueError(f"state has no duals for parameter {idx} (shape {tuple(p.shape)})")
                d = entry["duals"]
                want = (meta["rows"], *p.shape, *((2,) if p.is_complex() else ()))
                if not isinstance(d, torch.Tensor) or tuple(d.shape) != want:
                    got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                    raise ValueError(f"duals of parameter {idx} have shape {got}, expected {want}")
                if not d.is_floating_point():
                    raise ValueError(f"duals of parameter {idx} have dtype {d.dtype}, expected a floating dtype")
                if not bool(torch.isfinite(local(d) if is_dtensor(d) else d).all()):
                    raise ValueError(f"duals of parameter {idx} are not finite (a corrupted checkpoint?)")
                updates.append((p, d))
        with torch.no_grad():
            for p, d in updates:
                if p not in self.state or self._state_mismatch(p):
                    self._activate(p)
                target = self.state[p]["duals"]
                if d is None:
                    target.zero_()
                    continue
                if is_dtensor(target) and is_dtensor(d) and _same_sharding(d, target):
                    local(target).copy_(convert(local(d).to(device=local(target).device, dtype=torch.float64)))
                elif is_dtensor(target):  # a full tensor (or another sharding): each rank takes its shard
                    from torch.distributed.tensor import distribute_tensor

                    full = d.full_tensor() if is_dtensor(d) else d
                    full = convert(full.to(device=local(target).device, dtype=torch.float64))
                    placed = distribute_tensor(full, target.device_mesh, target.placements)
                    local(target).copy_(local(placed))
                else:
                    target.copy_(convert(d.to(device=target.device, dtype=torch.float64)))
        for g, sg, (lr, mu) in zip(self.param_groups, saved_groups, new_hyper):
            for k, v in sg.items():
                if k not in ("params", "rho", "sigma", "param_names", "badm"):
                    g[k] = v
            if "param_names" in sg and "param_names" in g:
                g["param_names"] = sg["param_names"]
            g["lr"], g["momentum"] = lr, mu
            g.setdefault("weight_decay", 0.0)
            g.setdefault("maximize", False)
        self._step_count = step
        if meta["mode"] == self.mode:
            self._merged_alpha = saved_alphas["merged_alpha"]
            self._last_alpha = saved_alphas["alpha"]
        else:  # converted: merged -> sub_batch keeps no weights; sub_batch -> merged fixes them
            self._merged_alpha = meta["convert_alpha"] if self.mode == "merged" else None
            self._last_alpha = self._merged_alpha
        self._layout = None
        self._hyper_cache.clear()

    def _state_mismatch(self, p: torch.Tensor) -> bool:
        d = local(self.state[p]["duals"])
        t = kernel_view(p)
        return d.device != t.device or tuple(d.shape[1:]) != tuple(t.shape)

    def _dual_converter(self, meta: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Check the saved layout against ours; return the map from saved duals to ours.

        Same mode and sub-batches: identity. A merged state (one dual pi_bar) loads into
        ``mode="sub_batch"`` as pi_s = pi_bar for every s, which continues the same trajectory
        under constant weights. A per-sub-batch state loads into ``mode="merged"`` as
        pi_bar = sum_s alpha_s pi_s with the last step's weights (state version >= 2).
        Adds ``rows`` (saved dual rows) and, for the latter, ``convert_alpha`` to ``meta``.
        """
        saved_s, saved_mode = meta.get("sub_batches"), meta.get("mode")
        if saved_mode not in MODES or isinstance(saved_s, bool) or not isinstance(saved_s, int) or saved_s < 1:
            raise ValueError(f"state has invalid sub_batches={saved_s!r} / mode={saved_mode!r}")
        mismatch = ValueError(
            f"state was saved with sub_batches={saved_s}, mode={saved_mode!r}; "
            f"this optimizer has sub_batches={self.sub_batches}, mode={self.mode!r}"
        )
        meta["rows"] = 1 if saved_mode == "merged" else saved_s
        if saved_mode == self.mode:
            if saved_s != self.sub_batches:
                raise mismatch
            return lambda d: d
        if saved_mode == "merged":  # -> sub_batch
            return lambda d: d.expand(self._rows, *d.shape[1:])
        # sub_batch -> merged
        if saved_s != self.sub_batches:
            raise mismatch
        alpha = meta.get("alpha")
        if alpha is None:
            if meta.get("step", 0):
                raise ValueError(
                    f"a version-{meta['version']} per-sub-batch state does not record the weights needed to merge "
                    "its duals; load it with mode='sub_batch'"
                )
            alpha = [1.0 / saved_s] * saved_s  # no step taken yet: the duals are zero
        alpha = normalize_weights(alpha, saved_s)
        meta["convert_alpha"] = alpha
        w = torch.tensor(alpha, dtype=torch.float64)
        return lambda d: (w.to(d.device).view(-1, *([1] * (d.dim() - 1))) * d).sum(0, keepdim=True)

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict[str, Any]:
        return {
            "param_groups": self.param_groups,
            "defaults": self.defaults,
            "config": dict(
                sub_batches=self.sub_batches,
                backend=self.requested_backend,
                mode=self.mode,
                capturable=self.capturable,
                on_nonfinite=self.on_nonfinite,
            ),
            "badm_state": self.state_dict(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "badm_state" not in state:  # torch's own load_state_dict path: plain attributes
            self.__dict__.update(state)
            return
        groups = [dict(g) for g in state["param_groups"]]
        for g in groups:
            names = g.pop("param_names", None)
            if names is not None:
                g["params"] = list(zip(names, g["params"]))
        d = state["defaults"]
        self.__init__(
            groups, lr=d["lr"], momentum=d["momentum"], weight_decay=d.get("weight_decay", 0.0),
            maximize=d.get("maximize", False), **state["config"],
        )
        self.load_state_dict(state["badm_state"])

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (sub_batches={self.sub_batches}, mode={self.mode!r}, backend={self.backend!r}"]
        for i, group in enumerate(self.param_groups):
            n = sum(p.numel() for p in group["params"])
            lr, mu = _number("lr", group["lr"]), _number("momentum", group["momentum"])
            rho, sigma = rho_sigma(lr, mu)
            lines.append(
                f"  Parameter Group {i}: lr={group['lr']}, momentum={group['momentum']}, "
                f"weight_decay={group['weight_decay']}, maximize={group['maximize']} "
                f"(rho={rho:.6g}, sigma={sigma:.6g}), elements={n}"
            )
        return "\n".join(lines) + "\n)"
