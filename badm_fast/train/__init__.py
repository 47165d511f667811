"""The ``badm-train`` application: BADM against SGD, Adam, AdamW and QHM on real data.

``badm-train ...`` and ``python -m badm_fast.train ...`` both run :func:`main`. The modules:

- :mod:`badm_fast.train.cli`: the command line, the training loop and the results it writes;
- :mod:`badm_fast.train.tasks`: the tasks (data, model, loss, test metric, per-task defaults);
- :mod:`badm_fast.train.checkpoint`: crash-safe checkpoints and exact ``--resume``;
- :mod:`badm_fast.train.plotting`: the learning curves and generated samples;
- :mod:`badm_fast.train.qhm`: quasi-hyperbolic momentum, one of the comparison optimizers.

The optimizer itself lives at the top of :mod:`badm_fast`; nothing there imports this package.
"""

from badm_fast.train.cli import main

__all__ = ["main"]
