r"""Readable PyTorch specification of BADM (batch ADMM, arXiv:2407.01640).

This module is the oracle of the test suite, the ``backend="torch"`` back end of
:class:`badm_fast.BADM` and the baseline of the benchmarks. It holds two forms of the same
update (docs/algorithm.md derives one from the other):

Paper form (explicit local copies ``w_s`` and duals ``pi_s``), one batch:

.. math::
    w_s &\leftarrow z - (g_s + \pi_s) / (\rho + \sigma) \\
    \pi_s &\leftarrow \pi_s + \sigma (w_s - z) \\
    z &\leftarrow \textstyle\sum_s \alpha_s (w_s + \pi_s / \sigma)

Fused form in the lr/momentum parameterisation (``lr = 1/(rho+sigma)``,
``momentum = rho/(rho+sigma)``), what every back end computes:

.. math::
    \pi_s' &= \mu \pi_s - (1 - \mu) g_s \\
    z' &= z + \textstyle\sum_s \alpha_s \big[-2\eta g_s + \eta\frac{2\mu - 1}{1 - \mu} \pi_s\big]

:func:`fused_step_` is the kernel contract. Every back end computes it with the same constants
(:func:`step_constants`, derived in float64 in the order written there, then rounded once to the
arithmetic dtype) and the same per-element operation order, each operation rounded as written
(no fused multiply-add), so that every back end gives the same bits as this one in float32 and
float64. As in torch.optim, the weight-decay term is added only when ``weight_decay != 0`` and the
gradient is negated only when ``maximize`` is set (:func:`step_switches`): the compiled kernels
choose the operations once per call (or per block of work), not per element.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "HYPER",
    "compute_dtype",
    "hyper_tensor",
    "step_constants",
    "step_switches",
    "fused_step_",
    "nonfinite_check_",
    "copy_check_",
    "PaperState",
    "paper_step",
    "lr_momentum",
    "rho_sigma",
]

# The order of the entries of a hyperparameter tensor (float64, shape (4,)).
HYPER = ("lr", "momentum", "weight_decay", "maximize")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic (and dual-state) dtype for parameters stored as ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lr_momentum(rho: float, sigma: float) -> tuple[float, float]:
    """``(lr, momentum) = (1/(rho+sigma), rho/(rho+sigma))``, the exact bijection."""
    total = float(rho) + float(sigma)
    return 1.0 / total, float(rho) / total


def rho_sigma(lr: float, momentum: float) -> tuple[float, float]:
    """``(rho, sigma) = (momentum/lr, (1-momentum)/lr)`` (infinite for ``lr == 0``)."""
    if lr == 0:
        return float("inf"), float("inf")
    return float(momentum) / lr, (1.0 - float(momentum)) / lr


def hyper_tensor(lr, momentum, weight_decay=0.0, maximize=False, device=None) -> torch.Tensor:
    """The ``(4,)`` float64 hyperparameter tensor of the kernel contract (see :data:`HYPER`)."""
    return torch.tensor([float(lr), float(momentum), float(weight_decay), float(bool(maximize))],
                        dtype=torch.float64, device=device)


def step_constants(hyper: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The per-step constants, derived from ``hyper`` in float64 in exactly this order (every
    back end does the same) and rounded once to ``dtype``; 0-dim tensors on ``hyper``'s device.

    ========  ====================================  =========================================
    name      float64 formula                       role
    ========  ====================================  =========================================
    ``a``     ``mu``                                dual: ``pi' = a*pi - b*g``
    ``b``     ``1 - mu``
    ``c``     ``-2 * lr``                           step: ``t = c*g + d*pi``
    ``d``     ``(lr * (2*mu - 1)) / (1 - mu)``
    ``e``     ``lr``                                residual: ``w_s' - z = -e*(g + pi)``
    ``wd``    ``weight_decay``                      ``g += wd*z`` (only when ``weight_decay != 0``)
    ``sign``  ``1 - 2*maximize``                    ``g *= sign`` (only when ``maximize != 0``)
    ========  ====================================  =========================================

    Whether the last two are applied at all is :func:`step_switches`.
    """
    h = hyper.detach().to(torch.float64)
    lr, mu, wd, mx = h[0], h[1], h[2], h[3]
    one_minus = 1.0 - mu
    two_mu_minus_one = 2.0 * mu - 1.0
    k = {
        "a": mu,
        "b": one_minus,
        "c": -2.0 * lr,
        "d": (lr * two_mu_minus_one) / one_minus,
        "e": lr,
        "wd": wd,
        "sign": 1.0 - 2.0 * mx,
    }
    return {name: v.to(dtype) for name, v in k.items()}


def step_switches(hyper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decay, maximize)``: 0-dim bool tensors on ``hyper``'s device, ``weight_decay != 0`` and
    ``maximize != 0``, both compared in float64 (as torch.optim compares the Python floats).

    ``decay`` false: the step neither computes ``wz = wd*z`` nor adds it (``g + 0*z`` would turn a
    ``-0.0`` gradient into ``+0.0``, and an infinite or NaN weight into a NaN gradient).
    ``maximize`` false: the gradient is not multiplied by ``sign``. Every back end decides both
    from ``hyper`` as read on the device, once per call or per block of work, never per element.
    """
    h = hyper.detach().to(torch.float64)
    return h[2] != 0, h[3] != 0


@torch.no_grad()
def fused_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    duals: Sequence[torch.Tensor],
    weights: torch.Tensor,
    hyper: torch.Tensor,
    residuals: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    inv_scale: torch.Tensor | None = None,
) -> None:
    """One fused BADM step, in place on every ``params[i]`` and ``duals[r*N + i]``.

    The kernel contract of every back end (see :mod:`badm_fast.backends`).

    Args:
        params: ``N`` tensors of one dtype (fp32, fp64, bf16, fp16) on one device: the weights
            ``z``, updated in place.
        grads: ``R*N`` tensors or None; ``grads[r*N + i]`` is row ``r``'s gradient of
            ``params[i]`` (same shape, strides and dtype). Item ``i`` is skipped (its weights and
            duals stay) when ``grads[i]`` is None; otherwise all its ``R`` rows are given.
        duals: ``R*N`` tensors in :func:`compute_dtype`, ``duals[r*N + i]`` shaped like
            ``params[i]``; updated in place.
        weights: ``(R,)`` normalised sub-batch weights in the compute dtype.
        hyper: ``(4,)`` float64 ``[lr, momentum, weight_decay, maximize]`` (:data:`HYPER`) on the
            parameters' device; read on the device (never on the host).
        residuals: optional ``(2,)`` float64; ``sum_s alpha_s ||w_s' - z||^2`` and
            ``||z' - z||^2`` of this call are *added* to it.
        found_inf: optional one-element float32; when non-zero nothing changes.
        inv_scale: optional one-element float32; every gradient is multiplied by it first.

    Per element, in the compute dtype and in this order (each operation rounded):
    [decay: ``wz = wd*z``]; ``delta = 0``; for every row ``r``: ``g = G_r [* inv_scale]``;
    [maximize: ``g = g*sign``]; [decay: ``g = g + wz``]; ``pi' = a*pi - b*g; t = c*g + d*pi;
    delta = delta + alpha_r*t`` [residual: ``l = (g + pi)*e; prim = prim + (alpha_r*l)*l``];
    then ``z' = z + delta``. ``decay`` and ``maximize`` are :func:`step_switches`: the bracketed
    operations are skipped when they are false (here chosen with ``torch.where``, so that
    ``hyper`` is never read on the host, under capture and torch.compile too).
    """
    params = list(params)
    n = len(params)
    if n == 0:
        return
    rows = len(grads) // n
    cdt = compute_dtype(params[0].dtype)
    k = step_constants(hyper, cdt)
    decay, maximize = step_switches(hyper)
    alpha = weights.to(cdt)
    inv = inv_scale.reshape(()).to(cdt) if inv_scale is not None else None
    skip = None if found_inf is None else (found_inf.reshape(()) != 0)
    prim_total = None
    dual_total = None
    for i, z in enumerate(params):
        if grads[i] is None or z.numel() == 0:
            continue
        zc = z.to(cdt)
        wz = k["wd"] * zc
        delta = torch.zeros_like(zc)
        prim = torch.zeros_like(zc) if residuals is not None else None
        new_duals = []
        for r in range(rows):
            g = grads[r * n + i].to(cdt)
            if inv is not None:
                g = g * inv
            g = torch.where(maximize, g * k["sign"], g)
            g = torch.where(decay, g + wz, g)
            p = duals[r * n + i]
            new_duals.append(k["a"] * p - k["b"] * g)
            t = k["c"] * g + k["d"] * p
            delta = delta + alpha[r] * t
            if prim is not None:
                local = (g + p) * k["e"]
                prim = prim + (alpha[r] * local) * local
        new_z = (zc + delta).to(z.dtype)
        if skip is None:
            for r in range(rows):
                duals[r * n + i].copy_(new_duals[r])
            z.copy_(new_z)
        else:  # decided on the device: no host synchronisation
            for r in range(rows):
                d = duals[r * n + i]
                d.copy_(torch.where(skip, d, new_duals[r]))
            z.copy_(torch.where(skip, z, new_z))
        if residuals is not None:
            ps = prim.to(torch.float64).sum()
            ds = (delta * delta).to(torch.float64).sum()
            prim_total = ps if prim_total is None else prim_total + ps
            dual_total = ds if dual_total is None else dual_total + ds
    if residuals is not None and prim_total is not None:
        add = torch.stack((prim_total, dual_total)).to(residuals.device)
        if skip is not None:
            add = torch.where(skip.to(add.device), torch.zeros_like(add), add)
        residuals.add_(add)


@torch.no_grad()
def nonfinite_check_(tensors: Sequence[torch.Tensor | None], found_inf: torch.Tensor) -> None:
    """Set ``found_inf`` (one-element float32) to 1 when any tensor holds a NaN or an infinity;
    never clears it; None entries are skipped. No host synchronisation."""
    bad = None
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t.detach().reshape(-1))  # NaN propagates; +-inf shows in one of them
        b = ~(torch.isfinite(lo) & torch.isfinite(hi))
        bad = b if bad is None else bad | b
    if bad is not None:
        found_inf.copy_(torch.maximum(found_inf, bad.to(found_inf.dtype).reshape(found_inf.shape)))


@torch.no_grad()
def copy_check_(
    dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor | None], found_inf: torch.Tensor | None = None
) -> None:
    """``dst[i].copy_(src[i])`` for every non-None ``src[i]`` and, when ``found_inf`` is given,
    raise it when a copied value is a NaN or an infinity (one read of ``src``)."""
    for d, s in zip(dst, src):
        if s is not None:
            d.copy_(s)
    if found_inf is not None:
        nonfinite_check_([d if s is not None else None for d, s in zip(dst, src)], found_inf)


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
