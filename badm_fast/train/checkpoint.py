"""Crash-safe checkpoints of the training job ``badm-train`` and exact ``--resume``.

Each optimizer of a run has one checkpoint, ``DIR/checkpoints/<optimizer>.pt``, replaced as
training goes on (``--checkpoint-every N``: every N optimizer steps; by default at the end of
every epoch; ``0``: never) and once more when the optimizer's run ends. It holds everything the
rest of the run depends on:

- ``model``: the model's ``state_dict`` (CPU tensors);
- ``optimizer``: the optimizer's ``state_dict`` (BADM's duals and step metadata, or the torch
  optimizer's state); a list with one entry per rank for distributed BADM, whose duals differ
  from rank to rank (:func:`badm_fast.distributed.gather_state_dict`), else one entry;
- ``rng``: per rank, the torch CPU generator state and, on CUDA, the device generator state
  (dropout and sampling noise). The data order needs none: every epoch's permutation comes from
  its own generator seeded by ``(seed, epoch)`` (:func:`badm_fast.train.cli.epoch_batches`), and the
  job draws nothing from Python's ``random`` or numpy;
- ``progress``: the epoch in progress, the steps done in it and in the whole run, the epoch's
  partial training-loss sums, the training time so far, and whether the run is finished;
- ``record``: the per-epoch results so far, so ``results.json`` and the curves come out whole;
- ``config``: the arguments that fix the trajectory, compared on ``--resume``.

Files are written atomically: ``torch.save`` into a temporary file in the same directory,
flush and ``os.fsync``, ``os.replace`` onto the final name, then ``fsync`` of the directory. A
reader (or a resumed job) sees the previous checkpoint or the new one, never a partial file.
Checkpoints hold only tensors, numbers, strings, booleans, ``None``, lists and dicts, and are
read only with ``torch.load(weights_only=True)``.

``--resume`` continues every optimizer from its checkpoint (an optimizer whose run had finished
is not trained again: its record and weights come from the checkpoint) and gives the same final
weights, bit for bit, as an uninterrupted run with the same arguments on the same device, back
end and thread count. The trained weights of every optimizer also go to ``DIR/final-<optimizer>.pt``
(a model ``state_dict``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch

from badm_fast.distributed import to_cpu

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "Checkpointer",
    "RunCheckpoint",
    "RunState",
    "add_arguments",
    "atomic_open",
    "atomic_save",
    "load",
    "is_sharded",
    "load_checkpoint",
    "load_states",
    "model_state",
    "optimizer_state",
    "rng_state",
    "run_config",
    "set_rng_state",
]

FORMAT = "badm_fast.train.checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_KEYS = ("config", "model", "optimizer", "rng", "progress", "record")
_PROGRESS_KEYS = ("epoch", "step", "steps", "total", "count", "time_s", "cpu_s", "finished")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not one of ``badm-train``, or does not fit the job."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one rename,
    so that ``path`` is at every moment the old file or the new one.

    The temporary file is flushed and fsynced before the rename (``os.replace``, atomic on
    POSIX and Windows), and the directory after it, so the rename survives a power loss. On
    any error (or interruption) before the rename the temporary file is removed and ``path``
    is untouched.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_open`."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _remove_temporaries(path: Path) -> None:
    """Removes what a write of ``path`` killed before its rename left behind."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; a file that cannot be read raises
    :class:`CheckpointError` naming it. ``mmap``: map the tensors instead of reading them."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); the file is damaged "
            "(truncated or overwritten). Delete it to train this optimizer from the beginning."
        ) from exc


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Reads a ``badm-train`` checkpoint (weights only) and checks its structure."""
    ckpt = load(path, map_location, mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a badm-train checkpoint (no format {FORMAT!r})")
    version = ckpt.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {version!r} (this badm_fast reads 1..{VERSION})")
    missing = [k for k in _KEYS if k not in ckpt]
    progress = ckpt.get("progress")
    if not missing and isinstance(progress, dict):
        missing = [f"progress.{k}" for k in _PROGRESS_KEYS if k not in progress]
    if missing or not isinstance(ckpt["config"], dict) or not isinstance(ckpt["record"], dict):
        raise CheckpointError(f"{path}: incomplete checkpoint (missing or malformed: {', '.join(missing) or 'config'})")
    if not isinstance(ckpt["optimizer"], list) or not ckpt["optimizer"] or not isinstance(ckpt["rng"], list):
        raise CheckpointError(f"{path}: malformed checkpoint ('optimizer' and 'rng' must be lists)")
    return ckpt


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded with FSDP2 (its parameters are DTensors)."""
    from badm_fast.layout import is_dtensor

    return any(is_dtensor(p) for p in model.parameters())


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: torch.nn.Module) -> dict:
    """The model's ``state_dict`` as standalone CPU tensors (a copy: the file holds the model's
    own tensors, not storages they share). For an FSDP2 model the whole, gathered state
    (``torch.distributed.checkpoint.state_dict``; a collective: every rank calls it; ranks
    other than 0 get an empty dict)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_full_options())
        return {k: v.detach().to("cpu", copy=True) for k, v in full.items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's ``state_dict`` on the CPU; for an FSDP2 model the whole, gathered state,
    keyed by parameter names (a collective; ranks other than 0 get an empty dict)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return to_cpu(get_optimizer_state_dict(model, optimizer, options=_full_options()))
    return to_cpu(optimizer.state_dict())


def load_states(model: torch.nn.Module, optimizer, model_sd: dict, optimizer_sd: dict | None) -> None:
    """Loads what :func:`model_state` and :func:`optimizer_state` gave (``optimizer_sd`` None: the
    model only); an FSDP2 model takes the whole states and keeps its shards of them."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=options)
        if optimizer_sd is not None:
            set_optimizer_state_dict(model, optimizer, optimizer_sd, options=options)
        return
    model.load_state_dict(model_sd)
    if optimizer_sd is not None:
        optimizer.load_state_dict(optimizer_sd)


# ---------------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------------


def rng_state(device: torch.device | str = "cpu") -> dict:
    """The generator states the training draws from: torch's CPU generator and, for a CUDA
    ``device``, that device's generator (uint8 tensors)."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict, device: torch.device | str = "cpu") -> None:
    """Restores :func:`rng_state` (the CUDA part only when both it and ``device`` are CUDA)."""
    device = torch.device(device)
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _gather_rng(state: dict) -> list[dict]:
    """Every rank's :func:`rng_state` (a collective: all ranks call it)."""
    import torch.distributed as dist

    parts = [state["torch"]] + ([state["cuda"]] if state["cuda"] is not None else [])
    flat = torch.cat(parts)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = [torch.empty_like(flat, device=comm) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat.to(comm))
    n = state["torch"].numel()
    return [
        {"torch": o[:n].cpu().clone(), "cuda": o[n:].cpu().clone() if state["cuda"] is not None else None} for o in out
    ]


# ---------------------------------------------------------------------------------------------
# Command line and configuration
# ---------------------------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no checkpoints), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--checkpoint-every`` and ``--resume`` to the ``badm-train`` parser."""
    g = parser.add_argument_group("checkpoints")
    g.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="save OUT/checkpoints/<optimizer>.pt (model, optimizer, RNG states, progress, results) atomically "
        "every N optimizer steps and when the optimizer's run ends; 0: never; unset (None): at the end of every epoch",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue every optimizer from its checkpoint in the existing --out directory (optimizers that had "
        "finished are not trained again); the final weights equal an uninterrupted run's",
    )


def run_config(args: Any, name: str, hp: dict) -> dict:
    """The arguments that fix optimizer ``name``'s trajectory; ``--resume`` refuses a checkpoint
    whose config differs. Keys are ``badm-train``'s option names (``batch_size`` is ``--batch-size``)."""
    config = dict(
        task=args.task,
        seed=args.seed,
        subset=args.subset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        sub_batches=args.sub_batches,
        max_steps_per_epoch=args.max_steps_per_epoch,
        world_size=getattr(args, "world_size", 1),
        optimizer=name,
    )
    config.update({f"{name}_{key}": value for key, value in hp.items()})  # e.g. badm_sigma, sgd_lr
    if name == "badm":
        config["badm_mode"] = args.badm_mode
    if getattr(args, "fsdp", False):
        config["fsdp"] = True
    return config


def _option(key: str) -> str:
    if key == "world_size":
        return "world_size (number of processes)"
    if key == "optimizer":
        return "optimizer"
    return "--" + key.replace("_", "-")


def check_config(path: Path, saved: dict, wanted: dict) -> None:
    """Raises :class:`CheckpointError` naming every key where ``saved`` and ``wanted`` differ."""
    differ = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if differ:
        what = "; ".join(f"{_option(k)}: checkpoint {saved.get(k)!r}, now {wanted.get(k)!r}" for k in differ)
        raise CheckpointError(
            f"--resume: {path} was saved with other arguments ({what}). Resume with the checkpoint's arguments, "
            "or start a new run in another --out directory (or with --overwrite, which discards the checkpoints)"
        )


# ---------------------------------------------------------------------------------------------
# One optimizer's run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """Where one optimizer's run stands: ``epoch`` (1-based) is in progress with ``step`` of its
    steps done (their loss sums ``total`` over ``count`` examples), ``steps`` in the whole run;
    ``time_s``/``cpu_s`` the training time of the finished epochs; ``record`` its results."""

    record: dict
    epoch: int = 1
    step: int = 0
    steps: int = 0
    total: float = 0.0
    count: int = 0
    time_s: float = 0.0
    cpu_s: float = 0.0
    finished: bool = False

    def progress(self) -> dict:
        return {k: getattr(self, k) for k in _PROGRESS_KEYS}


class RunCheckpoint:
    """The checkpoints of one optimizer's run (from :meth:`Checkpointer.begin`).

    ``restore()`` continues from the checkpoint under ``--resume``; ``after_step`` (the
    ``on_step`` hook of :func:`badm_fast.train.cli.train_epoch`), ``end_epoch`` and ``finish`` keep
    :attr:`state` up to date and save when due.
    """

    def __init__(self, owner: Checkpointer, name: str, hp: dict, model, optimizer, device: torch.device):
        self.owner, self.name, self.model, self.optimizer = owner, name, model, optimizer
        self.device = torch.device(device)
        self.config = run_config(owner.args, name, hp) if owner.args is not None else {}
        self.state: RunState | None = None
        self._clock: tuple[float, float] = (0.0, 0.0)
        self.saving_wall = self.saving_cpu = 0.0  # seconds spent writing checkpoints in this epoch

    @property
    def path(self) -> Path | None:
        return self.owner.path(self.name)

    # -- resume ------------------------------------------------------------------------------
    def restore(self) -> RunState | None:
        """Under ``--resume``, loads the checkpoint's model, optimizer and RNG states in place and
        returns its :class:`RunState`; ``None`` (train from the start) otherwise."""
        path = self.path
        if not self.owner.resume or path is None or not path.is_file():
            if self.owner.resume:
                self.owner.notice(f"no checkpoint of {self.name} in {self.owner.dir}; training it from the start")
            return None
        ckpt = load_checkpoint(path)
        check_config(path, ckpt["config"], self.config)
        progress = ckpt["progress"]
        rank, world = self.owner.rank, self.config.get("world_size", 1)
        try:
            states = ckpt["optimizer"]
            mine = None if progress["finished"] else (states[rank] if len(states) > 1 else states[0])
            load_states(self.model, self.optimizer, ckpt["model"], mine)
            if not progress["finished"]:
                if len(ckpt["rng"]) != world:
                    raise ValueError(f"it holds the RNG states of {len(ckpt['rng'])} processes, this job has {world}")
                set_rng_state(ckpt["rng"][rank], self.device)
        except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
            raise CheckpointError(f"--resume: {path} does not fit this job: {exc}") from exc
        self.state = RunState(record=ckpt["record"], **{k: progress[k] for k in _PROGRESS_KEYS})
        if self.state.finished:
            self.owner.notice(f"{self.name} had finished; its results and weights come from {path}")
        else:
            self.owner.notice(
                f"resuming {self.name} from {path}: epoch {self.state.epoch}, {self.state.step} steps into it"
            )
        return self.state

    def fresh(self, record: dict) -> RunState:
        """The state of a run that starts now."""
        self.state = RunState(record=record)
        return self.state

    # -- saving ------------------------------------------------------------------------------
    def start_epoch(self, time_s: float, cpu_s: float) -> None:
        """Call right before an epoch's first step, with the training time of the epochs before."""
        self.state.time_s, self.state.cpu_s = time_s, cpu_s
        self._clock = (time.perf_counter(), time.process_time())
        self.saving_wall = self.saving_cpu = 0.0

    def after_step(self, total: float, count: int) -> None:
        """One step done; ``total``/``count``: the epoch's loss sums so far. Saves every N steps."""
        s = self.state
        s.step += 1
        s.steps += 1
        s.total, s.count = total, count
        every = self.owner.every
        if every and s.steps % every == 0:
            t0, c0 = self._clock  # the epoch's training time so far, without the time spent saving
            progress = self.state.progress()
            progress["time_s"] = s.time_s + (time.perf_counter() - t0) - self.saving_wall
            progress["cpu_s"] = s.cpu_s + (time.process_time() - c0) - self.saving_cpu
            self.save(progress)

    def end_epoch(self, time_s: float, cpu_s: float) -> None:
        """Call after the epoch's evaluation was recorded; saves when checkpoints are per epoch."""
        s = self.state
        s.epoch, s.step, s.total, s.count, s.time_s, s.cpu_s = s.epoch + 1, 0, 0.0, 0, time_s, cpu_s
        if self.owner.every is None and s.epoch <= self.config.get("epochs", 0):  # the last epoch: finish() saves
            self.save()

    def finish(self, time_s: float, cpu_s: float) -> None:
        """The run ended (all epochs, or a divergence): the final checkpoint."""
        s = self.state
        if s.finished:  # restored as finished: nothing new
            return
        s.time_s, s.cpu_s, s.finished = time_s, cpu_s, True
        if self.owner.every != 0:
            self.save()

    def save(self, progress: dict | None = None) -> None:
        """Writes the checkpoint now (a collective under ``--distributed``: every rank calls it)."""
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            self._save(self.state.progress() if progress is None else progress)
        finally:
            self.saving_wall += time.perf_counter() - t0
            self.saving_cpu += time.process_time() - c0

    def _save(self, progress: dict) -> None:
        distributed = self.config.get("world_size", 1) > 1
        sharded = is_sharded(self.model)
        if distributed and getattr(self.optimizer, "process_group", None) is not None:
            from badm_fast.distributed import gather_state_dict

            gathered = gather_state_dict(self.optimizer)  # every rank's duals, on rank 0
            optimizer = gathered["ranks"] if gathered is not None else None
        elif sharded or self.owner.write:
            # one state: a single process, DDP (every rank holds the same one), or FSDP2 (gathered on
            # rank 0, a collective every rank takes part in)
            optimizer = [optimizer_state(self.model, self.optimizer)]
        else:
            optimizer = None
        model = model_state(self.model) if sharded or self.owner.write else None
        rng = _gather_rng(rng_state(self.device)) if distributed else [rng_state(self.device)]
        if not self.owner.write:
            return
        ckpt = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config,
            "model": model,
            "optimizer": optimizer,
            "rng": rng,
            "progress": progress,
            "record": self.state.record,
        }
        self.owner.dir.mkdir(parents=True, exist_ok=True)
        atomic_save(ckpt, self.path)


# ---------------------------------------------------------------------------------------------
# The job's checkpoints
# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """The checkpoints of a ``badm-train`` job in ``out`` (``None``: none at all).

    Under ``--resume`` every existing checkpoint of the job's optimizers is read and checked
    against the arguments first (:class:`CheckpointError` on a damaged file or a mismatch, before
    anything trains). A fresh run removes the old checkpoints of its optimizers. ``write``:
    whether this process writes files (rank 0 of a distributed job).
    """

    def __init__(self, out: str | os.PathLike | None, args: Any = None, hps: dict | None = None, write: bool = True):
        self.args = args
        self.dir = Path(out) / CHECKPOINT_DIR if out is not None else None
        self.every = getattr(args, "checkpoint_every", None) if out is not None else 0
        self.resume = bool(getattr(args, "resume", False)) and out is not None
        self.write = write and out is not None
        self.rank = getattr(args, "rank", 0)
        self.quiet = bool(getattr(args, "quiet", False)) or not write
        if self.dir is None:
            return
        names = list(hps or ())
        for name in names:
            path = self.path(name)
            if self.write:  # what writes killed before their rename left behind
                _remove_temporaries(path)
                _remove_temporaries(self.final_path(name))
            if self.resume and path.is_file():
                check_config(path, load_checkpoint(path, mmap=True)["config"], run_config(args, name, hps[name]))
            elif not self.resume and self.write:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / f"{name}.pt"

    def final_path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir.parent / f"final-{name}.pt"

    def begin(self, name: str, hp: dict, model, optimizer, device) -> RunCheckpoint:
        """The checkpoints of optimizer ``name``'s run, training ``model`` on ``device``."""
        return RunCheckpoint(self, name, hp, model, optimizer, device)

    def save_final(self, name: str, model: torch.nn.Module) -> None:
        """``out/final-<name>.pt``: the trained model's ``state_dict`` (for an FSDP2 model a
        collective: every rank calls this)."""
        if not (self.write or is_sharded(model)):
            return
        state = model_state(model)
        if self.write:
            atomic_save(state, self.final_path(name))

    def notice(self, message: str) -> None:
        if not self.quiet:
            print(f"badm-train: {message}", file=sys.stderr)


NO_CHECKPOINTS = Checkpointer(None)
