#!/usr/bin/env python
"""Training-loop throughput: steps per second, and the optimizer's share of each step.

Models: the digits CNN of ``badm_fast.train.tasks`` (scikit-learn's 8x8 digits, the task's batch
size) and a larger MLP (784-2048-2048-10 on random data, batch 256). Optimizers:

- ``badm``: BADM per-sub-batch, S = 4, one step = :func:`badm_fast.split_step` (4 forward and
  backward passes on the quarters of the batch, then the fused step);
- ``badm-merged``: BADM ``mode="merged"``, S = 4 (one forward/backward over the whole batch,
  one dual buffer: the exact fast path);
- ``sgd``: ``SGD(momentum=0.9, foreach=True)`` and ``adam``: ``Adam(fused=True)``, each a plain
  ``zero_grad(); loss.backward(); step()``.

Each loop runs a warm-up, then timed steps for about ``--target-s`` seconds (at least
``--min-steps``); every iteration (zero_grad, forward, backward, step) is timed, and
``opt.step()`` itself is timed by step pre/post hooks registered on the optimizer. Reported:
median ms per iteration (p20–p80), steps/s (timed steps over their total time), the median
``opt.step()`` time and the optimizer's share (total ``opt.step()`` time / total loop time).

The markdown report goes to stdout; ``--md PATH`` also writes it to a file and ``--csv PATH``
appends one row per loop to a CSV (by default nothing is written).

    python bench/bench_train.py --quick    # a few seconds per loop
    python bench/bench_train.py --md bench/results/cpu_train.md --csv bench/results/bench_train.csv
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as bc  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_step import release_badm  # noqa: E402
from torch import nn  # noqa: E402

import badm_fast  # noqa: E402

OPTIMIZERS = ("badm", "badm-merged", "sgd", "adam")
MODELS = ("digits-cnn", "mlp")
SUB_BATCHES = 4
LABELS = {
    "badm": f"BADM per-sub-batch S={SUB_BATCHES}",
    "badm-merged": f"BADM merged S={SUB_BATCHES}",
    "sgd": "SGD(momentum=0.9, foreach)",
    "adam": "Adam(fused=True)",
}
CSV_FIELDS = [
    "date", "commit", "platform", "cpu", "cores", "threads", "device", "gpu", "torch", "triton", "python",
    "load", "model", "params", "batch", "optimizer", "backend", "steps", "median_ms", "p20_ms", "p80_ms",
    "steps_per_s", "opt_median_ms", "opt_share", "final_loss", "status",
]  # fmt: skip


class DigitsCNN(nn.Module):
    """The digits CNN's shape, for when ``badm_fast.train.tasks`` is not importable: two 3x3
    convolutions (32, 64 channels), a max-pool, a 128-unit hidden layer, 10 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


class Workload:
    """A model factory, batches to cycle through, the loss and each optimizer's hyperparameters."""

    def __init__(self, name: str, device: torch.device, seed: int = 0):
        self.name = name
        self.device = device
        gen = torch.Generator().manual_seed(seed)
        if name == "digits-cnn":
            try:
                from badm_fast.train.tasks import DigitsTask

                task = DigitsTask(seed=seed)
                self._build = task.build_model
                x, y = task.train_inputs, task.train_targets
                d = task.defaults
                self.batch = int(d.get("batch_size", 32))
                self.hparams = {
                    "badm": {"rho": d["badm_rho"], "sigma": d["badm_sigma"]},
                    "sgd": {"lr": d["sgd_lr"], "momentum": d["sgd_momentum"]},
                    "adam": {"lr": d["adam_lr"]},
                }
            except ImportError:
                from sklearn.datasets import load_digits

                data = load_digits()
                x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
                y = torch.tensor(data.target, dtype=torch.long)
                self._build = DigitsCNN
                self.batch = 32
                self.hparams = {
                    "badm": {"rho": 18.0, "sigma": 2.0},
                    "sgd": {"lr": 0.05, "momentum": 0.9},
                    "adam": {"lr": 1e-3},
                }
            perm = torch.randperm(len(y), generator=gen)
            x, y = x[perm], y[perm]
        elif name == "mlp":
            self.batch = 256
            x = torch.randn(8 * self.batch, 784, generator=gen)
            y = torch.randint(0, 10, (8 * self.batch,), generator=gen)
            self._build = lambda: nn.Sequential(
                nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
            )
            # SGD lr 0.01 with momentum 0.9, and BADM's equivalent (sigma = 1/lr, rho = sigma mu / (1 - mu)).
            self.hparams = {
                "badm": {"rho": 900.0, "sigma": 100.0},
                "sgd": {"lr": 0.01, "momentum": 0.9},
                "adam": {"lr": 1e-3},
            }
        else:
            raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
        n = len(y) // self.batch * self.batch
        self.batches = [
            (xb.to(device), yb.to(device)) for xb, yb in zip(x[:n].split(self.batch), y[:n].split(self.batch))
        ]

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self._build().to(self.device)

    @staticmethod
    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target)


def make_step(kind: str, model: nn.Module, work: Workload, backend: str = "auto"):
    """``(optimizer, step(x, y) -> loss)`` for one optimizer kind."""
    params = list(model.parameters())
    if kind in ("badm", "badm-merged"):
        mode = "merged" if kind == "badm-merged" else "sub_batch"
        opt = badm_fast.BADM(params, sub_batches=SUB_BATCHES, mode=mode, backend=backend, **work.hparams["badm"])

        def step(x, y):
            return badm_fast.split_step(model, opt, work.loss_fn, x, y)

        return opt, step
    if kind == "sgd":
        opt = torch.optim.SGD(params, foreach=True, **work.hparams["sgd"])
    elif kind == "adam":
        opt = torch.optim.Adam(params, fused=True, **work.hparams["adam"])
    else:
        raise ValueError(f"unknown optimizer {kind!r}; choose from {OPTIMIZERS}")

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = work.loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return opt, step


class StepTimer:
    """Times ``opt.step()`` with the optimizer's step pre/post hooks."""

    def __init__(self, opt: torch.optim.Optimizer, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self._t0 = 0.0
        self.handles = [opt.register_step_pre_hook(self._pre), opt.register_step_post_hook(self._post)]

    def _pre(self, *_):
        bc.synchronize(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_):
        bc.synchronize(self.device)
        self.times.append(time.perf_counter() - self._t0)

    def remove(self):
        for h in self.handles:
            h.remove()


def run_loop(work: Workload, kind: str, *, target_s: float = 3.0, min_steps: int = 20, warmup: int = 5,
             backend: str = "auto") -> dict[str, Any]:  # fmt: skip
    """One timed training loop; returns its row."""
    model = work.model()
    n_params = sum(p.numel() for p in model.parameters())
    opt, step = make_step(kind, model, work, backend=backend)
    batches = work.batches
    dev = work.device
    for i in range(warmup):
        step(*batches[i % len(batches)])
    timer = StepTimer(opt, dev)
    iters: list[float] = []
    loss = None
    start = time.perf_counter()
    i = 0
    while i < min_steps or time.perf_counter() - start < target_s:
        x, y = batches[(warmup + i) % len(batches)]
        bc.synchronize(dev)
        t0 = time.perf_counter()
        loss = step(x, y)
        bc.synchronize(dev)
        iters.append(time.perf_counter() - t0)
        i += 1
    timer.remove()
    if isinstance(opt, badm_fast.BADM):
        release_badm(opt)
    if len(timer.times) != len(iters):
        raise RuntimeError(f"timed {len(iters)} iterations but {len(timer.times)} optimizer steps")
    it = sorted(iters)
    opt_sorted = sorted(timer.times)
    return dict(
        model=work.name, params=n_params, batch=work.batch, optimizer=kind,
        backend=getattr(opt, "backend", "torch.optim"), steps=len(iters),
        median_ms=bc.percentile(it, 50) * 1e3, p20_ms=bc.percentile(it, 20) * 1e3, p80_ms=bc.percentile(it, 80) * 1e3,
        steps_per_s=len(iters) / sum(iters), opt_median_ms=bc.percentile(opt_sorted, 50) * 1e3,
        opt_share=sum(timer.times) / sum(iters), final_loss=float(loss), status="ok",
    )  # fmt: skip


COLUMNS = [
    ("model", "model"), ("params", "params"), ("batch", "batch"), ("label", "optimizer"),
    ("median_ms", "ms/step"), ("spread", "p20–p80 ms"), ("steps_per_s", "steps/s"),
    ("opt_median_ms", "opt.step() ms"), ("share", "optimizer share"),
]  # fmt: skip


def report(rows, info, command: str, target_s: float, load_end: str = "") -> str:
    shown = []
    for r in rows:
        d = dict(r, label=LABELS[r["optimizer"]])
        if r["status"] == "ok":
            d["spread"] = f"{bc.fmt(r['p20_ms'])}–{bc.fmt(r['p80_ms'])}"
            d["share"] = f"{100 * r['opt_share']:.1f}%"
        else:
            d["spread"] = r["status"]
        shown.append(d)
    lines = bc.report_header("Training throughput", info, command, load_end) + [
        f"About {target_s:g} s of timed steps per loop after a warm-up. A step is one batch: BADM per-sub-batch "
        f"runs {SUB_BATCHES} forward/backward passes on the quarters of the batch (badm_fast.split_step), "
        "BADM merged and torch.optim one pass over the whole batch. Optimizer share: time in opt.step() "
        "(step hooks) over the loop's time. BADM checks the gradients for non-finite values (the default).",
        "",
        bc.markdown_table(shown, COLUMNS),
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 1 s per loop")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--models", default=",".join(MODELS), help=",".join(MODELS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=",".join(OPTIMIZERS))
    ap.add_argument("--target-s", type=float, default=None, help="seconds of timed steps per loop (default 5)")
    ap.add_argument("--min-steps", type=int, default=20)
    ap.add_argument("--backend", default="auto", help="BADM back end")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--csv", default=None, metavar="PATH", help="append one row per loop to this CSV (default: none)")
    ap.add_argument("--no-csv", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
    ap.add_argument("--md", default=None, metavar="PATH", help="also write the markdown report to this file")
    return ap


def _choices(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def main(argv: list[str] | None = None, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = _choices(args.models, MODELS, "model")
    kinds = _choices(args.optimizers, OPTIMIZERS, "optimizer")
    target_s = args.target_s if args.target_s is not None else (1.0 if args.quick else 5.0)
    min_steps = min(args.min_steps, 5) if args.quick else args.min_steps
    info = bc.machine_info(device)
    command = "python bench/bench_train.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    rows = []
    for name in models:
        work = Workload(name, device)
        for kind in kinds:
            try:
                row = run_loop(work, kind, target_s=target_s, min_steps=min_steps, backend=args.backend)
            except Exception as exc:  # report it in the table, keep going
                row = dict(model=name, optimizer=kind, status=f"error: {type(exc).__name__}: {exc}"[:200])
            rows.append(row)
            if row["status"] == "ok":
                log(f"  {name:10} {LABELS[kind]:28} {row['median_ms']:9.2f} ms/step {row['steps_per_s']:8.2f} steps/s "
                    f"optimizer {100 * row['opt_share']:5.1f}%")  # fmt: skip
            else:
                log(f"  {name:10} {LABELS[kind]:28} {row['status']}")
            bc.free_memory(device)
    text = report(rows, info, command.strip(), target_s, load_end=bc.load_average())
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text)
    if args.csv and not args.no_csv:
        path = bc.append_csv(args.csv, [dict(info, **r) for r in rows], CSV_FIELDS)
        log(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
