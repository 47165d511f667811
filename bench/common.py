"""Shared utilities of the benchmarks in bench/: timing, bandwidth baselines, machine info, CSV and markdown.

Timing: a warm-up, then an adaptive number of repetitions (at least ``min_reps``, about
``target_s`` seconds in all); each repetition is timed on its own (``time.perf_counter`` on
CPU, CUDA events on GPU) and the median with the 20th and 80th percentiles is reported.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "Stats",
    "measure",
    "measure_group",
    "percentile",
    "synchronize",
    "fill_random_",
    "copy_gbps",
    "inplace_add_gbps",
    "machine_info",
    "load_average",
    "append_csv",
    "markdown_table",
    "fmt",
    "free_memory",
    "torch_optimizer_bytes",
]

GB = 1e9  # bandwidths are reported in decimal GB/s


@dataclass
class Stats:
    """Per-call times of one case in seconds."""

    median: float
    p20: float
    p80: float
    reps: int

    def gbps(self, nbytes: int) -> float:
        return nbytes / self.median / GB


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Percentile ``q`` in [0, 100] of already sorted values (linear interpolation)."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], Any], device: torch.device, n: int) -> list[float]:
    """Times ``n`` calls of ``fn`` one by one; seconds per call."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure_group(
    fns: Sequence[Callable[[], Any]],
    device: torch.device | str = "cpu",
    *,
    min_reps: int = 5,
    target_s: float = 1.0,
    max_reps: int = 10_000,
    warmup_s: float | None = None,
    rounds: int = 5,
) -> list[Stats]:
    """Median, p20 and p80 of the time of one call of each of ``fns``, timed side by side.

    Each function is warmed up, then gets about ``target_s`` seconds of timed calls (at least
    ``min_reps``); the calls are spread over ``rounds`` rounds that visit the functions in
    turn, so that a change of machine load during the measurement hits all of them alike.

    Args:
        fns: the calls to time (each must leave its inputs usable for the next call).
        device: where they run; CUDA devices are timed with events.
        min_reps: at least this many timed calls per function.
        target_s: aim for about this many seconds of timed calls per function.
        max_reps: at most this many timed calls per function.
        warmup_s: warm each function up for about this long (default: ``target_s / 10``); at
            least one call, two when the first one took less than ``target_s``.
        rounds: how many rounds the timed calls are spread over.
    """
    if min_reps < 1:
        raise ValueError(f"min_reps must be >= 1, got {min_reps}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    device = torch.device(device)
    warmup_s = target_s / 10 if warmup_s is None else warmup_s
    per_round = []
    for fn in fns:
        # The first call pays one-time costs (allocation, first touch, lazy state); the
        # estimate of one call comes from the following ones.
        est = _time_calls(fn, device, 1)[0]
        spent = est
        if est < target_s:
            est = _time_calls(fn, device, 1)[0]
            spent += est
        while spent < warmup_s:
            n = max(1, min(1000, int((warmup_s - spent) / max(est, 1e-7) / 2)))
            times = sorted(_time_calls(fn, device, n))
            est = times[len(times) // 2]
            spent += sum(times)
        reps = int(max(min_reps, min(max_reps, math.ceil(target_s / max(est, 1e-9)))))
        per_round.append(max(1, math.ceil(reps / rounds)))
    # Each round gives every function at least min_reps / rounds calls, and more up to its
    # planned count while its share of the round's time (target_s / rounds) lasts: a machine
    # that slows down after the warm-up costs fewer calls, not more time.
    floor = math.ceil(min_reps / rounds)
    budget = target_s / rounds
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            done, spent = 0, 0.0
            while done < floor or (done < per_round[i] and spent < budget):
                k = floor - done if done < floor else max(1, min(per_round[i] - done, per_round[i] // 8))
                t = _time_calls(fn, device, k)
                times[i] += t
                done += k
                spent += sum(t)
    out = []
    for t in times:
        t.sort()
        out.append(Stats(median=percentile(t, 50), p20=percentile(t, 20), p80=percentile(t, 80), reps=len(t)))
    return out


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu", **kw: Any) -> Stats:
    """:func:`measure_group` of one function."""
    return measure_group([fn], device, **kw)[0]


def fill_random_(t: torch.Tensor, seed: int = 0, scale: float = 1.0, block: int = 1 << 16) -> torch.Tensor:
    """Fills ``t`` with uniform values in [-scale, scale): one random block tiled over the
    tensor (memory speed, unlike ``randn`` over gigabytes; the values do not matter for the
    time of a data-independent step, only that they are finite and not denormal)."""
    flat = t.view(-1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = (torch.rand(min(block, flat.numel()), generator=gen, dtype=torch.float32) * 2 - 1) * scale
    base = base.to(device=t.device, dtype=t.dtype)
    n = flat.numel()
    full = n // base.numel() * base.numel()
    if full:
        flat[:full].view(-1, base.numel()).copy_(base)
    if n > full:
        flat[full:].copy_(base[: n - full])
    return t


def copy_gbps(nbytes: int, device: torch.device | str = "cpu", **measure_kw: Any) -> tuple[float, Stats]:
    """Bandwidth of ``dst.copy_(src)`` moving ``nbytes`` in all (``nbytes / 2`` read, ``nbytes / 2``
    written), counting read + write as the step benchmarks do. Returns ``(GB/s, stats)``."""
    device = torch.device(device)
    n = max(1, nbytes // 2 // 4)
    src = fill_random_(torch.empty(n, dtype=torch.float32, device=device))
    dst = torch.zeros_like(src)
    stats = measure(lambda: dst.copy_(src), device, **measure_kw)
    moved = 2 * src.nbytes
    return moved / stats.median / GB, stats


def inplace_add_gbps(nbytes: int, device: torch.device | str = "cpu", **measure_kw: Any) -> tuple[float, Stats]:
    """Bandwidth of the in-place stream ``x.add_(y, alpha=a)`` (read x and y, write x: three
    values per element, no write-allocate of a fresh destination) moving ``nbytes`` in all."""
    device = torch.device(device)
    n = max(1, nbytes // 3 // 4)
    x = fill_random_(torch.empty(n, dtype=torch.float32, device=device), seed=1)
    y = fill_random_(torch.empty(n, dtype=torch.float32, device=device), seed=2, scale=1e-6)
    stats = measure(lambda: x.add_(y, alpha=-1e-3), device, **measure_kw)
    moved = 3 * x.nbytes
    return moved / stats.median / GB, stats


def free_memory(device: torch.device | str = "cpu") -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The columns every CSV row carries: date, commit, machine, versions, load."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed or broken
        triton_version = "none"
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "load": load_average(),
    }
    return info


def append_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]], fieldnames: Sequence[str]) -> Path:
    """Appends ``rows`` to the CSV at ``path`` (header written when the file is new).

    A file whose header differs (an older column layout) is left alone; the rows then go to
    ``<stem>-<date>.csv`` beside it. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fieldnames = list(fieldnames)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fieldnames:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = path.with_name(f"{path.stem}-{stamp}{path.suffix}")
            print(f"note: {path.name}: the existing CSV has other columns; writing to {path}")
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fieldnames})
    return path


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables: ``digits`` significant digits, '-' for None."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if x == 0:
            return "0"
        mag = math.floor(math.log10(abs(x)))
        decimals = max(0, digits - 1 - mag)
        return f"{x:.{decimals}f}"
    return str(x)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows``; ``columns`` are ``(key, header)`` pairs. Numeric columns are
    right-aligned."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) for k, _ in columns]
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    body = ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join([head, rule, *body])


def report_header(
    title: str, info: dict[str, Any], command: str, load_end: str = "", versions: str = "torch"
) -> list[str]:
    """The opening lines of a markdown report: the machine, the versions (``"torch"`` or
    ``"torch,triton"``), commit, date, load average at start (and end), and the command."""
    names = ", ".join(f"{name} {info[name]}" for name in versions.split(","))
    return [
        f"### {title}: {info['device']} ({info['gpu'] or info['cpu']}, {info['cores']} cores, "
        f"{info['threads']} torch threads)",
        "",
        f"{names}, commit {info['commit']}, {info['date']}, "
        f"load average (1, 5, 15 min) at start {info['load']}" + (f", at end {load_end}." if load_end else "."),
        "",
        f"Command: `{command}`",
        "",
    ]


def torch_optimizer_bytes(opt: Any) -> int:
    """Bytes one step of an element-wise torch.optim optimizer moves, from its actual tensors:
    every parameter read and written, its gradient read, every per-element state tensor
    (exp_avg, exp_avg_sq, momentum_buffer) read and written (Adam: 7 values, SGD momentum: 5)."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            total += 2 * p.nbytes + p.grad.nbytes
            for t in opt.state[p].values():
                if isinstance(t, torch.Tensor) and t.numel() == p.numel() and t.numel() > 1:
                    total += 2 * t.nbytes
    return total
