r"""The kernel contract as ``torch.library`` custom ops, so that ``torch.compile`` can trace ``opt.step()``.

``badm_fast::nonfinite_check(Tensor?[] tensors, Tensor(a!) found_inf, str backend) -> ()``
    :func:`badm_fast.reference.nonfinite_check_` of back end ``backend``: raises the skip flag.

``badm_fast::copy_check(Tensor(a!)[] dst, Tensor?[] src, Tensor(b!)? found_inf, str backend) -> ()``
    :func:`badm_fast.reference.copy_check_` of back end ``backend``.

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

__all__ = ["copy_check", "fused_step", "nonfinite_check", "not_traced", "register_extension_fakes"]

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


@torch.library.custom_op("badm_fast::nonfinite_check", mutates_args=("found_inf",))
def nonfinite_check(tensors: list[Optional[Tensor]], found_inf: Tensor, backend: str) -> None:
    """Set ``found_inf`` to 1 when a tensor holds a NaN or an infinity (never clears it)."""
    backends.get(backend)[1](tensors, found_inf)


@nonfinite_check.register_fake
def _nonfinite_check_fake(tensors, found_inf, backend) -> None:
    return None


@torch.library.custom_op("badm_fast::copy_check", mutates_args=("dst", "found_inf"))
def copy_check(dst: list[Tensor], src: list[Optional[Tensor]], found_inf: Optional[Tensor], backend: str) -> None:
    """``dst[i] <- src[i]`` and the non-finite check of the copied values in the same read."""
    backends.get(backend)[2](dst, src, found_inf)


@copy_check.register_fake
def _copy_check_fake(dst, src, found_inf, backend) -> None:
    return None


def register_extension_fakes() -> None:
    """Fake (meta) implementations of the compiled extension's ops, which mutate in place and
    return nothing, so that tracing through them works too."""
    for op in ("fused_step_ext", "nonfinite_check_ext", "copy_check_ext"):
        try:
            torch.library.register_fake(f"badm_fast::{op}", lambda *args, **kwargs: None)
        except RuntimeError:  # already registered, or the op is absent
            pass
