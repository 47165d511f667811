"""One-call training steps for BADM: split a batch, run the sub-batches, step."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Callable

import torch

from .optimizer import BADM

__all__ = ["split_batch", "split_step", "vmap_step"]


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def split_batch(inputs: Any, targets: torch.Tensor, parts: int) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Split ``inputs`` (a tensor or a tuple of tensors) and ``targets`` along dim 0 into
    ``parts`` contiguous pieces, as equal as possible; pieces may be empty when the batch has
    fewer than ``parts`` samples."""
    xs = _as_tuple(inputs)
    n = targets.shape[0]
    for x in xs:
        if x.shape[0] != n:
            raise ValueError(f"inputs have {x.shape[0]} samples but targets {n}")
    x_parts = [x.tensor_split(parts) for x in xs]
    y_parts = targets.tensor_split(parts)
    return [(tuple(xp[s] for xp in x_parts), y_parts[s]) for s in range(parts)]


def _optimizers(opt: BADM | Sequence[BADM]) -> list[BADM]:
    opts = [opt] if isinstance(opt, BADM) else list(opt)
    if not opts or not all(isinstance(o, BADM) for o in opts):
        raise ValueError("split_step takes a BADM optimizer or a sequence of them")
    if len({(o.sub_batches, o.mode) for o in opts}) != 1:
        raise ValueError(
            "the optimizers given to split_step must have the same sub_batches and mode, got "
            f"{[(o.sub_batches, o.mode) for o in opts]}"
        )
    return opts


def split_step(
    model: Callable[..., torch.Tensor],
    opt: BADM | Sequence[BADM],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Any,
    targets: torch.Tensor,
    *,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One BADM training step on a batch; returns the batch's mean loss (a detached tensor).

    Splits the batch into ``opt.sub_batches`` sub-batches along dim 0, runs each one's
    forward and backward pass inside ``opt.sub_batch(s, weight=size)``, then steps with the
    sub-batch sizes as weights (a ragged last batch is weighted correctly; with
    ``overlap=True`` the all-reduce starts during the last sub-batch's backward pass, unless
    ``max_grad_norm`` clips the gradients after it). ``loss_fn`` must return the
    mean loss of the samples it is given. In ``mode="merged"`` the whole batch takes one
    forward and backward pass (the exact fast path).

    ``opt`` may be a sequence of BADM optimizers over parts of the model (with the same
    ``sub_batches`` and ``mode``): every one takes each sub-batch's gradients and steps.
    ``max_grad_norm``: clip each sub-batch's gradient to this norm (over the parameters of all the
    optimizers, like ``torch.nn.utils.clip_grad_norm_`` over one gradient) before its row is taken.
    """
    opts = _optimizers(opt)
    first = opts[0]
    n = targets.shape[0]
    if n == 0:
        raise ValueError("split_step got an empty batch")
    parts = split_batch(inputs, targets, first.sub_batches)  # checks the sizes before anything changes
    params = [p for o in opts for group in o.param_groups for p in group["params"]]
    for o in opts:
        o.zero_grad(set_to_none=True)
    if first.mode == "merged":
        loss = loss_fn(model(*_as_tuple(inputs)), targets)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        for o in opts:
            o.step()
        return loss.detach()
    total = None
    sizes = []
    try:
        for o in opts:  # clipping edits the gradients after the backward pass: nothing is reduced before it
            o._no_overlap = max_grad_norm is not None
        for s, (xs, ys) in enumerate(parts):
            sizes.append(ys.shape[0])
            with contextlib.ExitStack() as stack:
                for o in opts:  # the sizes are the weights: with overlap=True the last context needs them
                    stack.enter_context(o.sub_batch(s, weight=float(ys.shape[0])))
                if ys.shape[0] == 0:  # an empty sub-batch: no forward pass, gradient zero
                    continue
                loss = loss_fn(model(*xs), ys)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            part = loss.detach() * ys.shape[0]
            total = part if total is None else total + part
    finally:
        for o in opts:
            o._no_overlap = False
    for o in opts:
        o.step(weights=sizes)
    return total / n


def vmap_step(
    model: torch.nn.Module,
    opt: BADM,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Any,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Like :func:`split_step`, but all ``S`` sub-batch gradients come from one batched pass
    (``torch.func.vmap`` over ``torch.func.grad``) instead of ``S`` backward passes.

    For models without batch-dependent layers (no BatchNorm in training mode, no in-place
    buffer updates). The batch size must be a multiple of ``opt.sub_batches``. Returns the
    batch's mean loss.
    """
    from torch.func import functional_call, grad_and_value, vmap

    if opt.mode != "sub_batch":
        raise ValueError("vmap_step computes per-sub-batch gradients; use split_step with mode='merged'")
    S = opt.sub_batches
    xs = _as_tuple(inputs)
    n = targets.shape[0]
    if n == 0 or n % S:
        raise ValueError(f"vmap_step needs a batch size that is a multiple of sub_batches={S}, got {n}")
    names, params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            params.append(p)
    buffers = dict(model.named_buffers())

    def sub_loss(param_values, x_s, y_s):
        out = functional_call(model, ({**dict(zip(names, param_values)), **buffers}), x_s)
        return loss_fn(out, y_s)

    split = [x.reshape(S, n // S, *x.shape[1:]) for x in xs]
    y_split = targets.reshape(S, n // S, *targets.shape[1:])
    detached = tuple(p.detach() for p in params)
    grads, losses = vmap(grad_and_value(sub_loss), in_dims=(None, 0, 0))(detached, tuple(split), y_split)
    opt.zero_grad(set_to_none=True)
    for s in range(S):
        opt.set_grads(s, params, [g[s] for g in grads])
    opt.step()
    return losses.mean().detach()
