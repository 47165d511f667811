"""``badm-train``: train real models with BADM and with SGD, Adam, AdamW or QHM, side by side.

Every optimizer starts from the same initial weights and sees the same data in the same
order (one seeded permutation per epoch, identical for all). Results go to ``--out``
(default ``runs/<task>``): ``results.json`` (config, versions, per-epoch train loss, test
metric and cumulative training time per optimizer), ``curves.png``, ``summary.md`` (the
summary table, also printed at the end) and, for ``--task generate``, ``samples.png``.

Arguments that cannot work are refused before anything is loaded, trained or created: one
line ``badm-train: error: ...`` on stderr and exit status 2 (a non-finite or out-of-range
hyperparameter, an unknown or unavailable BADM back end, a device this machine does not have,
an ``--out`` that cannot be written, a missing optional dependency or data set). Ctrl-C stops
the job with one line naming the last checkpoint and the ``--resume`` command, exit status 130.
Progress goes to stderr: a bar (epoch, step, loss, last test metric, phase) on a terminal,
one line per epoch otherwise.

Examples::

    badm-train                                   # digits, badm vs sgd vs adam, ~1 min on 2 cores
    badm-train --task fashion-mnist --epochs 2 --optimizers badm,adam
    python -m badm_fast.train --task charlm --device cuda

The training step of BADM is the paper's: the batch is cut into ``--sub-batches`` chunks,
each chunk's loss is backpropagated into its own gradient row (``opt.sub_batch(s)``) and one
fused step aggregates them, weighted by the chunk sizes. The loop is reusable:
:func:`train_epoch` takes any model, optimizer, loss function and iterable of batches.

Checkpoints (``--checkpoint-every``, ``--resume``; see :mod:`badm_fast.train.checkpoint`): each
optimizer's model, optimizer and RNG states, progress and results so far are saved atomically to
``OUT/checkpoints/<optimizer>.pt``; ``--resume`` continues to the same final weights as an
uninterrupted run, which also go to ``OUT/final-<optimizer>.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as _dist

from badm_fast.train import checkpoint as _checkpoint
from badm_fast.train import tasks as _tasks

__all__ = [
    "OPTIMIZERS",
    "Progress",
    "atomic_open",
    "build_parser",
    "default_threads",
    "epoch_batches",
    "main",
    "make_optimizer",
    "train_epoch",
]

OPTIMIZERS = ("badm", "sgd", "adam", "adamw", "qhm")
DEFAULT_OPTIMIZERS = "badm,sgd,adam"

# CLI flag (dest) -> (optimizer, keyword of its constructor)
_HYPERPARAMETERS = {
    "sgd_lr": ("sgd", "lr"),
    "sgd_momentum": ("sgd", "momentum"),
    "adam_lr": ("adam", "lr"),
    "adamw_lr": ("adamw", "lr"),
    "adamw_weight_decay": ("adamw", "weight_decay"),
    "qhm_lr": ("qhm", "lr"),
    "qhm_beta": ("qhm", "beta"),
    "qhm_nu": ("qhm", "nu"),
    "badm_rho": ("badm", "rho"),
    "badm_sigma": ("badm", "sigma"),
}

# CLI flag (dest) -> (lowest, highest (excluded), lowest included, help); every value must also be finite
_LIMITS = {
    "sgd_lr": (0.0, math.inf, False, "SGD's learning rate, > 0"),
    "sgd_momentum": (0.0, 1.0, True, "SGD's momentum (no dampening), in [0, 1)"),
    "adam_lr": (0.0, math.inf, False, "Adam's learning rate, > 0"),
    "adamw_lr": (0.0, math.inf, False, "AdamW's learning rate, > 0"),
    "adamw_weight_decay": (0.0, math.inf, True, "AdamW's decoupled weight decay, >= 0"),
    "qhm_lr": (0.0, math.inf, False, "QHM's learning rate, > 0"),
    "qhm_beta": (0.0, 1.0, True, "QHM's momentum decay beta, in [0, 1)"),
    "qhm_nu": (-math.inf, math.inf, True, "QHM's immediate discount nu, any finite value (1 - sigma/rho is BADM)"),
    "badm_rho": (0.0, math.inf, True, "BADM's proximal coefficient rho >= 0 (momentum mu = rho/(rho+sigma))"),
    "badm_sigma": (0.0, math.inf, False, "BADM's penalty sigma > 0 (lr = 1/(rho+sigma); steady step 1/sigma)"),
}

# modules of the optional [train] extra -> their pip names; the task adds what it loads
_TRAIN_MODULES = ("tqdm", "matplotlib")
_PIP_NAMES = {"sklearn": "scikit-learn"}
_INSTALL_TRAIN = 'pip install "badm_fast[train]"'
_VIRTUAL_FILESYSTEMS = ("/proc", "/sys", "/dev")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


atomic_open = _checkpoint.atomic_open  # temporary file, fsync, rename: readers never see a partial file


def _versions() -> dict:
    import numpy

    try:
        import badm_fast

        badm_version = getattr(badm_fast, "__version__", None)
        if badm_version is None:
            from importlib.metadata import version

            badm_version = version("badm_fast")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        badm_version = "unknown"
    return dict(
        badm_fast=badm_version,
        torch=torch.__version__,
        numpy=numpy.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        machine=platform.machine(),
        torch_threads=torch.get_num_threads(),
        cuda=torch.version.cuda,
    )


# ---------------------------------------------------------------------------------------------
# Optimizers and the training loop
# ---------------------------------------------------------------------------------------------


def make_optimizer(
    name: str,
    params,
    hp: dict,
    sub_batches: int = 4,
    badm_backend: str = "auto",
    badm_mode: str = "sub_batch",
    process_group=None,
    overlap: bool = False,
) -> torch.optim.Optimizer:
    """Builds optimizer ``name`` (one of :data:`OPTIMIZERS`) with hyperparameters ``hp``
    (``process_group``: distributed BADM, see :mod:`badm_fast.distributed`; ``overlap``: its
    all-reduce during the last sub-batch's backward pass)."""
    if name == "badm":
        from badm_fast import BADM

        # a divergent run is reported by the loss check of train_epoch, the same way for every optimizer
        return BADM(
            params,
            sub_batches=sub_batches,
            rho=hp["rho"],
            sigma=hp["sigma"],
            backend=badm_backend,
            mode=badm_mode,
            on_nonfinite="ignore",
            process_group=process_group,
            **({"overlap": True} if overlap else {}),
        )
    if name == "sgd":
        return torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"])
    if name == "adam":
        return torch.optim.Adam(params, lr=hp["lr"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    if name == "qhm":
        from badm_fast.train.qhm import QHM

        return QHM(params, lr=hp["lr"], beta=hp["beta"], nu=hp["nu"])
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def train_step(model, opt, loss_fn, inputs, targets) -> float:
    """One optimizer step on a batch; returns the batch's mean loss (a Python float).

    BADM goes through :func:`badm_fast.split_step`: in ``mode="sub_batch"`` (the paper's
    form) one forward/backward pass per sub-batch, each into its own gradient row, then one
    fused step weighted by the sub-batch sizes; in ``mode="merged"`` one pass over the batch.
    Every other optimizer takes one forward/backward pass over the whole batch.
    """
    from badm_fast import BADM, split_step

    if isinstance(opt, BADM):
        return float(split_step(model, opt, loss_fn, inputs, targets))
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    opt.step()
    return loss.item()


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """``--fsdp``: FSDP2 over the job's process group: every child module that holds parameters,
    then the whole model (its parameters become DTensors sharded over the ranks)."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def fsdp_train_step(model, opt, loss_fn, inputs, targets, *, rank: int, world: int) -> float:
    """One step of a model sharded by :func:`shard_model` on the whole batch (every rank has it).

    Sub-batch ``s`` of the batch (``tensor_split`` into BADM's sub-batches, or one for the other
    optimizers) is split over the ranks; rank ``r`` runs the forward and backward pass of its part.
    FSDP averages the ranks' gradients, so each rank's loss is scaled by its share of the
    sub-batch times the number of ranks: the average is then the gradient of the sub-batch's
    mean loss (the scale is exactly 1 where the parts are equal). BADM steps with the sub-batch
    sizes as weights, so the run follows the single-process run with the same sub-batches.
    Returns the batch's mean loss (over all ranks).
    """
    from badm_fast import BADM

    badm = isinstance(opt, BADM)
    S = opt.sub_batches if badm else 1
    merged = badm and opt.mode == "merged"
    parts = list(zip(inputs.tensor_split(S), targets.tensor_split(S)))
    opt.zero_grad(set_to_none=True)

    # one pass per sub-batch in BADM's per-sub-batch mode; else one pass over the rank's parts of
    # every sub-batch (merged BADM: the same sub-batches' samples)
    per_sub_batch = badm and not merged
    passes = [[part] for part in parts] if per_sub_batch else [parts]
    local = 0.0
    for s, group in enumerate(passes):
        xs = torch.cat([x.tensor_split(world)[rank] for x, _ in group])
        ys = torch.cat([y.tensor_split(world)[rank] for _, y in group])
        n_global = sum(y.shape[0] for _, y in group)
        with opt.sub_batch(s) if per_sub_batch else contextlib.nullcontext():
            loss = loss_fn(model(xs), ys)
            (loss * (ys.shape[0] * world / n_global)).backward()
        local = local + loss.detach() * ys.shape[0]
    if per_sub_batch:
        opt.step(weights=[float(y.shape[0]) for _, y in parts])
    else:  # merged: equal weights, as split_step
        opt.step()
    total = torch.as_tensor(local, dtype=torch.float64).reshape(1).clone()
    _dist.all_reduce(total)
    return float(total) / targets.shape[0]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, max_steps: int | None = None):
    """Index batches of one epoch: a permutation of ``range(n)`` seeded by ``(seed, epoch)``.

    The same arguments give the same batches for every optimizer. ``batch_size <= 0`` means
    one batch of all ``n`` examples; the last batch may be smaller (BADM weights its
    sub-batches by their sizes). ``max_steps`` keeps only the first batches.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    size = n if batch_size <= 0 else batch_size
    batches = list(perm.split(size))
    if max_steps is not None:
        batches = batches[:max_steps]
    return batches


def train_epoch(
    model, opt, loss_fn, batches, progress=None, reduce=None, on_step=None, start=(0.0, 0), step_fn=None
) -> float:
    """Trains one epoch over ``batches`` (an iterable of ``(inputs, targets)``).

    Returns the sample-weighted mean training loss of the epoch. ``reduce(loss, n)`` (optional)
    maps a step's local mean loss and sample count to those of all ranks. ``on_step(total,
    count)`` (optional) runs after every step with the epoch's loss sums so far; ``start``: the
    sums of steps taken before (an epoch resumed from a checkpoint). ``step_fn``: the step
    (default :func:`train_step`; :func:`fsdp_train_step` for a sharded model).
    """
    model.train()
    total, count = start
    step_fn = step_fn or train_step
    for inputs, targets in batches:
        loss = step_fn(model, opt, loss_fn, inputs, targets)
        n = inputs.shape[0]
        if reduce is not None:
            loss, n = reduce(loss, n)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss}; lower the learning rate (or raise sigma)")
        total += loss * n
        count += n
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if on_step is not None:
            on_step(total, count)
    return total / max(count, 1)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Progress:
    """What one optimizer's run reports while it trains, on ``file`` (stderr by default).

    ``mode``: ``"bar"`` (a tqdm bar: optimizer, epoch, step in the epoch, last loss, last test
    metric and phase — training, evaluating or saving), ``"lines"`` (one line per finished
    epoch, for logs and pipes) or ``"off"``. :func:`train_epoch` drives it like a tqdm bar
    (``update``, ``set_postfix``); :func:`run_optimizer` adds the epochs and phases.
    """

    PHASES = ("training", "evaluating", "saving")  # and "done" once closed

    def __init__(self, mode: str, name: str, epochs: int, total_steps: int, initial: int, metric: str, file=None):
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode must be 'bar', 'lines' or 'off', got {mode!r}")
        self.mode, self.name, self.epochs, self.metric = mode, name, epochs, metric
        self.file = file if file is not None else sys.stderr
        self.epoch, self.step, self.steps_in_epoch = 0, 0, 0
        self.loss: float | None = None
        self.value: float | None = None
        self.current = "training"
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial, desc=f"{name:>5}", file=self.file, dynamic_ncols=True, leave=True
            )

    # -- the tqdm-like interface of train_epoch ---------------------------------------------
    def update(self, n: int = 1) -> None:
        self.step += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, loss=None, refresh: bool = True, **_) -> None:
        if loss is not None:
            self.loss = float(loss)
        self._render(refresh)

    # -- epochs and phases ---------------------------------------------------------------------
    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        """Epoch ``epoch`` of ``steps`` steps begins (``done`` of them taken before a resume)."""
        self.epoch, self.steps_in_epoch, self.step = epoch, steps, done
        self.phase("training")

    def phase(self, what: str) -> None:
        if what not in self.PHASES:
            raise ValueError(f"unknown phase {what!r}")
        self.current = what
        self._render(True)

    def evaluated(self, value: float) -> None:
        self.value = float(value)
        self._render(True)

    def end_epoch(self, epoch: int, loss: float, value: float, time_s: float) -> None:
        self.loss, self.value = float(loss), float(value)
        if self.mode == "lines":
            print(
                f"badm-train: {self.name} epoch {epoch}/{self.epochs}: train loss {loss:.4f}, "
                f"{self.metric} {value:.4f}, {time_s:.1f} s of training",
                file=self.file,
                flush=True,
            )
        self._render(True)

    def postfix(self) -> dict:
        """The fields the bar shows after the counter, in order."""
        fields = {"epoch": f"{self.epoch}/{self.epochs}", "step": f"{self.step}/{self.steps_in_epoch}"}
        fields["loss"] = "-" if self.loss is None else f"{self.loss:.4f}"
        fields[self.metric] = "-" if self.value is None else f"{self.value:.4f}"
        fields["phase"] = self.current
        return fields

    def _render(self, refresh: bool) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self.postfix(), refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self.current = "done"
            self._render(True)
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def _saving_shown(ckpt, progress: Progress):
    """Shows the phase "saving" on ``progress`` while ``ckpt`` writes a checkpoint."""
    save = ckpt.save

    def shown(*a, **k):
        before = progress.current
        progress.phase("saving")
        try:
            return save(*a, **k)
        finally:
            progress.phase(before)

    ckpt.save = shown
    try:
        yield
    finally:
        del ckpt.save  # the method of the class again


def run_optimizer(task, name: str, hp: dict, args, init_state: dict, progress: str = "off", checkpoints=None):
    """Trains a fresh copy of the task's model (weights ``init_state``) with optimizer ``name``.

    Returns ``(record, model)``: the per-epoch record of ``results.json`` and the trained model.
    ``progress``: ``"bar"``, ``"lines"`` or ``"off"`` (see :class:`Progress`). ``checkpoints`` (a
    :class:`badm_fast.train.checkpoint.Checkpointer`, optional) saves the run as it goes and, under
    ``--resume``, continues it from its checkpoint.
    """
    torch.manual_seed(args.seed)
    model = task.build_model().to(task.device)
    model.load_state_dict(init_state)
    fsdp = getattr(args, "fsdp", False)
    if fsdp:
        shard_model(model)
    group = _dist.group.WORLD if args.distributed and not fsdp else None
    opt = make_optimizer(name, model.parameters(), hp, args.sub_batches, args.badm_backend, args.badm_mode, group,
                         overlap=getattr(args, "overlap", False))  # fmt: skip
    train_model = model
    if args.distributed and not fsdp and name != "badm":  # BADM aggregates the ranks itself; the others average
        ids = [task.device.index] if task.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    torch.manual_seed(args.seed + 1)  # dropout and sampling noise: the same stream for every optimizer

    schedules = [
        epoch_batches(task.n_train, args.batch_size, args.seed, e, args.max_steps_per_epoch)
        for e in range(1, args.epochs + 1)
    ]
    step_fn, reduce = train_step, None
    if args.distributed:  # too small a last batch is dropped: every rank needs a sample of every sub-batch
        least = args.world_size * args.sub_batches
        schedules = [[b for b in bs if len(b) >= least] for bs in schedules]
        if fsdp:  # every rank reads the whole batch and takes its share of each sub-batch (fsdp_train_step)
            step_fn = functools.partial(fsdp_train_step, rank=args.rank, world=args.world_size)
        else:  # each rank takes its share of every batch
            schedules = [[b.tensor_split(args.world_size)[args.rank] for b in bs] for bs in schedules]
            reduce = _mean_over_ranks
    total_steps = sum(len(b) for b in schedules)

    # checkpoints: under --resume the model, optimizer and RNG states are loaded in place and the
    # run state (epoch, step, results so far) comes from the checkpoint
    ckpt = (checkpoints or _checkpoint.NO_CHECKPOINTS).begin(name, hp, model, opt, task.device)
    state = ckpt.restore()
    initial_steps = state.steps if state is not None else 0
    bar = Progress(progress, name, args.epochs, total_steps, initial_steps, task.metric)
    with bar, _saving_shown(ckpt, bar):
        if state is None:
            bar.phase("evaluating")
            model.eval()
            with torch.no_grad():
                initial = task.evaluate(model)
            bar.evaluated(initial)
            state = ckpt.fresh(dict(hyperparameters=dict(hp), initial_metric=initial, epochs=[]))
        record = state.record
        # wall-clock and process CPU seconds of training (evaluation and checkpoint writes excluded)
        elapsed, cpu = state.time_s, state.cpu_s
        for epoch, batches in enumerate(schedules, start=1):
            if state.finished or epoch < state.epoch:
                continue  # trained before the resume
            bar.start_epoch(epoch, len(batches), state.step)
            batches = batches[state.step :]  # a resumed epoch: the steps not yet taken
            data = ((task.train_inputs[b.to(task.device)], task.train_targets[b.to(task.device)]) for b in batches)
            _sync(task.device)
            t0, c0 = time.perf_counter(), time.process_time()
            ckpt.start_epoch(elapsed, cpu)
            try:
                start = (state.total, state.count)
                loss = train_epoch(train_model, opt, task.loss_fn, data, bar, reduce, ckpt.after_step, start, step_fn)
            except FloatingPointError as e:  # a result, not a crash: record it and go on with the next optimizer
                record.update(diverged=True, diverged_at_epoch=epoch, error=str(e))
                break
            _sync(task.device)
            elapsed += time.perf_counter() - t0 - ckpt.saving_wall
            cpu += time.process_time() - c0 - ckpt.saving_cpu
            bar.phase("evaluating")
            model.eval()
            with torch.no_grad():
                value = task.evaluate(model)
            record["epochs"].append(dict(epoch=epoch, train_loss=loss, test_metric=value, time_s=elapsed, cpu_s=cpu))
            ckpt.end_epoch(elapsed, cpu)
            bar.end_epoch(epoch, loss, value, elapsed)  # after the epoch's checkpoint: what it reports is saved
        ckpt.finish(elapsed, cpu)
    values = [e["test_metric"] for e in record["epochs"]]
    best = (max(values) if task.higher_is_better else min(values)) if values else None
    record.setdefault("diverged", False)
    record.update(
        final_train_loss=record["epochs"][-1]["train_loss"] if values else None,
        final_metric=values[-1] if values else None,
        best_metric=best,
        time_s=elapsed,
        cpu_s=cpu,
        steps=total_steps,
    )
    if name == "badm":
        record["backend"] = getattr(opt, "backend", None)
        record["mode"] = args.badm_mode
    return record, model


def _init_distributed(args, parser) -> None:
    """``--distributed``: join the torchrun job (gloo on CPU, NCCL on CUDA, one GPU per local rank)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        parser.error("--distributed runs under torchrun: torchrun --nproc_per_node=N -m badm_fast.train --distributed")
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(args.device))
    # Before the group exists: the functions of torch.distributed.nn.functional take
    # ``group=group.WORLD`` as a default argument, evaluated when the module is imported. Imported
    # later (DistributedDataParallel's constructor imports it, through torch.distributed._shard),
    # those defaults hold the live WORLD group for the life of the process and destroy_process_group
    # can no longer free it (see _shutdown_distributed).
    importlib.import_module("torch.distributed.nn")
    _dist.init_process_group("nccl" if cuda else "gloo")
    args.rank, args.world_size = _dist.get_rank(), _dist.get_world_size()


def _shutdown_distributed() -> None:
    """Ends the job's process group so that its backend is gone before the interpreter finalizes.

    gloo runs collectives on worker threads, and a worker lets go of a finished collective (with the
    tensors it read and wrote) only after the caller's ``wait()`` has returned. When Python has
    freed such a tensor in the meantime, the tensor owns its Python object and letting go of it takes
    the GIL. A worker asking for the GIL while the interpreter finalizes is ended by CPython from
    inside a C++ destructor, which is ``noexcept``: std::terminate ("terminate called without an
    active exception"), SIGABRT, and the rank exits non-zero although the job finished. The backend
    joins its workers (with the GIL released) when the last reference to the group goes away, so
    destroying the group while nothing else holds it (see _init_distributed) leaves no such thread
    alive at exit. The barrier first: every rank has finished its last collective before any rank
    closes its connections.
    """
    world = weakref.ref(_dist.group.WORLD)
    _dist.barrier()
    _dist.destroy_process_group()
    if world() is not None:
        gc.collect()  # a reference cycle (e.g. an optimizer holding the group) is freed here
    if world() is not None:
        _release_device_meshes()
    if world() is not None:
        print(
            f"badm-train: warning: rank {os.environ.get('RANK', '?')}: the process group is still referenced after "
            "destroy_process_group; its worker threads may abort this process at exit",
            file=sys.stderr,
        )


def _release_device_meshes() -> None:
    """Drops the process groups that DeviceMesh objects still hold after destroy_process_group.

    ``fully_shard`` (``--fsdp``) builds a default DeviceMesh that torch keeps after the model is
    gone; a mesh holds its groups in a dict of ``ProcessGroup`` objects, which the garbage
    collector does not see (pybind objects are not tracked), so the WORLD group would outlive
    the job. The groups are destroyed already: nothing may use those meshes any more."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without distributed support
        return
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


def _mean_over_ranks(loss: float, n: int) -> tuple[float, int]:
    """A step's mean loss and sample count over all ranks (every rank gets the same values)."""
    device = torch.device("cuda", torch.cuda.current_device()) if _dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([loss * n, float(n)], dtype=torch.float64, device=device)
    _dist.all_reduce(t)
    total, count = t.tolist()
    return total / max(count, 1.0), int(count)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help without breaking words at hyphens (``fashion-mnist``, ``--max-steps-per-epoch``)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        import textwrap

        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """``badm-train``'s parser: a refused command line is one line on stderr and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        text = " ".join(str(message).split())  # one line, whatever the message holds
        self.exit(2, f"{self.prog}: error: {text}\n")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _per_task(dest: str) -> str:
    """A flag's default in every task: ``digits 0.05, charlm 0.5, ...`` or ``0.9 in every task``."""
    values = {name: cls.defaults[dest] for name, cls in _tasks.TASKS.items()}
    if len(set(values.values())) == 1:
        return f"{next(iter(values.values())):g} in every task"
    return ", ".join(f"{name} {value:g}" for name, value in values.items())


def build_parser() -> argparse.ArgumentParser:
    tasks = ", ".join(f"{name}: {cls.source}" for name, cls in _tasks.TASKS.items())
    p = _Parser(
        prog="badm-train",
        description="Train a real model with BADM and with SGD/Adam/AdamW/QHM from the same initial weights "
        "on the same data order; write results.json, curves.png and summary.md into --out and print the summary.",
        epilog=f"Data (all offline): {tasks}. Fashion-MNIST needs `apt-get install dataset-fashion-mnist`; "
        f"every task needs the [train] extra (scikit-learn, matplotlib, tqdm, networkx): {_INSTALL_TRAIN}. "
        "Exit status: 0 done, 2 refused arguments, "
        "130 interrupted (Ctrl-C; the job prints the --resume command).",
    )
    p.add_argument("--task", choices=list(_tasks.TASKS), default="digits", help="what to train (default: digits)")
    p.add_argument(
        "--optimizers",
        default=DEFAULT_OPTIMIZERS,
        help=f"comma-separated list from {','.join(OPTIMIZERS)} (default: {DEFAULT_OPTIMIZERS})",
    )
    p.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {_per_task('epochs')})")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"examples per step, 0 = the whole training set (default: {_per_task('batch_size')})",
    )
    p.add_argument("--sub-batches", type=int, default=4, help="BADM sub-batches S per batch (default: 4)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the initial weights and the data order (default: 0)"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1 (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: half the cores, at least 1: on a machine shared with other jobs this "
        "was faster than torch's all cores, see README 'Threads')",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/<task>)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out directory")
    p.add_argument("--subset", type=int, default=None, help="use at most N training and N test examples (default: all)")
    p.add_argument(
        "--max-steps-per-epoch", type=int, default=None, help="cap the optimizer steps of an epoch (default: no cap)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output (neither the bar nor per-epoch lines)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run under torchrun (torchrun --nproc_per_node=N -m badm_fast.train --distributed ...): every batch "
        "is split across the ranks, BADM aggregates the sub-batches of all ranks (--sub-batches per rank), the "
        "other optimizers run under DistributedDataParallel; rank 0 writes the outputs",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="with --distributed: shard the model with FSDP2 (fully_shard) instead; every optimizer steps its "
        "shards, the ranks share every sub-batch (--sub-batches in all) and the run follows the single-process "
        "one; checkpoints hold the full (gathered) model and optimizer states",
    )
    p.add_argument(
        "--overlap",
        action="store_true",
        help="with --distributed (not --fsdp): BADM starts its all-reduce during the last sub-batch's backward pass "
        "(BADM(overlap=True); the same results)",
    )
    g = p.add_argument_group(
        "hyperparameters", "every value must be finite; unset, each takes its task's default (badm_fast/train/tasks.py)"
    )
    for dest, (_, _, _, what) in _LIMITS.items():
        g.add_argument(
            "--" + dest.replace("_", "-"), type=_finite_float, metavar="X", help=f"{what} (default: {_per_task(dest)})"
        )
    from badm_fast.backends import BACKENDS

    g.add_argument(
        "--badm-backend",
        default="auto",
        choices=("auto", *BACKENDS),
        help="BADM kernel back end; auto: cpp on CPU, triton or cuda on GPUs, else torch (default: auto)",
    )
    g.add_argument(
        "--badm-mode",
        default="sub_batch",
        choices=["sub_batch", "merged"],
        help="sub_batch: a backward pass per sub-batch (the paper); merged: one backward pass, "
        "one dual buffer (the same trajectory for equal sub-batch weights) (default: sub_batch)",
    )
    _checkpoint.add_arguments(p)  # --checkpoint-every, --resume
    return p


def _resolve(args, parser, task_cls) -> dict:
    """Fills per-task defaults into ``args``; returns optimizer -> hyperparameter dict."""
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if not names or unknown:
        what = ", ".join(unknown) or "(empty list)"
        parser.error(f"--optimizers: unknown {what}; choose from {','.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        parser.error(f"--optimizers: {args.optimizers!r} names an optimizer twice")
    args.optimizer_list = names
    defaults = task_cls.defaults
    if args.epochs is None:
        args.epochs = defaults["epochs"]
    if args.batch_size is None:
        args.batch_size = defaults["batch_size"]
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.fsdp and not args.distributed:
        parser.error("--fsdp shards the model over the ranks of a torchrun job: add --distributed")
    if args.overlap and (not args.distributed or args.fsdp or args.badm_mode == "merged"):
        parser.error("--overlap is for BADM's process-group mode: --distributed, without --fsdp, --badm-mode sub_batch")
    if args.sub_batches < 1:
        parser.error(f"--sub-batches must be >= 1, got {args.sub_batches}")
    if args.batch_size < 0:
        parser.error(f"--batch-size must be >= 0 (0 = whole training set), got {args.batch_size}")
    if 0 < args.batch_size < args.sub_batches and "badm" in names:
        parser.error(f"--batch-size {args.batch_size} is smaller than --sub-batches {args.sub_batches}")
    if args.max_steps_per_epoch is not None and args.max_steps_per_epoch < 1:
        parser.error(f"--max-steps-per-epoch must be >= 1, got {args.max_steps_per_epoch}")
    if args.subset is not None and args.subset < 1:
        parser.error(f"--subset must be >= 1, got {args.subset}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    hps = {n: {} for n in names}
    for dest, (opt_name, key) in _HYPERPARAMETERS.items():
        value = getattr(args, dest)
        if value is None:
            value = defaults[dest]
            setattr(args, dest, value)
        low, high, closed, _ = _LIMITS[dest]
        flag = "--" + dest.replace("_", "-")
        if not math.isfinite(value):
            parser.error(f"{flag} must be a finite number, got {value}")
        if value < low or (value == low and not closed):
            parser.error(f"{flag} must be {'>=' if closed else '>'} {low:g}, got {value:g}")
        if value >= high:
            parser.error(f"{flag} must be < {high:g}, got {value:g}")
        if opt_name in hps:
            hps[opt_name][key] = value
    return hps


def _check_dependencies(task_cls, parser) -> None:
    """Refuses to start when a module of the [train] extra that this job needs is missing."""
    missing = []
    for module in (*task_cls.requires, *_TRAIN_MODULES):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(_PIP_NAMES.get(module, module))
    if missing:
        parser.error(
            f"--task {task_cls.name} needs {', '.join(missing)}, which cannot be imported; install the training "
            f"extra: {_INSTALL_TRAIN}"
        )


def _check_device(text: str, parser) -> torch.device:
    """The ``--device``, refused when this machine does not have it."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as e:
        parser.error(f"--device {text!r} is not a torch device ({str(e).splitlines()[0]})")
    where = f"--device {text}"
    if device.type == "meta":
        parser.error(f"{where}: meta tensors hold no data, nothing can train on them")
    if device.type == "cuda":
        if torch.version.cuda is None and not getattr(torch.version, "hip", None):
            parser.error(f"{where}: this torch {torch.__version__} is a CPU-only build (no CUDA)")
        count = torch.cuda.device_count()
        if count == 0:
            parser.error(f"{where}: no CUDA device is visible (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= count:
            parser.error(f"{where}: there are {count} CUDA device(s), 0..{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"{where}: MPS (Apple GPU) is not available on this machine")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001  (whatever the device's back end raises)
            parser.error(f"{where}: not available here ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    return device


def _check_backend(name: str, device: torch.device, parser) -> None:
    """Refuses a BADM back end that cannot run on ``device`` (BADM_FAST_BACKEND included for auto)."""
    from badm_fast import backends

    try:
        backends.resolve(name, device.type)
    except (ValueError, backends.BackendUnavailable) as e:
        parser.error(f"--badm-backend {name}: {e}")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_out_dir(out: Path, overwrite: bool, parser) -> None:
    """Refuses an ``--out`` that is not a writable directory (or cannot become one) before anything is created."""
    absolute = Path(os.path.abspath(out))
    real = Path(os.path.realpath(absolute))
    for root in _VIRTUAL_FILESYSTEMS:
        if any(p == Path(root) or Path(root) in p.parents for p in (absolute, real)):
            parser.error(f"--out {out}: {root} is a virtual file system of the kernel, not a place for results")
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        parser.error(
            f"output directory {out} already exists and is not empty; pass --overwrite to replace "
            f"its files, or choose another directory with --out"
        )
    base = _nearest_existing(absolute)
    if not base.is_dir():
        parser.error(f"--out {out}: {base} is a file, so the directory cannot be created")
    try:  # the only reliable test: create (and remove) a file where the first write will go
        fd, probe = tempfile.mkstemp(prefix=".badm-train-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        parser.error(f"--out {out}: cannot write in {base} ({reason}); choose another directory with --out")


def default_threads() -> int:
    """torch threads of a job without ``--threads``: half the cores this process may use, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def _format_table(results: dict) -> str:
    metric = results["metric"]
    arrow = "higher is better" if metric["higher_is_better"] else "lower is better"
    head = (
        f"| optimizer | final train loss | final {metric['name']} | best {metric['name']} | train time (s) "
        "| train CPU (s) |"
    )
    lines = [f"{results['config']['task']}: {metric['name']} ({arrow})", head, "|---|---:|---:|---:|---:|---:|"]

    def num(x):
        return "-" if x is None else f"{x:.4f}"

    for name, run in results["optimizers"].items():
        loss = f"diverged in epoch {run['diverged_at_epoch']}" if run["diverged"] else num(run["final_train_loss"])
        lines.append(
            f"| {name} | {loss} | {num(run['final_metric'])} | {num(run['best_metric'])} | {run['time_s']:.1f} "
            f"| {run['cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def _threads(n: int) -> str:
    return f"{n} torch thread" + ("" if n == 1 else "s")


def _resume_command(argv: list[str]) -> str:
    """The command line that continues this job from its checkpoints."""
    args = [a for a in argv if a != "--resume"]
    return shlex.join(["badm-train", *args, "--resume"])


def _interrupted(where: dict, args, out: Path, argv: list[str]) -> str:
    """The one line of a job stopped by Ctrl-C: where it stood, its last checkpoint, how to resume."""
    name = where.get("name")
    if name is None:
        return "badm-train: interrupted before training started; nothing was trained or saved"
    every = getattr(args, "checkpoint_every", None)
    if every == 0:
        return (
            f"badm-train: interrupted while training {name}; no checkpoints were written (--checkpoint-every 0), "
            "so nothing can be resumed: run the command again"
        )
    path = out / _checkpoint.CHECKPOINT_DIR / f"{name}.pt"
    if path.is_file():
        saved = f"its last checkpoint is {path}"
    else:
        when = "the end of the first epoch" if every is None else f"step {every}"
        saved = f"{name} has no checkpoint yet (the first is written at {when}; --resume starts it over)"
    return f"badm-train: interrupted while training {name}; {saved}; resume with: {_resume_command(argv)}"


def main(argv=None) -> int:
    """Entry point of ``badm-train`` and ``python -m badm_fast.train``; returns the exit status
    (0; 130 after Ctrl-C). Refused arguments exit with status 2 (``SystemExit``) before anything
    is loaded or written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    task_cls = _tasks.TASKS[args.task]
    hps = _resolve(args, parser, task_cls)
    _check_dependencies(task_cls, parser)
    try:
        task_cls.check_available()
    except _tasks.DatasetMissingError as e:
        parser.error(str(e))
    device = _check_device(args.device, parser)
    if "badm" in args.optimizer_list:
        _check_backend(args.badm_backend, device, parser)
    args.rank, args.world_size = 0, 1
    lead = not args.distributed or os.environ.get("RANK", "0") == "0"  # the process that writes
    out = Path(args.out if args.out is not None else Path("runs") / args.task)
    if lead:
        _check_out_dir(out, args.overwrite or args.resume, parser)
    if args.threads is None:
        args.threads = default_threads()
    torch.set_num_threads(args.threads)
    where: dict = {}
    try:
        return _run(args, parser, argv, task_cls, hps, out, where)
    except KeyboardInterrupt:
        if lead:
            print(_interrupted(where, args, out, argv), file=sys.stderr, flush=True)
        return 130


def _run(args, parser, argv, task_cls, hps, out: Path, where: dict) -> int:
    """The job after its arguments were checked; ``where["name"]``: the optimizer training now."""
    if args.distributed:
        _init_distributed(args, parser)
    lead = args.rank == 0  # the rank that writes and prints
    device = torch.device(args.device)
    talk = lead and not args.quiet
    if talk:
        print(
            f"badm-train: {args.task}: loading {task_cls.source} on {device} ({_threads(torch.get_num_threads())}) "
            "...",
            file=sys.stderr,
            flush=True,
        )
    try:
        task = task_cls(seed=args.seed, subset=args.subset, device=device)
    except _tasks.DatasetMissingError as e:
        parser.error(str(e))
    if "badm" in args.optimizer_list and args.batch_size == 0 and task.n_train < args.sub_batches:
        parser.error(f"{task.n_train} training examples cannot fill {args.sub_batches} sub-batches")
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    try:  # under --resume, every checkpoint is read and checked against the arguments before anything trains
        checkpoints = _checkpoint.Checkpointer(out, args, hps, write=lead)
    except _checkpoint.CheckpointError as e:
        parser.error(str(e))
    if talk:
        print(
            f"badm-train: {args.task}: {task.n_train} training and {task.test_inputs.shape[0]} test examples; "
            f"{', '.join(args.optimizer_list)} for {args.epochs} epochs each; writing {out}",
            file=sys.stderr,
            flush=True,
        )

    torch.manual_seed(args.seed)
    init_state = copy.deepcopy(task.build_model().state_dict())
    config = {k: v for k, v in vars(args).items() if k not in ("optimizer_list", "rank")}
    config.update(out=str(out), optimizers=list(args.optimizer_list))
    results = dict(
        config=config,
        versions=_versions(),
        data=task.describe(),
        metric=dict(name=task.metric, higher_is_better=task.higher_is_better),
        optimizers={},
    )
    progress = "off" if not talk else ("bar" if sys.stderr.isatty() else "lines")
    samples = {}
    for name in args.optimizer_list:
        where["name"] = name
        record, model = run_optimizer(task, name, hps[name], args, init_state, progress, checkpoints)
        results["optimizers"][name] = record
        checkpoints.save_final(name, model)  # writes on rank 0; an FSDP2 model is gathered by every rank
        if (lead or getattr(args, "fsdp", False)) and not record["diverged"] and hasattr(task, "samples"):
            model.eval()  # a sharded model samples on every rank (its forward pass is a collective)
            samples[name] = task.samples(model)
        if not lead:
            continue
        if record["diverged"]:
            print(
                f"badm-train: {name} diverged in epoch {record['diverged_at_epoch']}: {record['error']}",
                file=sys.stderr,
            )
        with atomic_open(out / "results.json", "w") as f:  # after every optimizer: a long run keeps its progress
            json.dump(results, f, indent=2)
    where["name"] = None
    if args.distributed:
        model = None  # an FSDP2 model's state holds the process group: let it go first
        _shutdown_distributed()
    if not lead:
        return 0

    from badm_fast.train.plotting import plot_curves, plot_samples

    with atomic_open(out / "curves.png", "wb") as f:
        plot_curves(results, f)
    if samples:
        with atomic_open(out / "samples.png", "wb") as f:
            plot_samples(samples, f, title=f"{args.task}: samples from the prior after {args.epochs} epochs")
    table = _format_table(results)
    with atomic_open(out / "summary.md", "w") as f:
        f.write(table + "\n")
    print(table)
    written = ["results.json", "curves.png", "summary.md"] + (["samples.png"] if samples else [])
    print(f"wrote {', '.join(str(out / n) for n in written)}")
    return 0
