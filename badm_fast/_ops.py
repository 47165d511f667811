r"""The fused step as ``torch.library`` custom ops, so that ``torch.compile`` can trace ``opt.step()``.

Two ops, one per form of the hyperparameters (a schema cannot take "float or Tensor"):

``badm_fast::fused_step(Tensor(a!) z, Tensor grads, Tensor(b!) duals, Tensor weights,
float rho, float sigma, Tensor(c!)? residuals, str backend) -> ()``
    the kernel contract of :func:`badm_fast.reference.fused_step_` run by back end ``backend``
    (:func:`badm_fast.backends.kernel_for`). Under ``torch.compile`` rho and sigma are
    constants of the graph: changing them recompiles (as a float learning rate does for
    ``torch.optim``); ``BADM(capturable=True)`` avoids that.

``badm_fast::fused_step_capturable(Tensor(a!) z, Tensor grads, Tensor(b!) duals, Tensor weights,
Tensor rho, Tensor sigma, Tensor(c!)? residuals, Tensor? found_inf, Tensor? inv_scale,
str backend) -> ()``
    the capture-safe form (:func:`badm_fast.capture.flagged_kernel_for`): rho and sigma in
    0-dim device tensors, the step skipped when ``found_inf`` is non-zero, gradients multiplied
    by ``inv_scale``; back ends ``"triton"`` and ``"torch"``.

Both mutate ``z``, ``duals`` and ``residuals`` in place and return nothing, so their fake
(meta) implementations do nothing: the shapes of the outputs are the inputs'. The back end is
an argument rather than one op per back end because the kernels share one contract and the
optimizer picks the back end once; one op keeps graphs and the fake implementation single.

The Triton kernel is wrapped as an opaque op, not with ``torch.library.triton_op``: a
``triton_op`` body is traced with fake tensors by ``wrap_triton``, which needs a compiled
``JITFunction`` — under ``TRITON_INTERPRET=1`` (the only way to run Triton on this project's
CPU-only CI) the kernel is an ``InterpretedFunction`` and tracing fails with "Cannot access
data pointer of Tensor" — and inductor cannot fuse anything into an in-place, memory-bound pass
over the whole flat buffer anyway.

:class:`badm_fast.BADM` calls these ops only while ``torch.compiler.is_compiling()``; in eager
mode it calls the kernels directly (no dispatcher round trip per step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends

__all__ = ["fused_step", "fused_step_capturable"]


@torch.library.custom_op("badm_fast::fused_step", mutates_args=("z", "duals", "residuals"))
def fused_step(
    z: Tensor,
    grads: Tensor,
    duals: Tensor,
    weights: Tensor,
    rho: float,
    sigma: float,
    residuals: Tensor | None,
    backend: str,
) -> None:
    """One fused BADM step in place by back end ``backend`` (the kernel contract)."""
    backends.kernel_for(backend)(z, grads, duals, weights, rho, sigma, residuals)


@fused_step.register_fake
def _fused_step_fake(z, grads, duals, weights, rho, sigma, residuals, backend) -> None:
    return None


@torch.library.custom_op("badm_fast::fused_step_capturable", mutates_args=("z", "duals", "residuals"))
def fused_step_capturable(
    z: Tensor,
    grads: Tensor,
    duals: Tensor,
    weights: Tensor,
    rho: Tensor,
    sigma: Tensor,
    residuals: Tensor | None,
    found_inf: Tensor | None,
    inv_scale: Tensor | None,
    backend: str,
) -> None:
    """The capture-safe fused step (hyperparameters in device tensors, skip flag, unscale)."""
    from .capture import flagged_kernel_for

    flagged_kernel_for(backend)(z, grads, duals, weights, rho, sigma, residuals, found_inf, inv_scale)


@fused_step_capturable.register_fake
def _fused_step_capturable_fake(z, grads, duals, weights, rho, sigma, residuals, found_inf, inv_scale, backend) -> None:
    return None
