r"""The kernel contract as ``torch.library`` custom ops, so that ``torch.compile`` can trace ``opt.step()``.

``badm_fast::fused_step(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] duals, Tensor weights,
Tensor hyper, Tensor(c!)? residuals, Tensor? found_inf, Tensor? inv_scale, str backend) -> ()``
    :func:`badm_fast.reference.fused_step_` run by back end ``backend`` (:mod:`badm_fast.backends`).
    The hyperparameters are a tensor, so a scheduler's change of ``lr`` never recompiles.

The step mutates ``params``, ``duals`` and ``residuals`` in place and returns nothing, so its fake
(meta) implementation does nothing. The back end is an argument rather than one op per back end
because the kernels share one contract and the optimizer picks the back end once.

The Triton kernel is wrapped as an opaque op, not with ``torch.library.triton_op``: a ``triton_op``
body is traced with fake tensors by ``wrap_triton``, which needs a compiled ``JITFunction`` — under
``TRITON_INTERPRET=1`` (the only way to run Triton on this project's CPU-only CI) the kernel is an
``InterpretedFunction`` — and inductor cannot fuse anything into an in-place, memory-bound pass over
every parameter anyway.

:class:`badm_fast.BADM` calls this op only while ``torch.compiler.is_compiling()``; in eager mode it
calls the kernels directly (no dispatcher round trip per step).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

import torch
from torch import Tensor

from . import backends

__all__ = ["fused_step", "not_traced"]

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


@torch.library.custom_op("badm_fast::fused_step", mutates_args=("params", "duals", "residuals"))
def fused_step(
    params: list[Tensor],
    grads: list[Optional[Tensor]],
    duals: list[Tensor],
    weights: Tensor,
    hyper: Tensor,
    residuals: Optional[Tensor],
    found_inf: Optional[Tensor],
    inv_scale: Optional[Tensor],
    backend: str,
) -> None:
    """One fused BADM step in place by back end ``backend`` (the kernel contract)."""
    backends.get(backend)[0](params, grads, duals, weights, hyper, residuals, found_inf, inv_scale)


@fused_step.register_fake
def _fused_step_fake(params, grads, duals, weights, hyper, residuals, found_inf, inv_scale, backend) -> None:
    return None
