#!/usr/bin/env python
"""Soak test of the distributed training job's exit: many ``torchrun`` jobs in a row, each must exit 0.

Every run is one ``torchrun --nproc_per_node 2 -m badm_fast.train --distributed`` job of a tiny
digits task (BADM and SGD under DDP, a checkpoint after every step). Runs alternate between

- ``fresh``: a job from the start, to the end;
- ``resumed``: a job killed with SIGKILL (its whole process group: the launcher and every rank)
  right after its ``k``-th checkpoint was written (``k`` varies from run to run), then a
  ``--resume`` job in the same output directory, to the end.

A run is clean when its (last) job exits 0 and its output holds no sign of an abort
("terminate called", a Python traceback, SIGABRT) nor badm-train's warning that the process
group outlived ``destroy_process_group``; it must also end with the final weights of the first
fresh run, bit for bit (a resumed job that exits 0 but trains something else is not clean
either). ``--load N`` keeps N busy-looping processes running alongside (the exit
races show up under load); ``--starve`` also renices the jobs' gloo worker threads (see
:class:`Starver`), which makes the exit race of badm_fast/train/cli.py::_shutdown_distributed
frequent: before that fix, most fresh runs aborted with ``--load 3 --starve`` on 2 cores.
Exit status: 0 when every run was clean.

    python bench/soak_distributed.py --runs 50 --load 3 --starve   # 15-30 s a run on 2 shared cores
    python bench/soak_distributed.py --runs 4 --keep /tmp/soak      # keep every run's directory
    python bench/soak_distributed.py --runs 50 --load 3 --starve --fsdp   # the same, the model sharded (FSDP2)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("badm", "sgd")
# 2 epochs x 4 steps per optimizer (128 examples, batches of 32 split over 2 ranks x 2 sub-batches)
JOB = [
    "--task", "digits", "--optimizers", ",".join(OPTIMIZERS), "--subset", "128", "--batch-size", "32",
    "--epochs", "2", "--sub-batches", "2", "--threads", "1", "--quiet", "--checkpoint-every", "1",
]  # fmt: skip
# a job writes 18 checkpoints (each optimizer: one per step and one at its end); the SIGKILL comes right
# after the k-th, k drawn from this range (BADM's 9 first, then SGD's)
KILL_AFTER = (1, 16)
MODE: list[str] = []  # ["--fsdp"]: the jobs shard the model with FSDP2 (soak(fsdp=True))
# signs of an unclean exit in a job's output; the last one is badm-train's own warning that the process
# group outlived destroy_process_group (its gloo worker threads can then abort the interpreter's exit)
ABORT_SIGNS = (
    "terminate called",
    "Traceback (most recent call last)",
    "SIGABRT",
    "core dumped",
    "still referenced after destroy_process_group",
)


class Starver(threading.Thread):
    """Renices (to 19) every gloo worker thread (``pt_gloo_runloop``) of the jobs' processes as soon
    as it appears (Linux), so that under load such a worker is often descheduled right after it
    finished a collective, before it let go of it: the window of the exit race. A job's processes
    are the launcher's descendants (torchrun starts every rank in a session of its own)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.launchers: set[int] = set()
        self.stopped = threading.Event()
        self.reniced = 0

    @staticmethod
    def _parents() -> dict[int, int]:
        parents = {}
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return parents

    def run(self) -> None:
        done = set()
        while not self.stopped.wait(0.005):
            parents = self._parents()
            for pid in parents:
                up = pid
                while up > 1 and up not in self.launchers:
                    up = parents.get(up, 0)
                if up <= 1 or pid == up:
                    continue
                try:
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        if tid in done:
                            continue
                        with open(f"/proc/{pid}/task/{tid}/comm") as f:
                            if f.read().strip() != "pt_gloo_runloop":
                                continue
                        os.setpriority(os.PRIO_PROCESS, int(tid), 19)
                        done.add(tid)
                        self.reniced += 1
                except OSError:
                    continue


STARVER: Starver | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return env


def start_job(out: Path, *extra: str, log: Path, nproc: int = 2) -> subprocess.Popen:
    """Starts one torchrun job writing to ``out`` (its output into ``log``), in a session of its own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "badm_fast.train", "--distributed"]
    cmd += [*JOB, *MODE, "--out", str(out), *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=out.parent, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    if STARVER is not None:
        STARVER.launchers.add(proc.pid)
    return proc


def wait_job(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -999  # reported as a timeout


def _writes(path: Path) -> int:
    """How many times the job has written this checkpoint (a step each, and one at the end)."""
    from badm_fast.train import checkpoint

    progress = checkpoint.load_checkpoint(path)["progress"]
    return progress["steps"] + int(progress["finished"])


def kill_after_checkpoints(proc: subprocess.Popen, out: Path, k: int, timeout: float) -> None:
    """SIGKILLs the whole job as soon as it has written ``k`` checkpoints (or when it ends first).

    The count comes from the checkpoints' progress, not from the writes this loop saw, so a
    loop that was descheduled for a while does not kill late."""
    seen, writes = {}, {}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for name in OPTIMIZERS:
            path = out / "checkpoints" / f"{name}.pt"
            try:
                ino = os.stat(path).st_ino  # each write is a rename: a new inode
                if seen.get(name) != ino:
                    writes[name] = _writes(path)
                    seen[name] = ino
            except FileNotFoundError:  # not written yet, or replaced between the stat and the read
                continue
        if sum(writes.values()) >= k:
            break
        time.sleep(0.001)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _finished(path: Path) -> bool:
    from badm_fast.train import checkpoint

    return path.is_file() and checkpoint.load_checkpoint(path)["progress"]["finished"]


def final_weights(out: Path) -> dict:
    import torch

    return {name: torch.load(out / f"final-{name}.pt", weights_only=True) for name in OPTIMIZERS}


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return all(list(a[n]) == list(b[n]) and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def one_run(i: int, kind: str, work: Path, rng: random.Random, timeout: float) -> dict:
    """One fresh or resumed run in ``work``; returns its outcome."""
    out = work / "out"
    log = work / "job.log"
    info = dict(run=i, kind=kind, log=log, out=out)
    if kind == "resumed":
        k = rng.randint(*KILL_AFTER)
        proc = start_job(out, log=work / "killed.log")
        kill_after_checkpoints(proc, out, k, timeout)
        info["killed_after"] = k
        if not (out / "checkpoints").is_dir():
            info.update(rc=None, why="no checkpoint before the kill")
            return info
        info["mid_run"] = not all(_finished(out / "checkpoints" / f"{name}.pt") for name in OPTIMIZERS)
        proc = start_job(out, "--resume", log=log)
    else:
        proc = start_job(out, log=log)
    info["rc"] = wait_job(proc, timeout)
    text = log.read_text(errors="replace")
    signs = [s for s in ABORT_SIGNS if s in text]
    if info["rc"] != 0 or signs:
        info["why"] = f"exit {info['rc']}" + (f", output has {signs}" if signs else "")
        info["tail"] = text[-3000:]
    return info


def soak(
    runs: int,
    load: int = 0,
    keep: Path | None = None,
    timeout: float = 180.0,
    seed: int = 0,
    starve: bool = False,
    echo=print,
    fsdp: bool = False,
):
    """Runs ``runs`` jobs (fresh and resumed alternately); returns (outcomes, failures)."""
    global STARVER
    MODE[:] = ["--fsdp"] if fsdp else []
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(load)]
    if starve and os.path.isdir("/proc"):
        STARVER = Starver()
        STARVER.start()
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="badm-soak-")) if keep is None else keep
    base.mkdir(parents=True, exist_ok=True)
    outcomes, failures, reference = [], [], None
    try:
        for i in range(runs):
            kind = "fresh" if i % 2 == 0 else "resumed"
            work = base / f"run{i:03d}-{kind}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            t0 = time.monotonic()
            info = one_run(i, kind, work, rng, timeout)
            info["seconds"] = time.monotonic() - t0
            if "why" not in info:
                weights = final_weights(info["out"])
                if reference is None:
                    reference = weights
                elif not same_weights(weights, reference):
                    info["why"] = "final weights differ from the first fresh run's"
            outcomes.append(info)
            note = ""
            if kind == "resumed":
                where = "mid-run" if info.get("mid_run") else "after the training had ended"
                note = f" (SIGKILL after {info['killed_after']} checkpoint writes, {where})"
            status = "ok" if "why" not in info else f"FAIL: {info['why']}"
            echo(f"run {i + 1}/{runs} {kind}{note}: {status} [{info['seconds']:.1f} s]")
            if "why" in info:
                failures.append(info)
                if info.get("tail"):
                    echo(info["tail"])
            elif keep is None:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if STARVER is not None:
            STARVER.stopped.set()
            STARVER.join()
            echo(f"{STARVER.reniced} gloo worker threads reniced")
            STARVER = None
        for b in burners:
            b.kill()
            b.wait()
        if keep is None and not failures:
            shutil.rmtree(base, ignore_errors=True)
    return outcomes, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="number of runs (fresh and resumed alternately)")
    p.add_argument("--load", type=int, default=0, help="busy-looping processes to run alongside")
    p.add_argument("--keep", type=Path, default=None, help="keep every run's directory under this folder")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds allowed for one job")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.add_argument(
        "--starve",
        action="store_true",
        help="renice the jobs' gloo worker threads to 19 (Linux): with --load, a worker is often descheduled right "
        "after a collective, which widens the window of the exit race",
    )
    p.add_argument("--fsdp", action="store_true", help="the jobs run with --fsdp (the model sharded with FSDP2)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: still kill the load processes (finally)
    outcomes, failures = soak(args.runs, args.load, args.keep, args.timeout, args.seed, args.starve, fsdp=args.fsdp)
    fresh = sum(o["kind"] == "fresh" for o in outcomes)
    mid = sum(bool(o.get("mid_run")) for o in outcomes)
    print(
        f"{len(outcomes) - len(failures)}/{len(outcomes)} runs clean ({fresh} fresh, {len(outcomes) - fresh} "
        f"resumed, {mid} of them killed mid-run), load {args.load}" + (", gloo workers starved" if args.starve else "")
        + (", FSDP2" if args.fsdp else "")
    )
    for f in failures:
        print(f"run {f['run'] + 1} ({f['kind']}): {f['why']}; its directory: {f['log'].parent}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
