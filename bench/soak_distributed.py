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
races show up under load). Exit status: 0 when every run was clean.

    python bench/soak_distributed.py --runs 50 --load 1      # about 10 s a run on 2 loaded cores
    python bench/soak_distributed.py --runs 4 --keep /tmp/soak   # keep every run's directory
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("badm", "sgd")
# 2 epochs x 4 steps per optimizer (128 examples, batches of 32 split over 2 ranks x 2 sub-batches)
JOB = [
    "--task", "digits", "--optimizers", ",".join(OPTIMIZERS), "--subset", "128", "--batch-size", "32",
    "--epochs", "2", "--sub-batches", "2", "--threads", "1", "--quiet", "--checkpoint-every", "1",
]  # fmt: skip
# a job writes 18 checkpoints (each optimizer: one per step and one at its end); the SIGKILL comes after
# the k-th write seen, k drawn from this range (polling can miss a write: then it comes a little later)
KILL_AFTER = (1, 10)
# signs of an unclean exit in a job's output; the last one is badm-train's own warning that the process
# group outlived destroy_process_group (its gloo worker threads can then abort the interpreter's exit)
ABORT_SIGNS = (
    "terminate called",
    "Traceback (most recent call last)",
    "SIGABRT",
    "core dumped",
    "still referenced after destroy_process_group",
)


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
    cmd += [*JOB, "--out", str(out), *extra]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=out.parent, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_job(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -999  # reported as a timeout


def kill_after_checkpoints(proc: subprocess.Popen, out: Path, k: int, timeout: float) -> None:
    """SIGKILLs the whole job right after its ``k``-th checkpoint write (or when it ends first)."""
    seen, writes = {}, 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for name in OPTIMIZERS:
            try:
                ino = os.stat(out / "checkpoints" / f"{name}.pt").st_ino  # each write is a rename: a new inode
            except FileNotFoundError:
                continue
            if seen.get(name) != ino:
                seen[name] = ino
                writes += 1
        if writes >= k:
            break
        time.sleep(0.001)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _finished(path: Path) -> bool:
    from badm_fast import checkpoint

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


def soak(runs: int, load: int = 0, keep: Path | None = None, timeout: float = 180.0, seed: int = 0, echo=print):
    """Runs ``runs`` jobs (fresh and resumed alternately); returns (outcomes, failures)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(load)]
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
                note = f" (SIGKILL after checkpoint write {info['killed_after']}, {where})"
            status = "ok" if "why" not in info else f"FAIL: {info['why']}"
            echo(f"run {i + 1}/{runs} {kind}{note}: {status} [{info['seconds']:.1f} s]")
            if "why" in info:
                failures.append(info)
                if info.get("tail"):
                    echo(info["tail"])
            elif keep is None:
                shutil.rmtree(work, ignore_errors=True)
    finally:
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
    args = p.parse_args(argv)
    outcomes, failures = soak(args.runs, args.load, args.keep, args.timeout, args.seed)
    fresh = sum(o["kind"] == "fresh" for o in outcomes)
    mid = sum(bool(o.get("mid_run")) for o in outcomes)
    print(
        f"{len(outcomes) - len(failures)}/{len(outcomes)} runs clean ({fresh} fresh, {len(outcomes) - fresh} "
        f"resumed, {mid} of them killed mid-run), load {args.load}"
    )
    for f in failures:
        print(f"run {f['run'] + 1} ({f['kind']}): {f['why']}; its directory: {f['log'].parent}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
