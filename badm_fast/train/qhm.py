r"""Quasi-hyperbolic momentum (QHM), a comparison optimizer for ``badm-train``."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

__all__ = ["QHM"]


class QHM(Optimizer):
    r"""Quasi-hyperbolic momentum (Ma & Yarats, "Quasi-hyperbolic momentum and Adam for deep
    learning", ICLR 2019).

    .. math::
        g_{buf} &\leftarrow \beta\, g_{buf} + (1 - \beta)\, \nabla f(\theta) \\
        \theta &\leftarrow \theta - \gamma \big[(1 - \nu)\, \nabla f(\theta) + \nu\, g_{buf}\big]

    with :math:`g_{buf}` starting at zero. ``nu=0`` is plain SGD, ``nu=1`` is momentum SGD
    with a dampened buffer. With constant sub-batch weights, BADM with penalty
    :math:`\sigma` and proximal coefficient :math:`\rho > 0` follows the same trajectory as
    QHM with ``lr = 1/sigma``, ``beta = rho/(rho+sigma)`` and ``nu = 1 - sigma/rho``
    (see docs/algorithm.md), which needs ``nu < 0`` when ``rho < sigma``; any finite ``nu`` is
    therefore accepted, the paper's recommended range being ``[0, 1]``.

    Args:
        params (iterable): parameters to optimize or dicts defining parameter groups.
        lr (float): learning rate :math:`\gamma` (default: 1e-3).
        beta (float): momentum decay :math:`\beta`, in [0, 1) (default: 0.999).
        nu (float): immediate discount factor :math:`\nu` (default: 0.7).
        weight_decay (float): L2 penalty added to the gradient (default: 0).
    """

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.999, nu: float = 0.7, weight_decay: float = 0.0):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr} (must be a finite number >= 0)")
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
        if not (isinstance(nu, (int, float)) and math.isfinite(nu)):
            raise ValueError(f"Invalid nu: {nu} (must be a finite number)")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be a finite number >= 0)")
        super().__init__(params, dict(lr=lr, beta=beta, nu=nu, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (callable, optional): a closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, nu, wd = group["lr"], group["beta"], group["nu"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("QHM does not support sparse gradients")
                grad = p.grad
                if wd != 0.0:
                    grad = grad.add(p, alpha=wd)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(beta).add_(grad, alpha=1.0 - beta)
                p.add_(grad, alpha=-lr * (1.0 - nu))
                p.add_(buf, alpha=-lr * nu)
        return loss
