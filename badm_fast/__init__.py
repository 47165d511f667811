"""badm_fast: BADM (batch ADMM, arXiv:2407.01640) as a fused PyTorch optimizer.

    opt = badm_fast.BADM(model.parameters(), sub_batches=4, rho=9.0, sigma=1.0)
    for x, y in loader:
        opt.zero_grad()
        xs, ys = x.tensor_split(4), y.tensor_split(4)  # always 4 pieces (chunk can give fewer)
        for s in range(4):
            with opt.sub_batch(s):
                loss_fn(model(xs[s]), ys[s]).backward()
        opt.step(weights=[len(t) for t in ys])

The update and its identities: docs/algorithm.md.
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
