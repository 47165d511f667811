"""What a training step with BADM costs next to SGD(foreach) and Adam(fused), measured side by side.

Three reports, each timed in one process with the cases interleaved (bench/common.py's
``measure_group``), so that the machine's load hits every case alike; the tables give ratios:

1. ``train``: the whole training step (``zero_grad`` + forward + backward + ``step``) on two MLPs —
   ``many``: 32 blocks of Linear(64, 64) + LayerNorm (130 parameter tensors, 0.14M parameters,
   batch 64), ``few``: 4 Linear(1024, 1024) (8 tensors, 4.2M parameters, batch 64). Optimizers:
   SGD(momentum 0.9, foreach), Adam(fused), BADM S=1, BADM merged S=4 (one backward pass), BADM
   per-sub-batch S=4 (four backward passes of a quarter batch each).
2. ``host``: ``step()`` alone on 10 / 161 / 1000 tensors of 256 elements (host overhead).
3. ``policy``: ``step()`` alone on one 16M-element fp32 tensor, S=4: BADM's default non-finite
   policy against ``on_nonfinite="ignore"``; the per-sub-batch checks happen in the copy of each
   sub-batch's gradient into its row, so both cases include the four copies (``sub_batch`` exits).

Usage: ``python bench/bench_train_step.py [--threads 1] [--reports train,host,policy] [--out DIR]``;
``--out`` writes ``bench_train_step.md`` there (nothing is written without it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import badm_fast  # noqa: E402


def _mlp(kind: str) -> tuple[nn.Module, int, int]:
    torch.manual_seed(0)
    if kind == "many":
        width, blocks = 64, 32
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers), width, 64
    width = 1024
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())]), width, 64


def _optimizer(name: str, params) -> Any:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    if name == "badm":
        return badm_fast.BADM(params, lr=0.01, momentum=0.9)
    if name == "badm-merged4":
        return badm_fast.BADM(params, lr=0.01, momentum=0.9, sub_batches=4, mode="merged")
    if name == "badm-s4":
        return badm_fast.BADM(params, lr=0.01, momentum=0.9, sub_batches=4)
    raise ValueError(name)


TRAIN_CASES = ("sgd", "adam", "badm", "badm-merged4", "badm-s4")


def train_report(min_reps: int, target_s: float) -> list[dict[str, Any]]:
    rows = []
    for kind in ("many", "few"):
        fns, opts = [], []
        for name in TRAIN_CASES:
            model, width, batch = _mlp(kind)
            opt = _optimizer(name, model.parameters())
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(batch, width, generator=gen)
            y = torch.randn(batch, 10 if kind == "many" else width, generator=gen)
            fns.append(_train_step(model, opt, name, x, y))
            opts.append(opt)
        stats = common.measure_group(fns, min_reps=min_reps, target_s=target_s, rounds=7)
        sgd = stats[0].median
        n_tensors = sum(1 for _ in model.parameters())
        n_params = sum(p.numel() for p in model.parameters())
        for name, st, opt in zip(TRAIN_CASES, stats, opts):
            rows.append(
                dict(
                    model=f"{kind} ({n_tensors} tensors, {n_params / 1e6:.2f}M)",
                    optimizer=name + (f" [{opt.backend}]" if isinstance(opt, badm_fast.BADM) else ""),
                    ms=st.median * 1e3,
                    p20=st.p20 * 1e3,
                    p80=st.p80 * 1e3,
                    x_sgd=st.median / sgd,
                )
            )
    return rows


def _train_step(model: nn.Module, opt: Any, name: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    loss_fn = nn.functional.mse_loss
    if name == "badm-s4":

        def step() -> None:
            opt.zero_grad()
            for s, (xs, ys) in enumerate(zip(x.tensor_split(4), y.tensor_split(4))):
                with opt.sub_batch(s):
                    loss_fn(model(xs), ys).backward()
            opt.step()

        return step

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def host_report(min_reps: int, target_s: float) -> list[dict[str, Any]]:
    rows = []
    for n in (10, 161, 1000):
        fns, names = [], []
        for name in ("sgd", "adam", "badm"):
            params = [nn.Parameter(torch.randn(256)) for _ in range(n)]
            for p in params:
                p.grad = torch.randn(256)
            opt = _optimizer(name, params)
            fns.append(opt.step)
            names.append(name + (f" [{opt.backend}]" if isinstance(opt, badm_fast.BADM) else ""))
        stats = common.measure_group(fns, min_reps=min_reps, target_s=target_s, rounds=7)
        adam = stats[1].median
        for name, st in zip(names, stats):
            rows.append(dict(tensors=n, optimizer=name, ms=st.median * 1e3, p20=st.p20 * 1e3, p80=st.p80 * 1e3,
                             x_adam=st.median / adam))
    return rows


def policy_report(min_reps: int, target_s: float, numel: int) -> list[dict[str, Any]]:
    rows, fns, names = [], [], []
    for policy in ("raise", "ignore"):
        p = nn.Parameter(common.fill_random_(torch.empty(numel)))
        opt = badm_fast.BADM([p], lr=0.01, momentum=0.9, sub_batches=4, on_nonfinite=policy)
        grads = [common.fill_random_(torch.empty(numel), seed=s + 1) for s in range(4)]

        def one(opt=opt, p=p, grads=grads) -> None:
            opt.zero_grad()
            for s, g in enumerate(grads):
                with opt.sub_batch(s):
                    p.grad = g  # what autograd hands over at the end of a backward pass
            opt.step()

        fns.append(one)
        names.append(f"S=4, on_nonfinite={policy!r} [{opt.backend}]")
    stats = common.measure_group(fns, min_reps=min_reps, target_s=target_s, rounds=7)
    for name, st in zip(names, stats):
        rows.append(dict(case=name, ms=st.median * 1e3, p20=st.p20 * 1e3, p80=st.p80 * 1e3,
                         x_ignore=st.median / stats[1].median))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--reports", default="train,host,policy", help="comma-separated: train, host, policy")
    ap.add_argument("--target-s", type=float, default=2.0, help="seconds of timed calls per case (default: 2)")
    ap.add_argument("--min-reps", type=int, default=21, help="timed calls per case at least (default: 21)")
    ap.add_argument("--policy-numel", type=int, default=1 << 24, help="elements of the policy case (default: 16M)")
    ap.add_argument("--out", default=None, help="write bench_train_step.md into this folder (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reports = [r.strip() for r in args.reports.split(",") if r.strip()]
    unknown = set(reports) - {"train", "host", "policy"}
    if unknown:
        ap.error(f"unknown reports {sorted(unknown)}")
    info = common.machine_info("cpu")
    command = "python bench/bench_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = common.report_header("Training step, host overhead, non-finite policy", info, command.strip())
    if "train" in reports:
        rows = train_report(args.min_reps, args.target_s)
        lines += ["Training step (zero_grad + forward + backward + step), median ms, ratio to SGD(foreach):", "",
                  common.markdown_table(rows, [("model", "model"), ("optimizer", "optimizer"), ("ms", "ms"),
                                               ("p20", "p20"), ("p80", "p80"), ("x_sgd", "x SGD")]), ""]
    if "host" in reports:
        rows = host_report(args.min_reps, args.target_s)
        lines += ["`step()` alone, tensors of 256 fp32 elements, median ms, ratio to Adam(fused):", "",
                  common.markdown_table(rows, [("tensors", "tensors"), ("optimizer", "optimizer"), ("ms", "ms"),
                                               ("p20", "p20"), ("p80", "p80"), ("x_adam", "x Adam(fused)")]), ""]
    if "policy" in reports:
        rows = policy_report(args.min_reps, args.target_s, args.policy_numel)
        lines += [f"Four sub-batch row copies + `step()`, one fp32 tensor of {args.policy_numel} elements, median ms:",
                  "", common.markdown_table(rows, [("case", "case"), ("ms", "ms"), ("p20", "p20"), ("p80", "p80"),
                                                   ("x_ignore", "x ignore")]), ""]
    lines.append(f"Load average at end: {common.load_average()}.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_train_step.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
