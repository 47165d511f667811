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

``badm_fast::nonfinite_check(Tensor grads, Tensor(a!) found_inf, str backend) -> ()``
    raises the skip flag when ``grads`` holds a NaN or an infinity
    (:func:`badm_fast.capture.nonfinite_check_`; the Triton scan for ``"triton"``).

The steps mutate ``z``, ``duals`` and ``residuals`` in place and return nothing, so their fake
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

import functools
from typing import Callable, TypeVar

import torch
from torch import Tensor

from . import backends

__all__ = ["fused_step", "fused_step_capturable", "nonfinite_check", "not_traced"]

_F = TypeVar("_F", bound=Callable)


def not_traced(fn: _F) -> _F:
    """Run ``fn`` outside any graph: under ``torch.compile`` Dynamo breaks the graph around the
    call and runs it eagerly (host bookkeeping, host synchronisations, attribute writes on the
    optimizer — Dynamo drops those when it traces them, pytorch/pytorch#171590). In eager mode
    ``fn`` is called directly.

    ``torch._disable_dynamo`` (what torch.optim uses for ``zero_grad``) rather than
    ``torch.compiler.disable``: the latter imports ``torch._dynamo``, and with it Triton, when
    the decorator runs, i.e. at ``import badm_fast``.
    """
    disabled = torch._disable_dynamo(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


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


@torch.library.custom_op("badm_fast::nonfinite_check", mutates_args=("found_inf",))
def nonfinite_check(grads: Tensor, found_inf: Tensor, backend: str) -> None:
    """Set ``found_inf`` to 1 when ``grads`` holds a NaN or an infinity (never clears it)."""
    from .capture import nonfinite_check_

    nonfinite_check_(grads, found_inf, backend)


@nonfinite_check.register_fake
def _nonfinite_check_fake(grads, found_inf, backend) -> None:
    return None
