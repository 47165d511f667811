"""The BADM optimizer: a thin torch.optim.Optimizer over flat buffers and a fused kernel."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from . import _ops, backends, capture, distributed
from .flat import SUPPORTED_DTYPES, FlatBuffer
from .reference import compute_dtype

__all__ = ["BADM", "STATE_VERSION"]

# Version of the state_dict layout written by BADM.state_dict(); load_state_dict refuses newer
# ones and converts older ones.
#   1: per-parameter duals, param groups, metadata (sub_batches, mode, step, merged_alpha).
#   2: adds "alpha", the last step's normalised weights, which makes a per-sub-batch state
#      convertible into a merged one (pi_bar = sum_s alpha_s pi_s).
STATE_VERSION = 2
MODES = ("sub_batch", "merged")
NONFINITE = ("raise", "skip", "ignore")


def _check_rho_sigma(rho: Any, sigma: Any) -> None:
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"Invalid sigma: {sigma!r} (the penalty must be a finite number > 0)")
    if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"Invalid rho: {rho!r} (the proximal coefficient must be a finite number >= 0)")


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


class BADM(Optimizer):
    r"""Implements BADM, batch ADMM (Wang, Zhou and Li, arXiv:2407.01640).

    Each batch is split into :math:`S` sub-batches; sub-batch :math:`s` keeps a dual
    :math:`\pi_s`. With :math:`g_s` the gradient of sub-batch :math:`s`'s mean loss at the
    global weights :math:`z` and :math:`\alpha_s` this step's normalised sub-batch weights,
    one step is (the fused form of the paper's primal, dual and aggregation steps):

    .. math::
        \pi_s &\leftarrow \frac{\rho\,\pi_s - \sigma g_s}{\rho + \sigma} \\
        z &\leftarrow z + \sum_s \alpha_s \Big[\frac{-2 g_s}{\rho + \sigma}
            + \frac{(\rho - \sigma)\,\pi_s^{\text{old}}}{\sigma(\rho + \sigma)}\Big]

    At steady state this behaves like momentum SGD with learning rate :math:`1/\sigma` and
    momentum :math:`\rho/(\rho+\sigma)`: from SGD(lr :math:`\eta`, momentum :math:`\mu`) start
    with :math:`\sigma = 1/\eta`, :math:`\rho = \sigma\mu/(1-\mu)`.

    The parameters are re-pointed into one contiguous buffer per (group, device, dtype);
    inside ``with opt.sub_batch(s):`` the gradients of a backward pass land in row ``s`` of
    an ``(S, P)`` gradient buffer, and :meth:`step` makes one fused kernel call per buffer.

    Args:
        params (iterable): parameters or dicts defining parameter groups. Create the
            optimizer after moving/casting the model: the parameters become views of its
            buffers. Parameters with ``requires_grad=False`` at construction are never touched.
        sub_batches (int, optional): :math:`S`, sub-batches per batch (default: 1).
        rho (float, optional): proximal coefficient :math:`\rho \ge 0` (default: 9.0,
            i.e. momentum 0.9 at :math:`\sigma = 1`).
        sigma (float, optional): penalty :math:`\sigma > 0`, about 1/learning rate (default: 10.0).
        backend (str, optional): ``"auto"`` (default), ``"triton"``, ``"cuda"``, ``"cpp"`` or
            ``"torch"``; see :mod:`badm_fast.backends`. :attr:`backend` tells what runs.
        mode (str, optional): ``"sub_batch"`` (default; the paper's form: one dual per
            sub-batch, one backward pass per sub-batch) or ``"merged"``: the exact fast path
            for constant weights — one dual buffer and one backward pass over the whole batch,
            giving the same trajectory with :math:`S` times less state. ``step`` then refuses
            weights that differ from the first step's.
        on_nonfinite (str, optional): what a NaN or infinite gradient does: ``"raise"``
            (default) a RuntimeError naming the parameter and sub-batch, ``"skip"`` skips the
            step and counts it in :attr:`skipped_steps`; in both cases weights and duals are
            left exactly as they were. ``"ignore"`` does no check (one read of the gradients
            less per step).
        process_group (ProcessGroup, optional): run distributed (default: None, one
            process): every rank of the group holds the same weights and its own
            ``sub_batches`` sub-batches; each step aggregates the sub-batches of all ranks with
            one all-reduce per flat buffer, weights normalised over all ranks. The ranks must
            start from identical weights and parameter layouts (checked here; RuntimeError on
            every rank otherwise). See :mod:`badm_fast.distributed`.
        capturable (bool, optional): capture-safe mode (default: False): rho, sigma, the
            weights and the skip flag live in device tensors and :meth:`step` makes no host
            synchronisation, so ``opt.step()`` can be captured in a CUDA graph and replayed.
            Non-finite gradients (and invalid weights given as a device tensor) skip the step
            on the device and count in :attr:`skipped_steps_tensor`; ``on_nonfinite="raise"``
            cannot raise without a synchronisation and skips too. Parameters must be on one
            device; back ends ``"triton"`` or ``"torch"`` ("auto" picks among them). See
            :mod:`badm_fast.capture`.

    Mixed precision: ``torch.amp.GradScaler`` works (``scaler.step(opt)``); the gradients of
    every sub-batch are unscaled and checked, and a step with a non-finite gradient is skipped
    without touching any state. Call ``scaler.unscale_(opt)`` only with one sub-batch (it
    unscales the ``.grad`` tensors, i.e. one row). With the Triton back end on one CUDA device
    (and in capturable mode) the gradients are unscaled inside the fused pass and the skip is
    decided on the device without a host synchronisation; such skips count in
    :attr:`skipped_steps_tensor`.

    ``torch.compile``: a compiled training step may call ``opt.step()``; the fused kernel
    appears in the graph as the custom op ``badm_fast::fused_step`` (``fused_step_capturable``
    in capturable mode), see :mod:`badm_fast._ops`. The host-side checks (parameter binding,
    the non-finite check's synchronisation) cause graph breaks and run eagerly.

    Gradients: a sub-batch with no backward pass since :meth:`zero_grad` has gradient zero;
    a parameter that gets no gradient in any sub-batch of a step is skipped (its weights and
    duals do not change), like torch.optim skips parameters whose ``.grad`` is None; one that
    gets a gradient in some sub-batches only has gradient zero in the others.
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale/found_inf (see step)

    def __init__(
        self,
        params: Iterable[Any],
        sub_batches: int = 1,
        rho: float = 9.0,
        sigma: float = 10.0,
        backend: str = "auto",
        mode: str = "sub_batch",
        on_nonfinite: str = "raise",
        process_group: Any = None,
        capturable: bool = False,
    ):
        if isinstance(sub_batches, bool) or not isinstance(sub_batches, int) or sub_batches < 1:
            raise ValueError(f"Invalid sub_batches: {sub_batches!r} (an int >= 1)")
        _check_rho_sigma(rho, sigma)
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r}; choose one of {MODES}")
        if on_nonfinite not in NONFINITE:
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r}; choose one of {NONFINITE}")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; choose one of {('auto',) + backends.BACKENDS}")
        if process_group is not None:
            distributed.validate_process_group(process_group)
        self.process_group = process_group
        if not isinstance(capturable, bool):
            raise ValueError(f"Invalid capturable: {capturable!r} (True or False)")
        if capturable and process_group is not None:
            raise ValueError("capturable=True is not supported with a process_group (the all-reduce step syncs)")
        self.capturable = capturable
        self.device_state: capture.DeviceState | None = None  # device tensors of the capture-safe path
        self.sub_batches = sub_batches
        self.mode = mode
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self.requested_backend = backend
        self._rows = 1 if mode == "merged" else sub_batches
        self._buffers: list[list[FlatBuffer]] = []  # per group
        self._kernels: dict[str, tuple[str, Callable[..., None]]] = {}  # device type -> (name, fn)
        self._active_row: int | None = None
        self._step_count = 0
        self._merged_alpha: list[float] | None = None
        self._last_alpha: list[float] | None = None
        self._weights_cache: dict[tuple, torch.Tensor] = {}
        self._hook_handles: list[Any] = []
        self._detached_grads: dict[int, Any] = {}  # .grad set aside by a stray backward pass (see _make_guard)
        self._constructing = True  # add_param_group keeps the parameters' own tensors until __init__ ends
        self.residuals: dict[str, torch.Tensor] | None = None
        try:
            super().__init__(params, dict(rho=rho, sigma=sigma))
            if process_group is not None:  # same layout and weights on every rank, or RuntimeError on all
                distributed.check_replicas(self)
            if capturable:  # allocated now: tensors created during a capture would be reset by every replay
                capture.state_of(self)
        except BaseException:
            self._release()  # the parameters of groups built so far get their own tensors back
            raise
        self._constructing = False
        for buf in self._all_buffers():
            buf.originals = None

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        _check_rho_sigma(group.get("rho", self.defaults["rho"]), group.get("sigma", self.defaults["sigma"]))
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(p).__name__}")
            if p.requires_grad and p.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"BADM supports {[str(d) for d in SUPPORTED_DTYPES]} parameters, got {p.dtype}")
            if p.requires_grad and not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
        n_before = len(self.param_groups)
        super().add_param_group(group)  # checks duplicates, fills defaults
        if len(self.param_groups) == n_before:  # pragma: no cover - base class raised
            return
        try:
            bufs = self._build_buffers(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise
        self._buffers.append(bufs)
        if not self._constructing:
            for buf in bufs:
                buf.originals = None

    def _release(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        for buf in self._all_buffers():
            buf.release()
        self._buffers.clear()

    def _build_buffers(self, group: dict[str, Any]) -> list[FlatBuffer]:
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.requires_grad:
                buckets.setdefault((p.device, p.dtype), []).append(p)
        if self.capturable:
            devices = {d for d, _ in buckets} | {buf.device for buf in self._all_buffers()}
            if len(devices) > 1:
                raise ValueError(
                    f"capturable=True needs every parameter on one device, got {sorted(map(str, devices))}"
                )
        for device, _ in buckets:
            if device.type not in self._kernels:
                name = backends.resolve(self.requested_backend, device.type, capturable=self.capturable)
                self._kernels[device.type] = (name, backends.kernel_for(name))
        bufs = [FlatBuffer(ps, self._rows) for ps in buckets.values()]
        for buf in bufs:
            for i, p in enumerate(buf.params):
                self.state[p] = {"duals": buf.dual_view(i)}
                self._hook_handles.append(p.register_post_accumulate_grad_hook(self._make_hook(buf, i)))
                if self._rows > 1:
                    self._hook_handles.append(p.register_hook(self._make_guard(p)))
        return bufs

    # The hooks live on the parameters, which outlive the optimizer: they hold only weak
    # references, so an optimizer that is dropped (and its gradient and dual buffers) is freed.
    def _make_guard(self, param: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """A backward pass outside any sub-batch context (with several rows) must not accumulate
        into the row ``p.grad`` still points at: this hook runs before accumulation and detaches
        ``p.grad``, so autograd makes a fresh tensor, and the post-accumulate hook raises."""
        opt_ref, param_ref = weakref.ref(self), weakref.ref(param)

        def guard(grad: torch.Tensor) -> None:
            opt, p = opt_ref(), param_ref()
            if opt is not None and p is not None and opt._active_row is None:
                opt._detached_grads[id(p)] = p.grad
                p.grad = None

        return guard

    def _make_hook(self, buf: FlatBuffer, i: int) -> Callable[[torch.Tensor], None]:
        opt_ref, buf_ref, param_ref = weakref.ref(self), weakref.ref(buf), weakref.ref(buf.params[i])

        def hook(p: torch.Tensor) -> None:
            opt, buf = opt_ref(), buf_ref()
            if opt is None or buf is None or p is not param_ref():  # optimizer gone, or a copy of the parameter
                return
            row = opt._active_row
            if row is None:
                if opt._rows != 1:
                    p.grad = opt._detached_grads.pop(id(p), None)  # as before the backward pass
                    raise RuntimeError(
                        f"BADM(sub_batches={opt.sub_batches}): run each sub-batch's backward pass inside "
                        "`with opt.sub_batch(s):` so its gradient lands in row s"
                    )
                row = 0
            buf.absorb_grad(row, i)

        return hook

    @property
    def backend(self) -> str | dict[str, str]:
        """The back end that runs the fused step (a dict by device type if they differ)."""
        names = {dev: name for dev, (name, _) in self._kernels.items()}
        if len(set(names.values())) == 1:
            return next(iter(names.values()))
        return names if names else backends.resolve(self.requested_backend, "cpu")

    @property
    def skipped_steps_tensor(self) -> torch.Tensor:
        """Steps skipped on the device (capturable mode, fused GradScaler path): a 0-dim int64
        tensor on the parameters' device, updated without host synchronisation. Steps skipped
        by the host-checked path count in :attr:`skipped_steps` instead."""
        return capture.state_of(self).skipped

    def _all_buffers(self) -> Iterable[FlatBuffer]:
        for bufs in self._buffers:
            yield from bufs

    # ------------------------------------------------------------------ gradients
    @contextlib.contextmanager
    def sub_batch(self, s: int):
        """Gradients of backward passes inside this context land in row ``s``."""
        if self.mode == "merged":
            raise ValueError(
                "mode='merged' takes one backward pass over the whole batch; sub_batch() is for mode='sub_batch'"
            )
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.sub_batches:
            raise ValueError(f"sub-batch index {s!r} out of range [0, {self.sub_batches})")
        if self._active_row is not None:
            raise RuntimeError(f"already inside sub_batch({self._active_row}); contexts do not nest")
        for buf in self._all_buffers():
            buf.begin_row(s)
        self._active_row = s
        try:
            yield self
        finally:
            self._active_row = None

    def set_grads(self, s: int, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Write the gradients of sub-batch ``s`` directly (as if its backward pass had run
        inside ``sub_batch(s)``), e.g. gradients computed by ``torch.func``."""
        rows = self._rows
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < rows:
            raise ValueError(f"sub-batch index {s!r} out of range [0, {rows})")
        params, grads = list(params), list(grads)
        if len(params) != len(grads):
            raise ValueError(f"got {len(params)} parameters but {len(grads)} gradients")
        where = {id(p): (buf, i) for buf in self._all_buffers() for i, p in enumerate(buf.params)}
        for p, g in zip(params, grads):  # check everything before writing anything
            if id(p) not in where:
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not managed by this optimizer")
            buf, i = where[id(p)]
            buf.check_grad(i, g)
        for p, g in zip(params, grads):
            buf, i = where[id(p)]
            buf.write_grad(s, i, g)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all sub-batches (``p.grad`` is None or a zeroed view)."""
        for buf in self._all_buffers():
            buf.zero_grad(set_to_none)

    # ------------------------------------------------------------------ step
    def _weights_tensor(self, alpha: list[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(alpha), device, dtype)
        t = self._weights_cache.get(key)
        if t is None:
            if len(self._weights_cache) > 64:
                self._weights_cache.clear()
            t = torch.tensor(alpha, dtype=dtype, device=device)
            self._weights_cache[key] = t
        return t

    def _step_alpha(self, weights: Any) -> tuple[list[float], list[float]]:
        """This step's normalised weights, and the weights the kernel uses (``[1.0]`` when merged)."""
        alpha = normalize_weights(weights, self.sub_batches)
        if self.mode == "sub_batch":
            return alpha, alpha
        if self._merged_alpha is not None and any(abs(a - b) > 1e-12 for a, b in zip(alpha, self._merged_alpha)):
            raise ValueError(
                "mode='merged' requires the same sub-batch weights at every step (its exactness rests on "
                f"constant weights); got {alpha}, earlier {self._merged_alpha}. Use mode='sub_batch' for "
                "ragged or re-weighted batches"
            )
        return alpha, [1.0]

    @_ops.not_traced  # host bookkeeping (parameter data pointers, gradient-row flags)
    def _prepare_buffers(self) -> None:
        """Re-bind replaced parameters, adopt directly assigned gradients, zero stale rows."""
        for buf in self._all_buffers():
            buf.check_binding()
            buf.adopt_assigned_grads()
            buf.prepare_rows()

    @_ops.not_traced  # synchronises with the host
    def _gradients_ok(self) -> bool:
        """Unscale (under GradScaler) and check the gradients of every row before any state
        changes. Returns False when the step must be skipped; raises for on_nonfinite="raise"."""
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step around our step()
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is not None:
            if grad_scale is None and self._rows > 1:
                raise RuntimeError(
                    "scaler.unscale_(opt) unscales only the .grad tensors, i.e. one sub-batch's row; with "
                    "sub_batches > 1 let scaler.step(opt) unscale all rows (do not call scaler.unscale_)"
                )
            inv = None if grad_scale is None else grad_scale.double().reciprocal().float().reshape(1)
            total = torch.as_tensor(found_inf).double().sum().cpu()  # 0 when no .grad was set
            for buf in self._all_buffers():
                flag = torch.zeros(1, dtype=torch.float32, device=buf.device)
                scale = inv.to(buf.device) if inv is not None else torch.ones(1, device=buf.device)
                torch._amp_foreach_non_finite_check_and_unscale_([buf.grads], flag, scale)
                total += flag.double().sum().cpu()
            return total.item() == 0  # else GradScaler lowers its scale; nothing changed

        if self.on_nonfinite == "ignore":
            return True
        # A NaN or Inf anywhere makes the sum non-finite. Summed in the storage dtype (an fp32
        # accumulation of bf16 is several times slower: bench/results), except fp16, whose
        # range (65504) a sum of finite gradients would often exceed. A finite sum that
        # overflows anyway is caught by _locate_nonfinite, which finds no culprit.
        sums = [
            buf.grads.sum(dtype=torch.float32 if buf.dtype == torch.float16 else None).reshape(1).double().cpu()
            for buf in self._all_buffers()
        ]
        if not sums or bool(torch.isfinite(torch.cat(sums)).all()):
            return True
        where = self._locate_nonfinite()
        if where is None:  # the sum overflowed, every gradient is finite
            return True
        if self.on_nonfinite == "skip":
            return False
        g, k, shape, row = where
        raise RuntimeError(
            f"non-finite gradient in parameter {k} of param group {g} (shape {shape}), sub-batch {row}; "
            "the step was refused and weights and duals are unchanged "
            "(BADM(..., on_nonfinite='skip') skips such steps instead)"
        )

    def _locate_nonfinite(self) -> tuple[int, int, tuple, int] | None:
        for g, group in enumerate(self.param_groups):
            index = {id(p): k for k, p in enumerate(group["params"])}
            for buf in self._buffers[g]:
                for r in range(buf.rows):
                    for i, p in enumerate(buf.params):
                        if not bool(torch.isfinite(buf.grad_view(r, i)).all()):
                            return g, index[id(p)], tuple(p.shape), r
        return None

    def step(self, closure: Callable[[], Any] | None = None, *, weights: Any = None, residuals: bool = False):
        r"""Performs one BADM step: updates every dual and aggregates into the weights.

        Args:
            closure (Callable, optional): re-evaluates the model (running the sub-batches'
                backward passes) and returns the loss.
            weights (sequence of float or Tensor, optional): this step's sub-batch weights,
                e.g. the sub-batch sizes; normalised to sum 1 (default: equal).
            residuals (bool, optional): also compute, in the same pass, the primal residual
                :math:`\sqrt{\sum_s \alpha_s \|w_s' - z\|^2}` and the dual residual
                :math:`\sigma \|z' - z\|` over all parameters; stored in :attr:`residuals`
                as 0-dim float64 tensors on the parameters' device (no host synchronisation).
        """
        on_device = self.capturable or capture.uses_fused_amp(self)  # decided on the device, no host sync
        if not on_device:  # refuse invalid weights and hyperparameters before the closure's backward passes
            alpha, kernel_alpha = self._step_alpha(weights)
            for group in self.param_groups:
                _check_rho_sigma(group["rho"], group["sigma"])
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if on_device:
            capture.step(self, weights, residuals)
            return loss
        self._prepare_buffers()
        if not (self._gradients_ok() if self.process_group is None else distributed.gradients_ok(self)):
            self._record_step(alpha, skipped=True)
            return loss
        sums = None  # [primal^2, dual^2]
        with torch.no_grad():
            for group, bufs in zip(self.param_groups, self._buffers):
                rho, sigma = float(group["rho"]), float(group["sigma"])
                for buf in bufs:
                    name, fn = self._kernels[buf.device.type]
                    w = self._weights_tensor(kernel_alpha, buf.device, compute_dtype(buf.dtype))
                    res = torch.zeros(2, dtype=torch.float64, device=buf.device) if residuals else None
                    if self.process_group is not None:  # all ranks' sub-batches, one all-reduce
                        distributed.buffer_step(self, buf, weights, rho, sigma, res)
                    else:
                        for a, b in buf.active_runs():
                            if torch.compiler.is_compiling():  # one graph node, see badm_fast._ops
                                _ops.fused_step(
                                    buf.z[a:b], buf.grads[:, a:b], buf.duals[:, a:b], w, rho, sigma, res, name
                                )
                            else:
                                fn(buf.z[a:b], buf.grads[:, a:b], buf.duals[:, a:b], w, rho, sigma, res)
                    if residuals:
                        part = res * res.new_tensor([1.0, sigma * sigma])
                        sums = part if sums is None else sums + part.to(sums.device)
        self._record_step(alpha, sums, residuals)
        return loss

    # Attribute writes on an Optimizer made in code Dynamo traces are dropped (torch 2.13; see
    # pytorch/pytorch#171590), so the step's bookkeeping always runs eagerly.
    @_ops.not_traced
    def _record_step(
        self,
        alpha: list[float] | None,
        sums: torch.Tensor | None = None,
        residuals: bool = False,
        skipped: bool = False,
    ) -> None:
        if skipped:
            self.skipped_steps += 1
            return
        if self.mode == "merged" and self._merged_alpha is None:
            self._merged_alpha = alpha
        self._last_alpha = alpha
        self._step_count += 1
        if residuals:
            sums = torch.zeros(2, dtype=torch.float64) if sums is None else sums
            self.residuals = {"primal": sums[0].sqrt(), "dual": sums[1].sqrt()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch.optim-compatible state: per-parameter ``duals`` (copies) under the parameter's
        index, the param groups, and BADM's metadata under ``"badm"`` (versioned)."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                packed["params"].append(index[id(p)])
            groups.append(packed)
        state = {}
        for buf in self._all_buffers():
            for i, p in enumerate(buf.params):
                state[index[id(p)]] = {"duals": buf.dual_view(i).clone()}
        meta = {
            "version": STATE_VERSION,
            "sub_batches": self.sub_batches,
            "mode": self.mode,
            "step": self._step_count,
            "merged_alpha": list(self._merged_alpha) if self._merged_alpha is not None else None,
            "alpha": list(self._last_alpha) if self._last_alpha is not None else None,
        }
        return {"state": state, "param_groups": groups, "badm": meta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`. Everything is checked before anything changes:
        a state whose layout does not match (version, sub-batches, mode, groups, shapes) raises
        ValueError and leaves the optimizer as it was."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict (needs 'state' and 'param_groups')")
        meta = state_dict.get("badm")
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
        for k, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"parameter group {k} has {len(g['params'])} parameters, the state {len(sg['params'])}"
                )
            _check_rho_sigma(sg.get("rho", g["rho"]), sg.get("sigma", g["sigma"]))
        # Map saved indices to our parameters and check every dual's shape first.
        updates = []
        for g, sg in zip(self.param_groups, saved_groups):
            for p, idx in zip(g["params"], sg["params"]):
                entry = saved_state.get(idx)
                if not p.requires_grad:
                    continue
                if not isinstance(entry, dict) or "duals" not in entry:
                    raise ValueError(f"state has no duals for parameter {idx} (shape {tuple(p.shape)})")
                d = entry["duals"]
                want = (meta["rows"], *p.shape)
                if not isinstance(d, torch.Tensor) or tuple(d.shape) != want:
                    got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                    raise ValueError(f"duals of parameter {idx} have shape {got}, expected {want}")
                if not d.is_floating_point():
                    raise ValueError(f"duals of parameter {idx} have dtype {d.dtype}, expected a floating dtype")
                if not bool(torch.isfinite(d).all()):
                    raise ValueError(f"duals of parameter {idx} are not finite (a corrupted checkpoint?)")
                updates.append((p, d))
        views = {id(p): buf.dual_view(i) for buf in self._all_buffers() for i, p in enumerate(buf.params)}
        with torch.no_grad():
            for p, d in updates:
                view = views[id(p)]
                view.copy_(convert(d.to(device=view.device, dtype=torch.float64)))
        for g, sg in zip(self.param_groups, saved_groups):
            for k, v in sg.items():
                if k != "params":
                    g[k] = v
        self._step_count = step
        if meta["mode"] == self.mode:
            self._merged_alpha = saved_alphas["merged_alpha"]
            self._last_alpha = saved_alphas["alpha"]
        else:  # converted: merged -> sub_batch keeps no weights; sub_batch -> merged fixes them
            self._merged_alpha = meta["convert_alpha"] if self.mode == "merged" else None
            self._last_alpha = self._merged_alpha

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
                sub_batches=self.sub_batches, backend=self.requested_backend, mode=self.mode, capturable=self.capturable
            ),
            "badm_state": self.state_dict(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        groups = [dict(g) for g in state["param_groups"]]
        cfg = state["config"]
        self.__init__(groups, rho=state["defaults"]["rho"], sigma=state["defaults"]["sigma"], **cfg)
        self.load_state_dict(state["badm_state"])

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (sub_batches={self.sub_batches}, mode={self.mode!r}, backend={self.backend!r}"]
        for i, group in enumerate(self.param_groups):
            n = sum(p.numel() for p in group["params"])
            lines.append(f"  Parameter Group {i}: rho={group['rho']}, sigma={group['sigma']}, elements={n}")
        return "\n".join(lines) + "\n)"
