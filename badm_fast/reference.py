r"""Readable PyTorch specification of BADM (batch ADMM, arXiv:2407.01640).

This module is the oracle of the test suite, the ``backend="torch"`` fallback of
:class:`badm_fast.BADM` and the baseline of the benchmarks. It holds two forms of the
same update (derived in docs/algorithm.md):

Paper form (explicit local copies ``w_s`` and duals ``pi_s``), one batch:

.. math::
    w_s &\leftarrow z - (g_s + \pi_s) / (\rho + \sigma) \\
    \pi_s &\leftarrow \pi_s + \sigma (w_s - z) \\
    z &\leftarrow \textstyle\sum_s \alpha_s (w_s + \pi_s / \sigma)

Fused form (only ``pi_s`` stored, ``z`` aggregated eagerly), what the kernels compute:

.. math::
    \pi_s' &= (\rho \pi_s - \sigma g_s) / (\rho + \sigma) \\
    z' &= z + \textstyle\sum_s \alpha_s \big[-2 g_s / (\rho + \sigma)
          + (\rho - \sigma) \pi_s / (\sigma (\rho + \sigma))\big]

Arithmetic is done in fp32 (fp64 for fp64 tensors) whatever the storage dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "compute_dtype",
    "badm_element",
    "fused_step_",
    "PaperState",
    "paper_step",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic (and dual-state) dtype for parameters stored as ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def badm_element(z, g, p, rho, sigma):
    """Per-sub-batch terms of the fused update, written as in docs/algorithm.md.

    Returns ``(new_dual, z_term)`` where ``z' = z + sum_s alpha_s * z_term_s``.
    Works on tensors or Python floats alike.
    """
    c = 1.0 / (rho + sigma)
    new_dual = (rho * p - sigma * g) * c
    z_term = -2.0 * g * c + (rho - sigma) * p * (c / sigma)
    return new_dual, z_term


@torch.no_grad()
def fused_step_(
    z: torch.Tensor,
    grads: torch.Tensor,
    duals: torch.Tensor,
    weights: torch.Tensor,
    rho: float,
    sigma: float,
    residuals: torch.Tensor | None = None,
) -> None:
    """One fused BADM step, in place on ``z`` (shape ``(P,)``) and ``duals`` (``(S, P)``).

    Args:
        z: global weights, any floating dtype, 1-D.
        grads: ``(S, P)`` sub-batch gradients taken at ``z``, same dtype as ``z``.
        duals: ``(S, P)`` duals in :func:`compute_dtype` of ``z``; updated in place.
        weights: ``(S,)`` normalised sub-batch weights ``alpha_s`` (sum to 1).
        rho, sigma: proximal coefficient (>= 0) and penalty (> 0).
        residuals: optional ``(2,)`` float64 tensor; ``sum_s alpha_s ||w_s' - z||^2`` and
            ``||z' - z||^2`` of this call are *added* to it.
    """
    cdt = compute_dtype(z.dtype)
    zc = z.to(cdt)
    g = grads.to(cdt)
    p = duals.to(cdt)
    a = weights.to(device=z.device, dtype=cdt).view(-1, 1)
    new_dual, z_term = badm_element(zc, g, p, rho, sigma)
    delta = (a * z_term).sum(0)
    if residuals is not None:
        local = (g + p) / (rho + sigma)  # = -(w_s' - z)
        residuals[0] += (a * local.square()).sum().to(residuals.dtype)
        residuals[1] += delta.square().sum().to(residuals.dtype)
    duals.copy_(new_dual)
    z.copy_(zc + delta)


@dataclass
class PaperState:
    """Explicit state of the paper form: local copies ``w`` and duals ``pi``, both ``(S, ...)``."""

    w: torch.Tensor
    pi: torch.Tensor
    alpha: torch.Tensor = field(default=None)  # weights of the step that produced w, pi

    @classmethod
    def init(cls, w0: torch.Tensor, sub_batches: int) -> "PaperState":
        w = w0.detach().to(compute_dtype(w0.dtype)).unsqueeze(0).repeat(sub_batches, *([1] * w0.dim()))
        alpha = torch.full((sub_batches,), 1.0 / sub_batches, dtype=w.dtype)
        return cls(w=w, pi=torch.zeros_like(w), alpha=alpha)

    def aggregate(self, sigma: float) -> torch.Tensor:
        """Step 1: ``z = sum_s alpha_s (w_s + pi_s / sigma)``."""
        a = self.alpha.to(self.w.dtype).view(-1, *([1] * (self.w.dim() - 1)))
        return (a * (self.w + self.pi / sigma)).sum(0)


@torch.no_grad()
def paper_step(
    state: PaperState, grads: torch.Tensor, weights: torch.Tensor, rho: float, sigma: float
) -> torch.Tensor:
    """A direct transcription of the paper's steps 3, 4 then 1; returns the new ``z``.

    ``grads[s]`` must be taken at ``z = state.aggregate(sigma)`` of the previous step.
    ``weights`` are this step's normalised ``alpha_s``.
    """
    z = state.aggregate(sigma)
    g = grads.to(state.w.dtype)
    state.w = z - (g + state.pi) / (rho + sigma)
    state.pi = state.pi + sigma * (state.w - z)
    state.alpha = weights.to(state.w.dtype)
    return state.aggregate(sigma)
