#!/usr/bin/env python
"""Distributed training step on gloo, 2 processes on this machine: BADM against DDP + SGD(momentum).

The same MLP (``--width``; 1024-2048-2048-1024-10, 8.4M parameters by default) on a fixed random
batch of ``--batch`` samples per rank, one thread per process (2 processes on 2 cores). Cases:

- ``badm``: ``BADM(process_group=WORLD, sub_batches=1)`` with the default
  ``on_nonfinite="raise"`` (each step: a one-flag-per-rank all-reduce agreeing on non-finite
  gradients, then the kernel and one all-reduce of the payload per bucket, after the backward
  pass);
- ``badm (on_nonfinite="ignore")``: no agreement collective, only the payload all-reduce;
- ``badm, overlap``: ``BADM(..., overlap=True)`` (comm buckets of ``--bucket-cap-mb`` MiB, the
  first 1 MiB, like DDP's), the backward pass inside ``with opt.sub_batch(0, weight=batch):``:
  each comm bucket's kernel runs and its all-reduce starts during the backward pass; ``step()``
  waits for them, agrees on refusing the step (one small all-reduce) and adds ``delta / W``;
- ``ddp + sgd``: ``DistributedDataParallel`` (its bucketed gradient all-reduce overlaps the
  backward pass; ``bucket_cap_mb`` the same) and ``SGD(momentum=0.9, foreach=True)``;
- ``badm, overlap`` and ``ddp + sgd`` with ``--small-bucket-cap-mb`` MiB buckets (default 4: here one
  bucket per large layer, so that more of the all-reduce can start before the backward pass ends);
- ``badm, 1 process``: the same BADM step without a process group (the kernel alone), as a
  baseline for the step's compute.

Every iteration (zero_grad, forward, backward, step) is timed, and ``opt.step()`` on its own;
inside BADM's step the payload all-reduce is timed where it runs (``torch.distributed.all_reduce``
wrapped in this process; for the overlapped cases the time ``step()`` spends waiting for the
started all-reduces, the part not hidden behind the backward pass). Separately, with nothing
else running: an all-reduce of a tensor of the payload's size, the all-reduces of the comm
buckets' payloads one after the other (what the overlap hides part of), and the copy of the
duals the overlapped step makes (from which a refused step restores them). Cases alternate in
rounds; medians (p20-p80) over all timed iterations of rank 0.

    python bench/bench_distributed.py --out bench/results/distributed.md   # the report, also written there
    python bench/bench_distributed.py --quick       # a few iterations, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as bc  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import badm_fast  # noqa: E402

WORLD = 2


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width // 2, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width // 2),
        nn.ReLU(),
        nn.Linear(width // 2, 10),
    )


class _TimedWork:
    """An async all-reduce's work whose wait() is timed (the part of the all-reduce still exposed)."""

    def __init__(self, work, times: list[float], waits: list[float]):
        self.work = work
        self.times = times
        self.waits = waits

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.work.wait(*args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        self.waits.append(self.times[-1])
        return out


class _AllReduceTimer:
    """Wraps torch.distributed.all_reduce in this process: times blocking calls on large tensors,
    and the wait() of every asynchronous one."""

    def __init__(self, min_numel: int):
        self.min_numel = min_numel
        self.times: list[float] = []
        self.waits: list[float] = []  # the waits of the asynchronous ones, in the order they were waited for
        self.inner = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        if kwargs.get("async_op"):
            return _TimedWork(self.inner(tensor, *args, **kwargs), self.times, self.waits)
        if tensor.numel() < self.min_numel:
            return self.inner(tensor, *args, **kwargs)
        t0 = time.perf_counter()
        out = self.inner(tensor, *args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        return out


def _alone(case: str) -> str:
    """The row of an overlapped case's comm buckets' all-reduces, timed alone."""
    return "comm buckets' all-reduces alone" + case[len("badm, overlap"):]


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300)
    )
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width // 2, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    cases = {}
    m = _model(args.width)
    cases["badm"] = (m, badm_fast.BADM(m.parameters(), rho=9.0, sigma=10.0, process_group=dist.group.WORLD))
    m = _model(args.width)
    cases['badm (on_nonfinite="ignore")'] = (
        m,
        badm_fast.BADM(m.parameters(), rho=9.0, sigma=10.0, on_nonfinite="ignore", process_group=dist.group.WORLD),
    )
    caps = [("", args.bucket_cap_mb)]
    if args.small_bucket_cap_mb:
        caps.append((f" (bucket_cap_mb={args.small_bucket_cap_mb:g})", args.small_bucket_cap_mb))
    for suffix, cap in caps:
        m = _model(args.width)
        cases["badm, overlap" + suffix] = (m, badm_fast.BADM(m.parameters(), rho=9.0, sigma=10.0, overlap=True,
                                                            bucket_cap_mb=cap, process_group=dist.group.WORLD))
    for suffix, cap in caps:
        m = nn.parallel.DistributedDataParallel(_model(args.width), bucket_cap_mb=cap)
        cases["ddp + sgd" + suffix] = (m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=True))
    m = _model(args.width)
    cases["badm, 1 process"] = (m, badm_fast.BADM(m.parameters(), rho=9.0, sigma=10.0))
    n_params = sum(p.numel() for p in _model(args.width).parameters())

    timer = _AllReduceTimer(min_numel=n_params // 2)
    dist.all_reduce = timer  # badm_fast.distributed calls dist.all_reduce: timed where it runs
    times = {name: {"iter": [], "step": [], "allreduce": []} for name in cases}
    waits: dict[str, list[list[float]]] = {name: [] for name in cases if "overlap" in name}  # per step and bucket

    def iteration(name: str) -> tuple[float, float, list[float], list[float]]:
        model, opt = cases[name]
        before, before_waits = len(timer.times), len(timer.waits)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if isinstance(opt, badm_fast.BADM) and opt.overlap:
            with opt.sub_batch(0, weight=float(args.batch)):  # the comm buckets start during this backward pass
                F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
        else:
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step(weights=[float(args.batch)]) if isinstance(opt, badm_fast.BADM) else opt.step()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1, timer.times[before:], timer.waits[before_waits:]

    for name in cases:
        for _ in range(args.warmup):
            iteration(name)
    for _ in range(args.rounds):
        for name in cases:
            dist.barrier()
            for _ in range(args.steps):
                it, st, ar, wt = iteration(name)
                times[name]["iter"].append(it)
                times[name]["step"].append(st)
                if name.startswith("badm") and "1 process" not in name:
                    times[name]["allreduce"].append(sum(ar))
                if name in waits:
                    waits[name].append(wt)

    # with nothing else running: an all-reduce of a tensor of the payload's size; those of each
    # overlapped case's comm buckets one after the other; the copy of the duals of the overlapped step
    payload = next(iter(badm_fast.distributed._replica(cases["badm"][1]).payloads.values()))
    alone = torch.zeros_like(payload)
    overlapped = [name for name in cases if "overlap" in name]
    comm = {name: cases[name][1]._overlap.comm_buckets() for name in overlapped}
    comm_alone = {name: [torch.zeros_like(cb.payload) for cb in comm[name]] for name in overlapped}
    duals = [d for cb in comm["badm, overlap"] for d in cb.part().duals]
    backups = [b for cb in comm["badm, overlap"] for b in cb.backup]
    for name in ("all-reduce alone", "copy of the duals alone", *(_alone(name) for name in overlapped)):
        times[name] = {"iter": [], "step": [], "allreduce": []}
    comm_each: dict[str, list[list[float]]] = {name: [] for name in overlapped}  # per repetition, per bucket

    def timed(fn) -> float:
        dist.barrier()  # both ranks start together: the time is the all-reduce's, not the other rank's lag
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for k in range(args.warmup + args.rounds * args.steps):
        whole = timed(lambda: timer.inner(alone))
        each = {name: [timed(lambda t=t: timer.inner(t)) for t in comm_alone[name]] for name in overlapped}
        copy = timed(lambda: torch._foreach_copy_(backups, duals))
        if k >= args.warmup:
            times["all-reduce alone"]["allreduce"].append(whole)
            times["copy of the duals alone"]["step"].append(copy)
            for name in overlapped:
                times[_alone(name)]["allreduce"].append(sum(each[name]))
                comm_each[name].append(each[name])
    dist.all_reduce = timer.inner

    if rank == 0:
        result = {
            "n_params": n_params,
            "comm_buckets": {name: [cb.payload.numel() * cb.payload.element_size() for cb in comm[name]]
                             for name in overlapped},
            "comm_alone": comm_each,
            "waits": waits,
            "overlap_counts": {name: [cases[name][1]._overlap.steps_overlapped, cases[name][1]._overlap.steps_again]
                               for name in cases if "overlap" in name},
            "payload_elements": payload.numel(),
            "payload_bytes": payload.numel() * payload.element_size(),
            "backend": cases["badm"][1].backend,
            "times": times,
            "machine": bc.machine_info("cpu"),
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _stats(values: list[float]) -> bc.Stats | None:
    if not values:
        return None
    v = sorted(values)
    return bc.Stats(bc.percentile(v, 50), bc.percentile(v, 20), bc.percentile(v, 80), len(v))


def _table(result: dict) -> str:
    rows = []
    for name, t in result["times"].items():
        it, st, ar = _stats(t["iter"]), _stats(t["step"]), _stats(t["allreduce"])
        row = {"case": name}
        if it:
            ddp = _stats(result["times"][_ddp_of(name)]["iter"])
            row["iter"] = it.median * 1e3
            row["iter_range"] = f"{it.p20 * 1e3:.1f}-{it.p80 * 1e3:.1f}"
            row["ratio"] = f"{it.median / ddp.median:.2f}x"
        if st:
            row["step"] = st.median * 1e3
        if ar:
            row["allreduce"] = ar.median * 1e3
            if st:
                row["share"] = f"{100 * sum(t['allreduce']) / sum(t['step']):.0f}%"
        rows.append(row)
    return bc.markdown_table(
        rows,
        [
            ("case", "case"),
            ("iter", "ms / iteration (median)"),
            ("iter_range", "p20-p80"),
            ("ratio", "vs DDP + SGD (same buckets)"),
            ("step", "ms opt.step()"),
            ("allreduce", "ms payload all-reduce in opt.step()"),
            ("share", "all-reduce share of opt.step()"),
        ],
    )


def _ddp_of(case: str) -> str:
    """The DDP + SGD case a case is compared with: the one with the same buckets."""
    suffix = case[len("badm, overlap"):] if case.startswith("badm, overlap") else ""
    return "ddp + sgd" + (suffix if suffix.startswith(" (bucket_cap_mb") else "")


def _medians(result: dict) -> dict[str, dict[str, float | None]]:
    return {k: {part: (_stats(v[part]).median * 1e3 if v[part] else None) for part in v}
            for k, v in result["times"].items()}


def _hidden(result: dict, case: str = "badm, overlap") -> float:
    """The share of the comm buckets' all-reduce time (alone) that the overlapped step did not wait for."""
    med = _medians(result)
    return 1.0 - med[case]["allreduce"] / med[_alone(case)]["allreduce"]


def _bucket_table(result: dict) -> str:
    """Per overlapped case and comm bucket: its payload, its all-reduce alone, and how long step()
    waited for it (medians)."""
    rows = []
    for name, sizes in result["comm_buckets"].items():
        for k, nbytes in enumerate(sizes):
            alone = _stats([each[k] for each in result["comm_alone"][name]]).median * 1e3
            row = {"case": name if k == 0 else "", "bucket": f"{k}", "mib": nbytes / 2**20, "alone": alone}
            waited = [w[k] for w in result["waits"][name] if len(w) == len(sizes)]
            if waited:
                row["wait"] = _stats(waited).median * 1e3
                row["hidden"] = f"{100 * (1 - row['wait'] / alone):.0f}%"
            rows.append(row)
    columns = [("case", "case"), ("bucket", "comm bucket (in start order)"), ("mib", "MiB"),
               ("alone", "ms all-reduce alone"), ("wait", "ms step() waited for it"), ("hidden", "hidden")]
    return bc.markdown_table(rows, columns)


def _summary(result: dict) -> str:
    """Sentences computed from the medians: where BADM's time per iteration goes, with and without overlap."""
    med = _medians(result)
    badm, ddp = med["badm"], med["ddp + sgd"]
    alone = med["all-reduce alone"]["allreduce"]
    extra = badm["iter"] - ddp["iter"]
    text = (
        f"Median iteration: BADM {badm['iter']:.0f} ms, DDP + SGD {ddp['iter']:.0f} ms ({extra:+.0f} ms, "
        f"{100 * extra / ddp['iter']:+.0f}%): without overlap BADM's payload all-reduce ({badm['allreduce']:.0f} ms "
        f"inside the step, including the wait for the slower rank; {alone:.0f} ms alone) runs after the backward "
        "pass."
    )
    for name, sizes in result["comm_buckets"].items():
        o = med[name]
        d = med[_ddp_of(name)]
        counts = result["overlap_counts"][name]
        mib = ", ".join(f"{b / 2**20:.1f}" for b in sizes)
        text += (
            f" `{name}`: {o['iter']:.0f} ms, {o['iter'] / d['iter']:.2f}x `{_ddp_of(name)}` ({d['iter']:.0f} ms); "
            f"its comm buckets ({mib} MiB, in start order) take {med[_alone(name)]['allreduce']:.0f} ms to "
            f"all-reduce one after the other alone, step() waited {o['allreduce']:.1f} ms for them: "
            f"{100 * _hidden(result, name):.0f}% of the all-reduce time hidden behind the backward pass "
            f"({counts[0]} steps used their early contributions, {counts[1]} were reduced again)."
        )
    text += (
        f" The overlapped step copies the duals aside (restored by a refused step): "
        f"{med['copy of the duals alone']['step']:.1f} ms alone. Without communication the BADM step takes "
        f"{med['badm, 1 process']['step']:.0f} ms."
    )
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=2048, help="hidden width of the MLP (default 2048: 8.4M parameters)")
    p.add_argument("--batch", type=int, default=64, help="samples per rank and step")
    p.add_argument("--steps", type=int, default=2, help="timed iterations per case and round")
    p.add_argument("--rounds", type=int, default=20, help="rounds over the cases (they alternate: drift hits all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0,
                   help="bucket size in MiB of BADM(overlap=True) and of DDP (default 25, DDP's default)")
    p.add_argument("--small-bucket-cap-mb", type=float, default=4.0,
                   help="also run BADM(overlap=True) and DDP with buckets of this size in MiB (0: not)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // WORLD), help="threads per process")
    p.add_argument("--quick", action="store_true", help="a few iterations; print, write nothing")
    p.add_argument("--out", default=None, metavar="PATH", help="also write the markdown report here (default: none)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the workers are stopped")
    p.add_argument("--worker", nargs=3, metavar=("RANK", "PORT", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup = 3, 1, 1
    if args.worker:
        rank, port, out = args.worker
        _worker(int(rank), int(port), args, out)
        return

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS=str(args.threads))
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        procs = [
            subprocess.Popen([sys.executable, __file__, *forwarded, "--worker", str(r), str(port), out], env=env)
            for r in range(WORLD)
        ]
        try:
            for proc in procs:
                proc.wait(timeout=args.timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if any(proc.returncode for proc in procs):
            sys.exit(f"a worker failed (exit codes {[proc.returncode for proc in procs]})")
        with open(out) as f:
            result = json.load(f)

    table = _table(result)
    mach = result["machine"]
    command = "python bench/bench_distributed.py " + " ".join(shlex.quote(a) for a in forwarded)
    text = "\n".join(
        [
            "# Distributed step: BADM vs DDP + SGD(momentum), gloo, 2 processes",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"{mach['date']}, commit {mach['commit']}, {mach['cpu']} ({mach['cores']} cores), torch {mach['torch']}, "
            f"{args.threads} thread(s) per process, load average {mach['load']}.",
            f"MLP with {result['n_params'] / 1e6:.1f}M fp32 parameters, batch {args.batch} per rank; BADM back end "
            f"{result['backend']!r}, payload "
            f"{result['payload_bytes'] / 2**20:.1f} MiB per step (the same bytes as DDP's gradient all-reduce, "
            "plus a 16-element tail and 2 elements per parameter tensor).",
            "",
            table,
            "",
            _summary(result),
            "",
            _bucket_table(result),
            "",
            "An iteration is zero_grad + forward + backward + opt.step(). `ms opt.step()`: the optimizer step "
            "alone (for BADM: the agreement on non-finite gradients, the kernel and the payload all-reduce; with "
            "overlap the kernel ran during the backward pass and the step waits for the all-reduces, agrees and "
            "adds delta / W; for DDP + SGD only the SGD update, its all-reduce already ran, overlapped with the "
            "backward pass). `ms payload all-reduce in opt.step()`: for the overlapped cases, the time step() "
            "waited for the all-reduces started during the backward pass. `all-reduce alone`: an all-reduce of a "
            "tensor of the payload's size, nothing else running; `comm buckets' all-reduces alone`: those of the "
            "comm buckets' payloads one after the other; `copy of the duals alone`: the copy the overlapped "
            "step makes.",
            "",
        ]
    )
    print(text)
    if args.out and not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
