"""badm_fast: BADM (batch ADMM, arXiv:2407.01640) as a fused PyTorch optimizer.

    opt = badm_fast.BADM(model.parameters(), sub_batches=4, rho=9.0, sigma=10.0)
    for x, y in loader:
        opt.zero_grad()
        for s, (xs, ys) in enumerate(zip(x.chunk(4), y.chunk(4))):
            with opt.sub_batch(s):
                loss_fn(model(xs), ys).backward()
        opt.step()
"""

from . import distributed, reference
from ._version import __version__
from .backends import BackendUnavailable
from .helpers import split_batch, split_step, vmap_step
from .optimizer import BADM, STATE_VERSION

__all__ = [
    "BADM",
    "BackendUnavailable",
    "STATE_VERSION",
    "distributed",
    "reference",
    "split_batch",
    "split_step",
    "vmap_step",
    "__version__",
]
