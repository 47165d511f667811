r"""Capture-safe BADM steps: every per-step value in device memory, no host synchronisation.

``BADM(..., capturable=True)`` runs :func:`step` instead of the host-checked step:

- rho and sigma of every param group live in 0-dim float64 device tensors, rewritten in place
  (``fill_``, no synchronisation) when the Python floats in ``param_groups`` differ from the
  values last written (compared on the host);
- the sub-batch weights live in a float64 device tensor of length ``S``: a device tensor
  passed as ``step(weights=...)`` is copied in and normalised on the device (invalid weights
  — negative, non-finite, all zero — skip the step like a non-finite gradient); a Python
  sequence is validated on the host and copied with a non-blocking host-to-device copy from
  pinned memory (refused while a CUDA graph is being captured: the graph would replay it);
- the non-finite check writes a device flag ``found_inf`` (GradScaler's ``found_inf`` is folded
  into it) that the fused kernel reads: when it is set the kernel changes nothing, and
  :attr:`DeviceState.skipped` (``BADM.skipped_steps_tensor``) counts the skipped step on the
  device. ``on_nonfinite="raise"`` cannot raise without a synchronisation; in this mode it
  behaves like ``"skip"``;
- under ``torch.amp.GradScaler`` the Triton kernel unscales every gradient row in the fused
  pass (``inv_scale``); the ``torch`` back end unscales in a separate pass first.

So the step can be captured in a CUDA graph (``torch.cuda.graph``) and replayed: a replay
reads the hyperparameters, weights and flags current at replay time. Python-side bookkeeping
does not run during a replay: change ``rho``/``sigma`` and call :meth:`DeviceState.load_hyperparameters`
(or any eager ``step()``) before the next replay; ``step`` counts in the state_dict count Python
calls of ``step()``.

The same path (with host-validated weights) serves the non-capturable optimizer under
GradScaler when every buffer runs the Triton kernel on CUDA: unscale and skip then happen on
the device too, and skipped steps are counted in ``skipped_steps_tensor``, not ``skipped_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import _ops, backends, reference
from .reference import compute_dtype

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import BADM

__all__ = [
    "DeviceState",
    "flagged_kernel_for",
    "nonfinite_check_",
    "reference_step_flagged_",
    "state_of",
    "step",
    "uses_fused_amp",
]


# --------------------------------------------------------------------------- flagged kernels


@torch.no_grad()
def reference_step_flagged_(
    z: torch.Tensor,
    grads: torch.Tensor,
    duals: torch.Tensor,
    weights: torch.Tensor,
    rho: torch.Tensor,
    sigma: torch.Tensor,
    residuals: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    inv_scale: torch.Tensor | None = None,
) -> None:
    """The capture-safe step of the ``torch`` back end: :func:`badm_fast.reference.fused_step_`
    on ``grads * inv_scale`` with rho/sigma read from 0-dim device tensors, computed into
    temporaries and written back only where ``found_inf`` is zero (``torch.where``, no sync)."""
    cdt = compute_dtype(z.dtype)
    g = grads.to(cdt) * inv_scale.to(cdt) if inv_scale is not None else grads
    if found_inf is None:
        reference.fused_step_(z, g, duals, weights, rho, sigma, residuals)
        return
    new_z, new_duals = z.clone(), duals.clone()
    res = torch.zeros_like(residuals) if residuals is not None else None
    reference.fused_step_(new_z, g, new_duals, weights, rho, sigma, res)
    skip = found_inf.reshape(()) != 0
    duals.copy_(torch.where(skip, duals, new_duals))
    z.copy_(torch.where(skip, z, new_z))
    if residuals is not None:
        residuals.add_(torch.where(skip, torch.zeros_like(res), res))


def _triton_flagged(z, grads, duals, weights, rho, sigma, residuals=None, found_inf=None, inv_scale=None):
    from badm_fast.kernels import badm_step

    badm_step(z, grads, duals, weights, rho, sigma, residuals, found_inf=found_inf, inv_scale=inv_scale)


def flagged_kernel_for(name: str) -> Callable[..., None]:
    """The capture-safe step of back end ``name``:
    ``fn(z, grads, duals, weights, rho_t, sigma_t, residuals, found_inf, inv_scale)`` with rho/sigma
    in device tensors; changes nothing when ``found_inf`` is non-zero; gradients times ``inv_scale``."""
    if name == "triton":
        return _triton_flagged
    if name == "torch":
        return reference_step_flagged_
    raise ValueError(f"backend {name!r} has no capture-safe step; capture-safe back ends: {backends.CAPTURABLE}")


def nonfinite_check_(grads: torch.Tensor, found_inf: torch.Tensor, backend: str) -> None:
    """Set ``found_inf`` (one-element float32) to 1 when ``grads`` holds a NaN or an infinity;
    never clears it. Reads ``grads`` once; no host synchronisation."""
    if grads.numel() == 0:
        return
    if backend == "triton":
        from badm_fast.kernels import badm_nonfinite_check

        badm_nonfinite_check(grads, found_inf)
        return
    lo, hi = torch.aminmax(grads)  # NaN propagates; +-inf shows in one of them
    bad = ~torch.isfinite(torch.stack((lo, hi))).all()
    found_inf.copy_(torch.maximum(found_inf, bad.to(found_inf.dtype)))


# --------------------------------------------------------------------------- device state


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class DeviceState:
    """The per-step values of a capture-safe BADM, in tensors on the parameters' device.

    Attributes:
        rho, sigma (list of Tensor): per param group, 0-dim float64.
        alpha (Tensor): ``(S,)`` float64, the normalised weights of the last step.
        found_inf (Tensor): ``(1,)`` float32 skip flag of the current step.
        skipped (Tensor): 0-dim int64, steps skipped on the device since construction.
    """

    def __init__(self, device: torch.device, sub_batches: int):
        self.device = device
        self.sub_batches = sub_batches
        self.rho: list[torch.Tensor] = []
        self.sigma: list[torch.Tensor] = []
        self._hyper: list[tuple[float, float]] = []  # values last written, per group
        self.alpha = torch.full((sub_batches,), 1.0 / sub_batches, dtype=torch.float64, device=device)
        # The host weights last written into alpha; None when they came from a device tensor.
        self._alpha_src: tuple[float, ...] | None = (1.0 / sub_batches,) * sub_batches
        self._kernel_weights: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        self._kernel_src: dict[tuple[torch.dtype, int], Any] = {}
        self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        self.inv_scale = torch.ones(1, dtype=torch.float32, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    # -- hyperparameters ---------------------------------------------------------------
    def load_hyperparameters(self, groups: Sequence[dict[str, Any]]) -> None:
        """Write rho/sigma of ``groups`` into the device tensors where they changed (``fill_``,
        asynchronous). Refused during capture when a value changed: the graph would replay the
        write and pin the value; call this (or an eager ``step()``) before capturing instead."""
        from .optimizer import _check_rho_sigma

        for group in groups:
            _check_rho_sigma(group["rho"], group["sigma"])
        while len(self.rho) < len(groups):
            self.rho.append(torch.zeros((), dtype=torch.float64, device=self.device))
            self.sigma.append(torch.ones((), dtype=torch.float64, device=self.device))
            self._hyper.append((math.nan, math.nan))
        for i, group in enumerate(groups):
            value = (float(group["rho"]), float(group["sigma"]))
            if value == self._hyper[i]:
                continue
            if _capturing(self.device):
                raise RuntimeError(
                    f"rho/sigma of param group {i} changed to {value} since the last step outside the CUDA graph "
                    "capture; a write during capture would be replayed and pin the value. Run opt.step() once "
                    "before capturing (the usual warm-up) or call opt.device_state.load_hyperparameters("
                    "opt.param_groups); between replays, that call updates the values the graph reads"
                )
            self.rho[i].fill_(value[0])
            self.sigma[i].fill_(value[1])
            self._hyper[i] = value

    # -- weights -----------------------------------------------------------------------
    def load_alpha(self, alpha: Sequence[float]) -> None:
        """Write host-validated, normalised weights into :attr:`alpha` when they changed: a
        non-blocking copy from pinned memory on CUDA. Refused during capture when they changed."""
        key = tuple(float(a) for a in alpha)
        if key == self._alpha_src:
            return
        if _capturing(self.device):
            raise RuntimeError(
                "step(weights=...) got host weights different from the device weights while a CUDA graph is being "
                "captured; the graph would replay the copy. Pass the weights as a float device tensor of shape "
                f"({self.sub_batches},) on {self.device} and update it in place before each replay"
            )
        host = torch.tensor(key, dtype=torch.float64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.alpha.copy_(host, non_blocking=True)
        self._alpha_src = key

    def load_device_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Copy ``weights`` (a tensor on the device) into :attr:`alpha`, normalised on the device.

        Returns a 0-dim bool tensor, True when the weights are invalid (negative, non-finite or
        all zero); :attr:`alpha` then keeps its values and the step must be skipped.
        """
        S = self.sub_batches
        if weights.shape != (S,) or not weights.is_floating_point():
            raise ValueError(
                f"weights as a device tensor must be a floating-point tensor of shape ({S},), got "
                f"{tuple(weights.shape)} {weights.dtype}"
            )
        w = weights.detach().to(torch.float64)
        total = w.sum()
        invalid = ~(torch.isfinite(w).all() & (w >= 0).all() & (total > 0))
        self.alpha.copy_(torch.where(invalid, self.alpha, w / torch.where(invalid, 1.0, total)))
        self._alpha_src = None
        return invalid

    def kernel_weights(self, dtype: torch.dtype, rows: int) -> torch.Tensor:
        """The weights the kernel reads, in its arithmetic ``dtype``: :attr:`alpha` for
        ``rows == S > 1``, else ``[1.0]`` (one sub-batch, or the merged mode); refreshed from
        :attr:`alpha` when that changed."""
        key = (dtype, rows)
        w = self._kernel_weights.get(key)
        if w is None:
            w = torch.ones(rows, dtype=dtype, device=self.device)
            self._kernel_weights[key] = w
            self._kernel_src[key] = "ones"
        if rows > 1 and (self._alpha_src is None or self._kernel_src[key] != self._alpha_src):
            w.copy_(self.alpha)
            self._kernel_src[key] = self._alpha_src
        return w


# --------------------------------------------------------------------------- the step


def uses_fused_amp(opt: BADM) -> bool:
    """Whether a non-capturable ``opt`` runs this module's step for the current call: under
    GradScaler (``opt.grad_scale`` set), with every buffer on one CUDA device and the Triton
    back end, one process."""
    if getattr(opt, "grad_scale", None) is None or getattr(opt, "found_inf", None) is None:
        return False
    if getattr(opt, "process_group", None) is not None:
        return False
    devices = {buf.device for buf in opt._all_buffers()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return False
    return all(name == "triton" for name, _ in opt._kernels.values())


def state_of(opt: BADM) -> DeviceState:
    """``opt.device_state``, created on first use (on the device of the first buffer)."""
    st = getattr(opt, "device_state", None)
    if st is None:
        bufs = list(opt._all_buffers())
        st = DeviceState(bufs[0].device if bufs else torch.device("cpu"), opt.sub_batches)
        st.load_hyperparameters(opt.param_groups)
        opt.device_state = st
    return st


@_ops.not_traced  # host bookkeeping: weights, hyperparameters, buffers (no synchronisation)
def _prelude(opt: BADM, weights: Any) -> tuple[DeviceState, torch.Tensor | None]:
    """The host side of :func:`step`: validation, host-to-device writes of changed values, the
    buffers' bookkeeping and the step's metadata. Runs eagerly under ``torch.compile`` (one graph
    break), so changing rho, sigma or the weights never recompiles the traced step."""
    from .optimizer import _check_rho_sigma

    for group in opt.param_groups:
        _check_rho_sigma(group["rho"], group["sigma"])
    if getattr(opt, "found_inf", None) is not None and getattr(opt, "grad_scale", None) is None and opt._rows > 1:
        raise RuntimeError(
            "scaler.unscale_(opt) unscales only the .grad tensors, i.e. one sub-batch's row; with "
            "sub_batches > 1 let scaler.step(opt) unscale all rows (do not call scaler.unscale_)"
        )
    st = state_of(opt)
    invalid = None
    if opt.capturable and isinstance(weights, torch.Tensor) and weights.device == st.device:
        if opt.mode == "merged":
            raise ValueError(
                "mode='merged' checks on the host that the weights stay constant; pass them as a list, or use "
                "mode='sub_batch' for weights in a device tensor"
            )
        alpha = None
        invalid = st.load_device_weights(weights)
    else:
        if opt.capturable and weights is not None and _capturing(st.device):
            raise RuntimeError(
                "step(weights=...) got host weights while a CUDA graph is being captured; the graph would replay "
                f"a copy of them. Pass a float device tensor of shape ({opt.sub_batches},) on {st.device} and "
                "update it in place before each replay"
            )
        alpha, _ = opt._step_alpha(weights)  # validated on the host; merged mode: constant weights
        st.load_alpha(alpha)
    st.load_hyperparameters(opt.param_groups)
    for buf in opt._all_buffers():
        st.kernel_weights(compute_dtype(buf.dtype), buf.rows)
    opt._prepare_buffers()
    if opt.mode == "merged" and opt._merged_alpha is None and alpha is not None:
        opt._merged_alpha = alpha
    opt._last_alpha = alpha  # None for device weights: the state_dict then records none
    opt._step_count += 1
    return st, invalid


def step(opt: BADM, weights: Any, residuals: bool) -> None:
    """One BADM step with every decision on the device (see the module docstring)."""
    st, invalid = _prelude(opt, weights)
    buffers = list(opt._all_buffers())
    # The flag: GradScaler's found_inf, invalid device weights, non-finite gradients in any row.
    found_inf_in = getattr(opt, "found_inf", None)
    grad_scale = getattr(opt, "grad_scale", None)
    check = found_inf_in is not None or opt.on_nonfinite != "ignore"
    flag = st.found_inf if (check or invalid is not None) else None
    inv = None
    if flag is not None:
        if isinstance(found_inf_in, torch.Tensor):
            flag.copy_(found_inf_in.reshape(1))
        else:  # None, or GradScaler's sum over no device (no .grad was set): the int 0
            flag.fill_(float(found_inf_in or 0))
        if invalid is not None:
            flag.copy_(torch.maximum(flag, invalid.to(flag.dtype)))
    if grad_scale is not None:
        inv = st.inv_scale
        inv.copy_(grad_scale.double().reciprocal().float().reshape(1))
    sums = None
    with torch.no_grad():
        if check:
            for buf in buffers:
                name = opt._kernels[buf.device.type][0]
                if inv is not None and name != "triton":  # the separate pass: check and unscale in place
                    torch._amp_foreach_non_finite_check_and_unscale_([buf.grads], flag, inv)
                elif torch.compiler.is_compiling():
                    _ops.nonfinite_check(buf.grads, flag, name)
                else:
                    nonfinite_check_(buf.grads, flag, name)
        for gi, bufs in enumerate(opt._buffers):
            rho_t, sigma_t = st.rho[gi], st.sigma[gi]
            for buf in bufs:
                name = opt._kernels[buf.device.type][0]
                kernel_inv = inv if name == "triton" else None  # else unscaled by the separate pass
                w = st._kernel_weights[(compute_dtype(buf.dtype), buf.rows)]  # refreshed by _prelude
                res = torch.zeros(2, dtype=torch.float64, device=buf.device) if residuals else None
                for a, b in buf.active_runs():
                    args = (buf.z[a:b], buf.grads[:, a:b], buf.duals[:, a:b], w, rho_t, sigma_t, res, flag, kernel_inv)
                    if torch.compiler.is_compiling():  # one graph node, see badm_fast._ops
                        _ops.fused_step_capturable(*args, name)
                    else:
                        flagged_kernel_for(name)(*args)
                if residuals:
                    part = torch.stack((res[0], res[1] * sigma_t * sigma_t))
                    sums = part if sums is None else sums + part
        if flag is not None:
            st.skipped.add_((flag != 0).sum())
    if residuals:
        _set_residuals(opt, sums if sums is not None else torch.zeros(2, dtype=torch.float64, device=st.device))


# Attribute writes on an Optimizer made in code Dynamo traces are dropped (torch 2.13, see
# pytorch/pytorch#171590): the prelude and this run eagerly.
@_ops.not_traced
def _set_residuals(opt: BADM, sums: torch.Tensor) -> None:
    opt.residuals = {"primal": sums[0].sqrt(), "dual": sums[1].sqrt()}
