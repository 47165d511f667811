"""``badm-train``: train real models with BADM and with SGD, Adam, AdamW or QHM, side by side.

Every optimizer starts from the same initial weights and sees the same data in the same
order (one seeded permutation per epoch, identical for all). Results go to ``--out``
(default ``runs/<task>``): ``results.json`` (config, versions, per-epoch train loss, test
metric and cumulative training time per optimizer), ``curves.png`` and, for ``--task
generate``, ``samples.png``. A summary table is printed at the end.

Examples::

    badm-train                                   # digits, badm vs sgd vs adam, ~1 min on 2 cores
    badm-train --task fashion-mnist --epochs 2 --optimizers badm,adam
    python -m badm_fast.train --task charlm --device cuda

The training step of BADM is the paper's: the batch is cut into ``--sub-batches`` chunks,
each chunk's loss is backpropagated into its own gradient row (``opt.sub_batch(s)``) and one
fused step aggregates them, weighted by the chunk sizes. The loop is reusable:
:func:`train_epoch` takes any model, optimizer, loss function and iterable of batches.

Checkpoints (``--checkpoint-every``, ``--resume``; see :mod:`badm_fast.checkpoint`): each
optimizer's model, optimizer and RNG states, progress and results so far are saved atomically to
``OUT/checkpoints/<optimizer>.pt``; ``--resume`` continues to the same final weights as an
uninterrupted run, which also go to ``OUT/final-<optimizer>.pt``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import math
import os
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as _dist

from badm_fast import checkpoint as _checkpoint
from badm_fast import tasks as _tasks

__all__ = ["OPTIMIZERS", "build_parser", "main", "make_optimizer", "train_epoch", "epoch_batches", "atomic_open"]

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
) -> torch.optim.Optimizer:
    """Builds optimizer ``name`` (one of :data:`OPTIMIZERS`) with hyperparameters ``hp``
    (``process_group``: distributed BADM, see :mod:`badm_fast.distributed`)."""
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
        )
    if name == "sgd":
        return torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"])
    if name == "adam":
        return torch.optim.Adam(params, lr=hp["lr"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
    if name == "qhm":
        from badm_fast.qhm import QHM

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


def train_epoch(model, opt, loss_fn, batches, progress=None, reduce=None, on_step=None, start=(0.0, 0)) -> float:
    """Trains one epoch over ``batches`` (an iterable of ``(inputs, targets)``).

    Returns the sample-weighted mean training loss of the epoch. ``reduce(loss, n)`` (optional)
    maps a step's local mean loss and sample count to those of all ranks. ``on_step(total,
    count)`` (optional) runs after every step with the epoch's loss sums so far; ``start``: the
    sums of steps taken before (an epoch resumed from a checkpoint).
    """
    model.train()
    total, count = start
    for inputs, targets in batches:
        loss = train_step(model, opt, loss_fn, inputs, targets)
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


def run_optimizer(task, name: str, hp: dict, args, init_state: dict, show_progress: bool, checkpoints=None):
    """Trains a fresh copy of the task's model (weights ``init_state``) with optimizer ``name``.

    Returns ``(record, model)``: the per-epoch record of ``results.json`` and the trained model.
    ``checkpoints`` (a :class:`badm_fast.checkpoint.Checkpointer`, optional) saves the run as it
    goes and, under ``--resume``, continues it from its checkpoint.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    model = task.build_model().to(task.device)
    model.load_state_dict(init_state)
    group = _dist.group.WORLD if args.distributed else None
    opt = make_optimizer(name, model.parameters(), hp, args.sub_batches, args.badm_backend, args.badm_mode, group)
    train_model = model
    if args.distributed and name != "badm":  # BADM aggregates the ranks itself; the others average gradients
        ids = [task.device.index] if task.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    torch.manual_seed(args.seed + 1)  # dropout and sampling noise: the same stream for every optimizer

    # checkpoints: under --resume the model, optimizer and RNG states are loaded in place and the
    # run state (epoch, step, results so far) comes from the checkpoint
    ckpt = (checkpoints or _checkpoint.NO_CHECKPOINTS).begin(name, hp, model, opt, task.device)
    state = ckpt.restore()
    if state is None:
        model.eval()
        with torch.no_grad():
            initial = task.evaluate(model)
        state = ckpt.fresh(dict(hyperparameters=dict(hp), initial_metric=initial, epochs=[]))
    schedules = [
        epoch_batches(task.n_train, args.batch_size, args.seed, e, args.max_steps_per_epoch)
        for e in range(1, args.epochs + 1)
    ]
    if args.distributed:  # each rank takes its share of every batch (too small a last batch is dropped)
        least = args.world_size * args.sub_batches
        schedules = [[b.tensor_split(args.world_size)[args.rank] for b in bs if len(b) >= least] for bs in schedules]
    total_steps = sum(len(b) for b in schedules)
    reduce = _mean_over_ranks if args.distributed else None
    record = state.record
    # wall-clock and process CPU seconds of training (evaluation and checkpoint writes excluded)
    elapsed, cpu = state.time_s, state.cpu_s
    bar_args = dict(total=total_steps, initial=state.steps, desc=f"{name:>5}", disable=not show_progress)
    with tqdm(**bar_args, dynamic_ncols=True, leave=True) as bar:
        for epoch, batches in enumerate(schedules, start=1):
            if state.finished or epoch < state.epoch:
                continue  # trained before the resume
            batches = batches[state.step :]  # a resumed epoch: the steps not yet taken
            data = ((task.train_inputs[b.to(task.device)], task.train_targets[b.to(task.device)]) for b in batches)
            _sync(task.device)
            t0, c0 = time.perf_counter(), time.process_time()
            ckpt.start_epoch(elapsed, cpu)
            try:
                start = (state.total, state.count)
                loss = train_epoch(train_model, opt, task.loss_fn, data, bar, reduce, ckpt.after_step, start)
            except FloatingPointError as e:  # a result, not a crash: record it and go on with the next optimizer
                record.update(diverged=True, diverged_at_epoch=epoch, error=str(e))
                break
            _sync(task.device)
            elapsed += time.perf_counter() - t0 - ckpt.saving_wall
            cpu += time.process_time() - c0 - ckpt.saving_cpu
            model.eval()
            with torch.no_grad():
                value = task.evaluate(model)
            record["epochs"].append(dict(epoch=epoch, train_loss=loss, test_metric=value, time_s=elapsed, cpu_s=cpu))
            ckpt.end_epoch(elapsed, cpu)
            bar.set_postfix(loss=f"{loss:.4f}", **{task.metric: f"{value:.4f}"})
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
        print(
            f"badm-train: warning: rank {os.environ.get('RANK', '?')}: the process group is still referenced after "
            "destroy_process_group; its worker threads may abort this process at exit",
            file=sys.stderr,
        )


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="badm-train",
        description="Train a real model with BADM and with SGD/Adam/AdamW/QHM from the same initial weights "
        "on the same data order; write results.json, curves.png and print a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=list(_tasks.TASKS), default="digits", help="what to train")
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, help=f"comma-separated list from {','.join(OPTIMIZERS)}")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: per task)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="examples per step (default: per task; 0 = the whole training set)"
    )
    p.add_argument("--sub-batches", type=int, default=4, help="BADM sub-batches S per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the initial weights and the data order")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<task>)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out directory")
    p.add_argument("--subset", type=int, default=None, help="use at most N training and N test examples")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap the optimizer steps of an epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-optimizer lines")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="run under torchrun (torchrun --nproc_per_node=N -m badm_fast.train --distributed ...): every batch "
        "is split across the ranks, BADM aggregates the sub-batches of all ranks (--sub-batches per rank), the "
        "other optimizers run under DistributedDataParallel; rank 0 writes the outputs",
    )
    g = p.add_argument_group("hyperparameters (default: per task, see badm_fast/tasks.py)")
    g.add_argument("--sgd-lr", type=float)
    g.add_argument("--sgd-momentum", type=float)
    g.add_argument("--adam-lr", type=float)
    g.add_argument("--adamw-lr", type=float)
    g.add_argument("--adamw-weight-decay", type=float)
    g.add_argument("--qhm-lr", type=float)
    g.add_argument("--qhm-beta", type=float)
    g.add_argument("--qhm-nu", type=float)
    g.add_argument("--badm-rho", type=float, help="proximal coefficient rho >= 0 (about sigma*mu/(1-mu))")
    g.add_argument("--badm-sigma", type=float, help="penalty sigma > 0 (about 1/learning rate)")
    g.add_argument("--badm-backend", default="auto", help="BADM kernel back end (auto, cpp, torch, ...)")
    g.add_argument(
        "--badm-mode",
        default="sub_batch",
        choices=["sub_batch", "merged"],
        help="sub_batch: a backward pass per sub-batch (the paper); merged: one backward pass, "
        "one dual buffer (the same trajectory for equal sub-batch weights)",
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
        if opt_name in hps:
            hps[opt_name][key] = value
    if "badm" in hps:
        if hps["badm"]["sigma"] <= 0:
            parser.error(f"--badm-sigma must be > 0, got {hps['badm']['sigma']}")
        if hps["badm"]["rho"] < 0:
            parser.error(f"--badm-rho must be >= 0, got {hps['badm']['rho']}")
    return hps


def _check_out_dir(out: Path, overwrite: bool, parser) -> None:
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        parser.error(
            f"output directory {out} already exists and is not empty; pass --overwrite to replace "
            f"its files, or choose another directory with --out"
        )


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


def main(argv=None) -> int:
    """Entry point of ``badm-train`` and ``python -m badm_fast.train``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    task_cls = _tasks.TASKS[args.task]
    hps = _resolve(args, parser, task_cls)
    args.rank, args.world_size = 0, 1
    if args.distributed:
        _init_distributed(args, parser)
    lead = args.rank == 0  # the rank that writes and prints
    out = Path(args.out if args.out is not None else Path("runs") / args.task)
    if lead:
        _check_out_dir(out, args.overwrite or args.resume, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: this torch build sees no CUDA device")
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")

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
    show_progress = lead and not args.quiet and sys.stderr.isatty()
    samples = {}
    for name in args.optimizer_list:
        record, model = run_optimizer(task, name, hps[name], args, init_state, show_progress, checkpoints)
        results["optimizers"][name] = record
        if not lead:
            continue
        checkpoints.save_final(name, model)
        if record["diverged"]:
            print(
                f"badm-train: {name} diverged in epoch {record['diverged_at_epoch']}: {record['error']}",
                file=sys.stderr,
            )
        elif hasattr(task, "samples"):
            model.eval()
            samples[name] = task.samples(model)
        if not args.quiet and not show_progress and not record["diverged"]:
            print(
                f"{name}: train loss {record['final_train_loss']:.4f}, {task.metric} {record['final_metric']:.4f}, "
                f"{record['time_s']:.1f} s",
                file=sys.stderr,
            )
        with atomic_open(out / "results.json", "w") as f:  # after every optimizer: a long run keeps its progress
            json.dump(results, f, indent=2)
    if args.distributed:
        _shutdown_distributed()
    if not lead:
        return 0

    from badm_fast.plotting import plot_curves, plot_samples

    with atomic_open(out / "curves.png", "wb") as f:
        plot_curves(results, f)
    if samples:
        with atomic_open(out / "samples.png", "wb") as f:
            plot_samples(samples, f, title=f"{args.task}: samples from the prior after {args.epochs} epochs")
    print(_format_table(results))
    print(f"wrote {out / 'results.json'}, {out / 'curves.png'}" + (f", {out / 'samples.png'}" if samples else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
