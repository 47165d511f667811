"""A small sweep of BADM's (rho, sigma) with ``badm-train``; the defaults of the job come from it.

sigma = (1 - mu)/lr and rho = sigma * mu / (1 - mu) = mu/lr match SGD(lr, momentum mu) at steady state
(docs/algorithm.md, "Correspondence with momentum SGD"), so the grid is sigma x mu:

    python bench/sweep_badm.py --out bench/sweep_badm.md   # every task of SWEEPS, the report written there
    python bench/sweep_badm.py --tasks digits graph        # some of them, printed only
    python bench/sweep_badm.py --tasks digits --sigmas 2 5 --momenta 0.9

Each cell is one ``badm-train --optimizers badm`` run (same data, same initial weights as
the job); the tables report the final test metric (mean over seeds) and the final training
loss. The best cell of each task (by final test metric, ties broken by training loss) is the
default of ``badm_fast/train/tasks.py``. Runs on CPU with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from badm_fast.train import cli

# task -> (extra badm-train arguments, sigmas, momenta, seeds); budgets sized so that the
# whole default sweep takes about 10 minutes on 2 CPU cores.
SWEEPS = {
    "digits": (["--epochs", "15"], [1, 2, 5, 10], [0.0, 0.5, 0.9], [0, 1]),
    "fashion-mnist": (["--subset", "6000", "--epochs", "2"], [0.5, 1, 2, 5], [0.5, 0.9], [0]),
    "graph": ([], [0.2, 0.5, 1, 2, 5], [0.0, 0.5, 0.9], [0, 1, 2]),
    "generate": (["--epochs", "10"], [2, 5, 10, 20], [0.0, 0.5, 0.9], [0]),
    "charlm": (["--subset", "3000", "--epochs", "2"], [0.1, 0.2, 0.5, 1], [0.5, 0.9], [0]),
}


def rho_of(sigma: float, mu: float) -> float:
    """rho = sigma * mu / (1 - mu): BADM's steady state is momentum SGD with momentum mu."""
    return sigma * mu / (1.0 - mu)


def run_cell(task: str, extra: list[str], sigma: float, mu: float, seed: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        argv = [
            "--task", task, "--optimizers", "badm", "--seed", str(seed), "--out", out, "--overwrite", "--quiet",
            "--threads", str(threads), "--badm-sigma", repr(float(sigma)), "--badm-rho", repr(rho_of(sigma, mu)),
            *extra,
        ]  # fmt: skip
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the job's own summary table
                code = cli.main(argv)
        except SystemExit as e:  # a refused configuration
            code = e.code
        except (RuntimeError, FloatingPointError):  # a divergent one
            code = 1
        if code != 0:
            return dict(ok=False, wall_s=time.perf_counter() - t0)
        with open(Path(out) / "results.json") as f:
            res = json.load(f)
    run = res["optimizers"]["badm"]
    if run["diverged"]:
        return dict(ok=False, wall_s=time.perf_counter() - t0)
    return dict(
        ok=True,
        metric=run["final_metric"],
        loss=run["final_train_loss"],
        wall_s=time.perf_counter() - t0,
        name=res["metric"]["name"],
        higher=res["metric"]["higher_is_better"],
    )


def sweep_task(task: str, extra, sigmas, momenta, seeds, threads: int, log=sys.stderr) -> tuple[str, dict]:
    cells = {}
    for sigma in sigmas:
        for mu in momenta:
            runs = [run_cell(task, extra, sigma, mu, s, threads) for s in seeds]
            ok = [r for r in runs if r["ok"]]
            cell = dict(sigma=sigma, mu=mu, rho=rho_of(sigma, mu), diverged=len(ok) < len(runs))
            if ok:
                cell.update(
                    metric=statistics.mean(r["metric"] for r in ok),
                    loss=statistics.mean(r["loss"] for r in ok),
                    name=ok[0]["name"],
                    higher=ok[0]["higher"],
                )
            cells[(sigma, mu)] = cell
            shown = f"{cell['metric']:.4f}" if ok else "diverged"
            print(f"  {task} sigma={sigma:g} mu={mu:g} rho={cell['rho']:g}: {shown} "
                  f"({sum(r['wall_s'] for r in runs):.1f} s)", file=log)  # fmt: skip
    good = [c for c in cells.values() if "metric" in c and not c["diverged"]]
    if not good:
        return f"### {task}\n\nevery cell diverged\n", {}
    higher = good[0]["higher"]
    name = good[0]["name"]
    best = max(good, key=lambda c: (c["metric"] if higher else -c["metric"], -c["loss"]))

    def fmt(c):
        if "metric" not in c or c["diverged"]:
            return "diverged"
        text = f"{c['metric']:.4f} / {c['loss']:.4f}"
        return f"**{text}**" if c is best else text

    cmd_extra = "".join(" " + a for a in extra)
    lines = [
        f"### {task}",
        "",
        f"`badm-train --task {task} --optimizers badm{cmd_extra} --badm-sigma SIGMA --badm-rho RHO` "
        f"with seeds {', '.join(map(str, seeds))} (mean over seeds). Cell: final {name} "
        f"({'higher' if higher else 'lower'} is better) / final training loss; rho = sigma mu / (1 - mu).",
        "",
        "| sigma \\ momentum mu | " + " | ".join(f"mu={m:g}" for m in momenta) + " |",
        "|---|" + "---:|" * len(momenta),
    ]
    for sigma in sigmas:
        lines.append(f"| sigma={sigma:g} | " + " | ".join(fmt(cells[(sigma, m)]) for m in momenta) + " |")
    lines += [
        "",
        f"Best: sigma={best['sigma']:g}, rho={best['rho']:g} (mu={best['mu']:g}): final {name} "
        f"{best['metric']:.4f}, training loss {best['loss']:.4f}.",
        "",
    ]
    return "\n".join(lines), best


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    p.add_argument("--sigmas", nargs="+", type=float, help="override the grid's sigmas")
    p.add_argument("--momenta", nargs="+", type=float, help="override the grid's momenta mu in [0, 1)")
    p.add_argument("--seeds", nargs="+", type=int, help="override the grid's seeds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, metavar="PATH", help="also write the report here (default: print only)")
    p.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.momenta and any(not 0.0 <= m < 1.0 for m in args.momenta):
        p.error("--momenta must be in [0, 1)")
    if args.sigmas and any(s <= 0 for s in args.sigmas):
        p.error("--sigmas must be > 0")

    t0 = time.perf_counter()
    sections, best = [], {}
    for task in args.tasks:
        extra, sigmas, momenta, seeds = SWEEPS[task]
        table, b = sweep_task(
            task, extra, args.sigmas or sigmas, args.momenta or momenta, args.seeds or seeds, args.threads
        )
        sections.append(table)
        best[task] = b
        print(table, flush=True)
    elapsed = time.perf_counter() - t0
    command = "python bench/sweep_badm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        "# BADM (rho, sigma) sweep",
        "",
        f"Command: `{command.strip()}` ({elapsed / 60:.1f} min on {platform.machine()}, "
        f"{args.threads} torch threads, torch {torch.__version__}, {platform.platform()}).",
        "",
        "The defaults of `--badm-sigma` / `--badm-rho` in `badm_fast/train/tasks.py` are the best cell of each table.",
        "",
    ]
    text = "\n".join(header + sections)
    if args.out and not args.no_write:
        with cli.atomic_open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
