"""BADM against SGD (momentum), Adam, AdamW and QHM with equal tuning budgets, selected on validation data.

For every task (``badm_fast/train/tasks.py``):

1. A fixed, seeded fraction of the training data is held out for validation (``Task.hold_out``;
   stratified by class where the targets are class labels). The test set is not touched.
2. Every optimizer gets the same budget: the same number of configurations over its main knobs
   (SGD, BADM: a learning-rate x momentum grid, BADM in its lr/momentum form; QHM: the same grid
   over its lr and beta with nu fixed; Adam, AdamW: as many learning rates). One run per
   configuration (seed 0), trained on the remaining training data, scored on validation data.
3. The configuration with the best final validation metric is selected (ties: the higher mean
   validation metric over the epochs, then the lower final training loss); diverged runs are not
   selectable.
4. The selected configuration trains again on fresh seeds (1..N: initial weights and data order;
   the split stays fixed), on the same reduced training set; per epoch the validation and the
   test metric are recorded. Reported: mean and sample standard deviation of the final test
   metric and of the final training loss, and steps, training CPU seconds and wall seconds until
   the validation metric first reaches the target.
5. BADM's per-sub-batch and merged forms: the comparison trains BADM in ``mode="merged"`` (one
   backward pass per batch); the same selected configuration also runs in the paper's
   per-sub-batch form on the same seeds, and (digits) with sub-batch weights that change between
   steps, where the two forms are no longer the same algorithm.

Commands::

    python bench/compare.py --out bench/train          # every task; bench/train/RESULTS.md and figures
    python bench/compare.py --tasks digits graph       # some tasks, the report printed only
    python bench/compare.py --tasks graph --budget 2 --seeds 2 --epochs 1   # a smoke test

Nothing is written without ``--out``. Runs go to ``--workers`` processes with ``--threads`` torch
threads each; training time is measured per run as process CPU seconds (robust to other jobs on a
shared machine) and as wall seconds, evaluation excluded.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

OPTIMIZERS = ("badm", "sgd", "adam", "adamw", "qhm")
LABELS = {"badm": "BADM", "sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "qhm": "QHM"}
METRIC_SHORT = {"test_accuracy": "accuracy", "test_bpc": "bits/char", "test_neg_elbo": "negative ELBO, nats"}
#: randomness inside the forward pass: the per-sub-batch form draws it once per sub-batch
STOCHASTIC = {"graph": "dropout", "generate": "the VAE's sampling noise"}

#: Per task: epochs, batch size (0 = full batch), --subset (None: all), validation fraction and the
#: three learning rates of the SGD/BADM/QHM grids (a factor 5 apart, centred on SGD's usual rate).
#: Sized so that the whole comparison (every task, 6 configurations, 5 seeds) runs in well under an
#: hour on 2 shared CPU cores.
PLANS = {
    "digits": dict(epochs=30, batch_size=32, subset=None, val_fraction=0.2, lrs=(0.01, 0.05, 0.25)),
    "fashion-mnist": dict(epochs=2, batch_size=64, subset=6000, val_fraction=0.2, lrs=(0.02, 0.1, 0.5)),
    "charlm": dict(epochs=4, batch_size=64, subset=4000, val_fraction=0.2, lrs=(0.1, 0.5, 2.5)),
    "graph": dict(epochs=100, batch_size=0, subset=None, val_fraction=0.25, lrs=(0.02, 0.1, 0.5)),
    "generate": dict(epochs=30, batch_size=32, subset=None, val_fraction=0.2, lrs=(0.002, 0.01, 0.05)),
}
MOMENTA = (0.5, 0.9)  # SGD's momentum, BADM's mu = rho/(rho+sigma), QHM's beta
ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
QHM_NU = 0.7  # QHM's recommended immediate discount (Ma & Yarats 2019), fixed
ADAMW_WEIGHT_DECAY = 0.01
SUB_BATCHES = 4
TARGET_SLACK = 0.02  # target: within 2% of the best validation metric of the tuning runs
TUNE_SEED = 0
SPLIT_SEED = 0
MAX_BUDGET = 6


# ---------------------------------------------------------------------------------------------
# Grids and the hyperparameter forms
# ---------------------------------------------------------------------------------------------


def badm_forms(lr: float, momentum: float) -> dict:
    """BADM(lr, momentum) in its other forms: rho/sigma, the QHM it equals (constant weights)
    and, for momentum 0.5 (rho = sigma), the plain SGD it equals (docs/algorithm.md)."""
    rho, sigma = momentum / lr, (1.0 - momentum) / lr
    forms = dict(lr=lr, momentum=momentum, rho=rho, sigma=sigma, qhm=dict(lr=1.0 / sigma, beta=momentum))
    forms["qhm"]["nu"] = 1.0 - sigma / rho if rho > 0 else -math.inf
    if abs(rho - sigma) <= 1e-12 * max(rho, sigma):
        forms["sgd"] = dict(lr=1.0 / sigma, momentum=0.0)
    return forms


def grid(name: str, lrs, budget: int = MAX_BUDGET) -> list[dict]:
    """The configurations of optimizer ``name``: ``budget`` of its 6 grid points, evenly spread.

    Each is ``{"hp": <make_optimizer's keywords>, "knobs": <the grid coordinates>}``.
    """
    configs = []
    if name in ("sgd", "badm", "qhm"):
        for lr in lrs:
            for m in MOMENTA:
                if name == "sgd":
                    configs.append(dict(hp=dict(lr=lr, momentum=m), knobs=dict(lr=lr, momentum=m)))
                elif name == "badm":
                    f = badm_forms(lr, m)
                    configs.append(dict(hp=dict(rho=f["rho"], sigma=f["sigma"]), knobs=dict(lr=lr, momentum=m)))
                else:  # QHM's steady step is its lr: lr/(1 - beta) matches SGD(lr, momentum=beta)
                    q = lr / (1.0 - m)
                    configs.append(dict(hp=dict(lr=q, beta=m, nu=QHM_NU), knobs=dict(lr=q, beta=m)))
    elif name in ("adam", "adamw"):
        for lr in ADAM_LRS:
            hp = dict(lr=lr) if name == "adam" else dict(lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
            configs.append(dict(hp=hp, knobs=dict(lr=lr)))
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    if not 1 <= budget <= len(configs):
        raise ValueError(f"budget must be in 1..{len(configs)}, got {budget}")
    if budget == len(configs):
        return configs
    picks = sorted({round(i * (len(configs) - 1) / max(budget - 1, 1)) for i in range(budget)})
    return [configs[i] for i in picks]


def fmt_hp(name: str, hp: dict) -> str:
    def g(x):
        return f"{x:.4g}"

    if name == "badm":
        f = badm_forms(*_badm_lr_momentum(hp))
        return f"lr={g(f['lr'])}, momentum={g(f['momentum'])} (rho={g(f['rho'])}, sigma={g(f['sigma'])})"
    return ", ".join(f"{k}={g(v)}" for k, v in hp.items())


def _badm_lr_momentum(hp: dict) -> tuple[float, float]:
    total = hp["rho"] + hp["sigma"]
    return 1.0 / total, hp["rho"] / total


def badm_equivalents(hp: dict) -> str:
    f = badm_forms(*_badm_lr_momentum(hp))
    q = f["qhm"]
    text = f"QHM(lr={q['lr']:.4g}, beta={q['beta']:.4g}, nu={q['nu']:.4g})"
    if "sgd" in f:
        text += f" = plain SGD(lr={f['sgd']['lr']:.4g}, momentum=0) (nu = 0)"
    return text


# ---------------------------------------------------------------------------------------------
# One run (in a worker process)
# ---------------------------------------------------------------------------------------------

_TASKS: dict = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def load_task(name: str, subset, val_fraction: float):
    """``(fit, val)`` of task ``name`` (cached per process): the split seeded by SPLIT_SEED."""
    key = (name, subset, val_fraction)
    if key not in _TASKS:
        from badm_fast.train import tasks

        task = tasks.get_task(name, seed=SPLIT_SEED, subset=subset)
        _TASKS[key] = task.hold_out(val_fraction, seed=SPLIT_SEED)
    return _TASKS[key]


def _random_weight_step(model, opt, loss_fn, inputs, targets, gen) -> float:
    """One BADM step whose sub-batch weights change from step to step: the sub-batch sizes times a
    factor drawn uniformly from [0.5, 1.5]. Per-sub-batch form: one gradient row per sub-batch and
    ``step(weights=...)``. Merged form: the same weighted mean gradient in the one row (the
    sub-batch backward passes accumulate into ``.grad``), one dual buffer."""
    from badm_fast import split_batch

    parts = split_batch(inputs, targets, opt.sub_batches)
    sizes = [ys.shape[0] for _, ys in parts]
    factors = (0.5 + torch.rand(len(parts), generator=gen, dtype=torch.float64)).tolist()
    weights = [n * f for n, f in zip(sizes, factors)]
    total_w = sum(weights)
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for s, (xs, ys) in enumerate(parts):
        if ys.shape[0] == 0:
            continue
        if opt.mode == "sub_batch":
            with opt.sub_batch(s):
                loss = loss_fn(model(*xs), ys)
                loss.backward()
        else:
            loss = loss_fn(model(*xs), ys)
            (loss * (weights[s] / total_w)).backward()
        loss_sum += loss.item() * ys.shape[0]
    if opt.mode == "sub_batch":
        opt.step(weights=weights)
    else:
        opt.step()
    return loss_sum / targets.shape[0]


def run_spec(spec: dict) -> dict:
    """Trains one configuration; returns the spec with its per-epoch record."""
    from badm_fast.train import cli

    fit, val = load_task(spec["task"], spec["subset"], spec["val_fraction"])
    seed, epochs, batch_size = spec["seed"], spec["epochs"], spec["batch_size"]
    torch.manual_seed(seed)
    model = fit.build_model()
    opt = cli.make_optimizer(spec["optimizer"], model.parameters(), spec["hp"], SUB_BATCHES, "auto", spec["mode"])
    torch.manual_seed(seed + 1)  # dropout and sampling noise
    gen = torch.Generator().manual_seed(seed + 777)  # the varying sub-batch weights (forms study)

    def evaluate() -> tuple[float, float | None]:
        model.eval()
        with torch.no_grad():
            v = val.evaluate(model)
            t = fit.evaluate(model) if spec["eval_test"] else None
        model.train()
        return v, t

    v0, t0_metric = evaluate()
    record = dict(spec, initial_val=v0, initial_test=t0_metric, epochs=[], diverged=False, error=None)
    cpu = wall = 0.0
    steps = 0
    for epoch in range(1, epochs + 1):
        batches = cli.epoch_batches(fit.n_train, batch_size, seed, epoch, spec.get("max_steps"))
        data = ((fit.train_inputs[b], fit.train_targets[b]) for b in batches)
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            if spec["weights"] == "random":
                model.train()
                total = count = 0
                for x, y in data:
                    loss = _random_weight_step(model, opt, fit.loss_fn, x, y, gen)
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss}")
                    total, count = total + loss * y.shape[0], count + y.shape[0]
                loss = total / max(count, 1)
            else:
                loss = cli.train_epoch(model, opt, fit.loss_fn, data)
        except FloatingPointError as e:
            record.update(diverged=True, error=str(e), diverged_at_epoch=epoch)
            break
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        steps += len(batches)
        v, t = evaluate()
        if not math.isfinite(v) or (t is not None and not math.isfinite(t)):
            record.update(diverged=True, error=f"metric became {v if not math.isfinite(v) else t}")
            record["diverged_at_epoch"] = epoch
            break
        record["epochs"].append(dict(epoch=epoch, steps=steps, train_loss=loss, val=v, test=t, cpu_s=cpu, wall_s=wall))
    record.update(cpu_s=cpu, wall_s=wall, steps=steps)
    return record


# ---------------------------------------------------------------------------------------------
# Selection, statistics and statements
# ---------------------------------------------------------------------------------------------


def _sign(higher: bool) -> float:
    return 1.0 if higher else -1.0


def selection_key(run: dict, higher: bool) -> tuple:
    """Larger is better: final validation metric, then mean validation metric, then -final train loss."""
    s = _sign(higher)
    vals = [e["val"] for e in run["epochs"]]
    return (s * vals[-1], s * statistics.mean(vals), -run["epochs"][-1]["train_loss"])


def select(runs: list[dict], higher: bool) -> dict | None:
    ok = [r for r in runs if not r["diverged"] and r["epochs"]]
    return max(ok, key=lambda r: selection_key(r, higher)) if ok else None


def mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def target_of(best_val: float, higher: bool) -> float:
    return best_val * (1.0 - TARGET_SLACK) if higher else best_val * (1.0 + TARGET_SLACK)


def time_to_target(run: dict, target: float, higher: bool) -> dict | None:
    """The first epoch whose validation metric reaches ``target``: its steps, CPU and wall seconds."""
    for e in run["epochs"]:
        if (e["val"] >= target) if higher else (e["val"] <= target):
            return dict(epoch=e["epoch"], steps=e["steps"], cpu_s=e["cpu_s"], wall_s=e["wall_s"])
    return None


def summarize_final(runs: list[dict], target: float, higher: bool) -> dict:
    ok = [r for r in runs if not r["diverged"] and r["epochs"]]
    hits = [time_to_target(r, target, higher) for r in ok]
    reached = [h for h in hits if h is not None]
    out = dict(
        seeds=[r["seed"] for r in runs],
        diverged=len(runs) - len(ok),
        test=mean_sd([r["epochs"][-1]["test"] for r in ok]),
        train_loss=mean_sd([r["epochs"][-1]["train_loss"] for r in ok]),
        val=mean_sd([r["epochs"][-1]["val"] for r in ok]),
        cpu_s=mean_sd([r["cpu_s"] for r in ok]),
        wall_s=mean_sd([r["wall_s"] for r in ok]),
        steps=ok[0]["steps"] if ok else None,
        reached=len(reached),
        target_steps=mean_sd([h["steps"] for h in reached]),
        target_cpu_s=mean_sd([h["cpu_s"] for h in reached]),
        target_wall_s=mean_sd([h["wall_s"] for h in reached]),
    )
    return out


def compare(a: tuple, b: tuple, higher: bool) -> int:
    """+1: ``a`` better than ``b`` by more than the sum of their standard deviations; -1: worse; 0: neither."""
    (ma, sa), (mb, sb) = a, b
    if ma is None or mb is None:
        return 0
    d = _sign(higher) * (ma - mb)
    if d > sa + sb:
        return 1
    if -d > sa + sb:
        return -1
    return 0


def statement(final: dict, higher: bool) -> tuple[str, str]:
    """``(verdict, sentence)`` of BADM against the other optimizers on the mean final test metric."""
    if "badm" not in final or final["badm"]["test"][0] is None:
        return "n/a", "BADM has no final result."
    others = [n for n in final if n != "badm" and final[n]["test"][0] is not None]
    beats = [n for n in others if compare(final["badm"]["test"], final[n]["test"], higher) > 0]
    loses = [n for n in others if compare(final["badm"]["test"], final[n]["test"], higher) < 0]
    ties = [n for n in others if n not in beats and n not in loses]

    def names(xs):
        return ", ".join(LABELS[x] for x in xs)

    parts = []
    if loses:
        verdict = "loses"
        parts.append(f"BADM loses to {names(loses)} (beyond the spread)")
    elif beats and not ties:
        verdict = "wins"
        parts.append(f"BADM wins against every other optimizer ({names(beats)}) beyond the spread")
    else:
        verdict = "no difference"
        parts.append("BADM is not beaten beyond the spread by any other optimizer")
    if beats and verdict != "wins":
        parts.append(f"better than {names(beats)} beyond the spread")
    if ties:
        parts.append(f"within the spread of {names(ties)}")
    return verdict, "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def curves_png(task_result: dict, path: Path) -> None:
    """Test metric and training loss against epochs, and test metric against training CPU seconds:
    the mean over the seeds of each selected configuration, with a band of +- one standard deviation."""
    import numpy as np

    from badm_fast.train.plotting import METRIC_LABELS, _figure

    fig = _figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    info = task_result["info"]
    for i, (name, runs) in enumerate(task_result["final_runs"].items()):
        ok = [r for r in runs if not r["diverged"] and r["epochs"]]
        if not ok:
            continue
        n = min(len(r["epochs"]) for r in ok)
        ep = np.arange(0, n + 1)
        test = np.array([[r["initial_test"]] + [e["test"] for e in r["epochs"][:n]] for r in ok])
        loss = np.array([[e["train_loss"] for e in r["epochs"][:n]] for r in ok])
        cpu = np.array([[0.0] + [e["cpu_s"] for e in r["epochs"][:n]] for r in ok])
        color = f"C{i}"
        label = f"{LABELS[name]} ({len(ok)} seeds)"
        for ax, x, y in ((axes[0], ep, test), (axes[1], ep[1:], loss), (axes[2], cpu.mean(0), test)):
            m, s = y.mean(0), y.std(0, ddof=1) if len(ok) > 1 else np.zeros(y.shape[1])
            ax.plot(x, m, color=color, label=label, linewidth=1.5)
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.2, linewidth=0)
    metric = METRIC_LABELS.get(info["metric"], info["metric"])
    step = "full-batch step" if info["batch_size"] == 0 else "epoch"
    axes[0].set(xlabel=step, ylabel=metric, title="test metric (mean +- sd over seeds)")
    axes[1].set(xlabel=step, ylabel="training loss", yscale="log", title="training loss")
    axes[2].set(xlabel="training CPU seconds (1 thread)", ylabel=metric, title="test metric against CPU time")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if info["higher_is_better"]:
        lo = min(min(e["test"] for e in r["epochs"]) for rs in task_result["final_runs"].values() for r in rs
                 if r["epochs"] and not r["diverged"])  # fmt: skip
        for ax in (axes[0], axes[2]):
            ax.set_ylim(max(lo - 0.05, 0.0), 1.0)
    axes[0].legend(loc="best")
    fig.suptitle(
        f"{info['task']}: selected configuration of each optimizer, seeds {info['seeds'][0]}..{info['seeds'][-1]} "
        f"({info['n_fit']} training / {info['n_val']} validation / {info['n_test']} test examples)"
    )
    fig.savefig(path, format="png", dpi=90)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(PLANS), choices=list(PLANS))
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--budget", type=int, default=MAX_BUDGET, help="configurations per optimizer and task (1..6)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the final runs (1..N; default 5)")
    p.add_argument("--epochs", type=int, default=None, help="override every task's epochs (smoke tests)")
    p.add_argument("--subset", type=int, default=None, help="override every task's --subset (smoke tests)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap the steps of an epoch (smoke tests)")
    p.add_argument("--no-forms", action="store_true", help="skip BADM's per-sub-batch / merged comparison")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--out", default=None, metavar="DIR", help="write RESULTS.md, results.json and figures here")
    p.add_argument("--from-json", default=None, metavar="PATH", help="render the report of an earlier results.json")
    return p


def _available(name: str) -> str | None:
    """None when task ``name`` can run here, else the reason it cannot."""
    import importlib

    from badm_fast.train import tasks

    cls = tasks.TASKS[name]
    for module in cls.requires:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"needs the Python module {module}, which cannot be imported"
    try:
        cls.check_available()
    except tasks.DatasetMissingError as e:
        return str(e)
    return None


def _map(specs: list[dict], pool, threads: int, log) -> list[dict]:
    """Runs ``specs`` (the most expensive first) in ``pool`` (None: in this process)."""
    if not specs:
        return []
    order = sorted(range(len(specs)), key=lambda i: -specs[i]["cost"])
    results: list = [None] * len(specs)
    t0 = time.perf_counter()

    def report(k, r):
        form = "" if r["mode"] == "merged" else " " + r["mode"]
        form += " random weights" if r["weights"] == "random" else ""
        end = "diverged" if r["diverged"] else f"val {r['epochs'][-1]['val']:.4f}"
        log(f"  [{k}/{len(specs)} {time.perf_counter() - t0:6.0f} s] {r['task']} {r['phase']} {r['optimizer']}{form} "
            f"{fmt_hp(r['optimizer'], r['hp'])} seed {r['seed']}: {end}, {r['cpu_s']:.1f} CPU s")  # fmt: skip

    if pool is None:
        torch.set_num_threads(threads)
        for k, i in enumerate(order, 1):
            results[i] = run_spec(specs[i])
            report(k, results[i])
        return results
    it = pool.imap_unordered(_indexed, [(i, specs[i]) for i in order])
    for k, (i, r) in enumerate(it, 1):
        results[i] = r
        report(k, r)
    return results


def _indexed(item):
    i, spec = item
    return i, run_spec(spec)


def _spec(task, plan, optimizer, hp, seed, phase, mode="merged", weights="size", eval_test=False, max_steps=None):
    if optimizer != "badm":
        mode = "merged"  # meaningless for the others; one label for all
    cost = plan["epochs"] * {"charlm": 30, "fashion-mnist": 60, "digits": 3, "generate": 1, "graph": 0.05}[task]
    cost *= 1.8 if (optimizer == "badm" and mode == "sub_batch") else 1.0
    return dict(task=task, epochs=plan["epochs"], batch_size=plan["batch_size"], subset=plan["subset"],
                val_fraction=plan["val_fraction"], optimizer=optimizer, hp=dict(hp), seed=seed, phase=phase,
                mode=mode, weights=weights, eval_test=eval_test, max_steps=max_steps, cost=cost)  # fmt: skip


def run(args, log=None) -> dict:
    """The whole comparison; returns the results dictionary (what results.json holds)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()
    plans, skipped = {}, {}
    for name in args.tasks:
        reason = _available(name)
        if reason is not None:
            skipped[name] = reason
            log(f"compare: {name} skipped: {reason}")
            continue
        plan = dict(PLANS[name])
        if args.epochs is not None:
            plan["epochs"] = args.epochs
        if args.subset is not None:
            plan["subset"] = args.subset
        plans[name] = plan
    ms = args.max_steps_per_epoch

    # 1. tuning: one run per configuration, scored on validation data
    tune_specs = [
        _spec(t, plan, n, c["hp"], TUNE_SEED, "tune", max_steps=ms)
        for t, plan in plans.items()
        for n in args.optimizers
        for c in grid(n, plan["lrs"], args.budget)
    ]
    log(f"compare: tuning, {len(tune_specs)} runs on {args.workers} worker(s)")
    pool = None
    if args.workers > 1:  # one pool for both phases: the workers import this file once, at the start
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.workers, initializer=_worker_init, initargs=(args.threads,))
    try:
        out = _run(args, log, pool, plans, skipped, tune_specs)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, reaped by join
    out["run"].update(
        wall_s=time.perf_counter() - t_wall,
        cpu_s=time.process_time() - t_cpu + children.ru_utime + children.ru_stime,
        loadavg_start=load0,
        loadavg_end=os.getloadavg(),
    )
    return out


def _run(args, log, pool, plans, skipped, tune_specs) -> dict:
    seeds = list(range(1, args.seeds + 1))
    budget = {n: len(grid(n, PLANS["digits"]["lrs"], args.budget)) for n in args.optimizers}
    ms = args.max_steps_per_epoch
    tuned = _map(tune_specs, pool, args.threads, log)

    from badm_fast.train import tasks as _tasks

    out: dict = dict(tasks={}, skipped=skipped)
    final_specs = []
    for t, plan in plans.items():
        cls = _tasks.TASKS[t]
        higher = cls.higher_is_better
        fit, val = load_task(t, plan["subset"], plan["val_fraction"])
        info = dict(task=t, metric=cls.metric, higher_is_better=higher, epochs=plan["epochs"],
                    batch_size=plan["batch_size"], subset=plan["subset"], val_fraction=plan["val_fraction"],
                    n_fit=int(fit.n_train), n_val=int(val.test_inputs.shape[0]), n_test=int(fit.test_inputs.shape[0]),
                    seeds=seeds, tune_seed=TUNE_SEED, lrs=list(plan["lrs"]), sub_batches=SUB_BATCHES)  # fmt: skip
        runs = {n: [r for r in tuned if r["task"] == t and r["optimizer"] == n] for n in args.optimizers}
        chosen = {n: select(rs, higher) for n, rs in runs.items()}
        vals = [e["val"] for rs in runs.values() for r in rs if not r["diverged"] for e in r["epochs"]]
        best_val = (max(vals) if higher else min(vals)) if vals else None
        info.update(best_val=best_val, target=None if best_val is None else target_of(best_val, higher))
        out["tasks"][t] = dict(info=info, tuning=runs, chosen={n: (c["hp"] if c else None) for n, c in chosen.items()})
        for n, c in chosen.items():
            if c is None:
                continue
            for s in seeds:
                final_specs.append(_spec(t, plan, n, c["hp"], s, "final", eval_test=True, max_steps=ms))
            if n == "badm" and not args.no_forms:
                for s in seeds:
                    final_specs.append(_spec(t, plan, n, c["hp"], s, "forms", mode="sub_batch", eval_test=True,
                                             max_steps=ms))  # fmt: skip
                    if t == "digits":
                        for mode in ("sub_batch", "merged"):
                            final_specs.append(_spec(t, plan, n, c["hp"], s, "forms", mode=mode, weights="random",
                                                     eval_test=True, max_steps=ms))  # fmt: skip

    # 2. the selected configurations on fresh seeds (and BADM's forms)
    log(f"compare: final runs, {len(final_specs)} runs")
    finals = _map(final_specs, pool, args.threads, log)
    for t, res in out["tasks"].items():
        info = res["info"]
        higher = info["higher_is_better"]
        target = info["target"]
        res["final_runs"] = {n: [r for r in finals if r["task"] == t and r["phase"] == "final" and r["optimizer"] == n]
                             for n in args.optimizers if res["chosen"][n] is not None}  # fmt: skip
        res["final"] = {n: summarize_final(rs, target, higher) for n, rs in res["final_runs"].items()}
        res["verdict"], res["statement"] = statement(res["final"], higher)
        forms = {}
        for key, mode, weights in (("sub_batch", "sub_batch", "size"), ("sub_batch_random", "sub_batch", "random"),
                                   ("merged_random", "merged", "random")):  # fmt: skip
            rs = [r for r in finals if r["task"] == t and r["phase"] == "forms" and r["mode"] == mode
                  and r["weights"] == weights]  # fmt: skip
            if rs:
                forms[key] = dict(runs=rs, summary=summarize_final(rs, target, higher))
        res["forms"] = forms
    out["run"] = dict(
        command="python bench/compare.py " + " ".join(args.argv), workers=args.workers,
        threads=args.threads, budget=budget, seeds=seeds, optimizers=list(args.optimizers),
        runs=len(tune_specs) + len(final_specs), torch=torch.__version__, platform=platform.platform(),
        machine=platform.machine(), cpus=os.cpu_count(),
        momenta=list(MOMENTA), adam_lrs=list(ADAM_LRS), qhm_nu=QHM_NU, adamw_weight_decay=ADAMW_WEIGHT_DECAY,
        target_slack=TARGET_SLACK,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _num(x, digits=4):
    if x is None:
        return "-"
    if digits >= 4 and x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 2, 1)}e}"
    return f"{x:.{digits}f}"


def _pm(ms, digits=4):
    m, s = ms
    return "-" if m is None else f"{_num(m, digits)} ± {_num(s, digits)}"


def _target_cell(f: dict, key: str, digits: int) -> str:
    n = len(f["seeds"]) - f["diverged"]
    if f["reached"] == 0:
        return f"not reached (0/{n})"
    return _pm(f[key], digits) + ("" if f["reached"] == n else f" ({f['reached']}/{n})")


def report(out: dict, figures: dict | None = None) -> str:
    r = out["run"]
    for res in out["tasks"].values():  # the statements follow from the summaries under the current rule
        res["verdict"], res["statement"] = statement(res["final"], res["info"]["higher_is_better"])
    lines = [
        "# badm-train results: equal tuning budgets, selection on validation data, several seeds",
        "",
        f"Command: `{r['command'].strip()}` — {r['runs']} training runs on {r['workers']} worker processes with "
        f"{r['threads']} torch thread each; **{r['wall_s'] / 60:.1f} min wall, {r['cpu_s'] / 60:.1f} CPU-min** (all "
        f"processes) on {r['cpus']} x {r['machine']} CPU cores shared with other jobs (load average "
        f"{r['loadavg_start'][0]:.1f} at the start, {r['loadavg_end'][0]:.1f} at the end), torch {r['torch']}. Every "
        "number below comes from this command's output (results.json next to this file).",
        "",
        "## How the numbers are made",
        "",
        "- **Validation split.** A fixed fraction of each task's training data (seeded permutation, seed "
        f"{SPLIT_SEED}, stratified by class for classification) is held out for validation; the test set is "
        "untouched. Tuning runs and final runs train on the remaining training data (the same reduced set for "
        "both); the test metric is used for nothing but the final tables.",
        f"- **Equal budget.** {', '.join(f'{LABELS[n]} {k}' for n, k in r['budget'].items())} configurations per "
        "task, one run each (seed 0), every optimizer from the same initial weights and data order:",
        f"  - SGD: lr in the task's three rates x momentum in {{{', '.join(f'{m:g}' for m in r['momenta'])}}}.",
        "  - BADM: the same (lr, momentum) grid in BADM's lr/momentum form: rho = momentum/lr, sigma = "
        "(1 - momentum)/lr, which matches SGD(lr, momentum)'s steady step (docs/algorithm.md).",
        f"  - QHM: beta in {{{', '.join(f'{m:g}' for m in r['momenta'])}}}, lr = (the task's rate)/(1 - beta) (the "
        f"same steady step), nu fixed at {r['qhm_nu']:g}.",
        f"  - Adam: lr in {{{', '.join(f'{x:g}' for x in r['adam_lrs'])}}}; AdamW the same with weight decay "
        f"{r['adamw_weight_decay']:g}.",
        "- **Selection.** The configuration with the best final validation metric (ties: the better mean "
        "validation metric over the epochs, then the lower final training loss); diverged runs are not selectable.",
        f"- **Final runs.** The selected configuration of every optimizer on seeds {r['seeds'][0]}..{r['seeds'][-1]} "
        "(fresh seeds: initial weights and data order; the split stays fixed). Reported: mean ± sample standard "
        "deviation over the seeds of the final test metric and the final training loss.",
        f"- **Time to target.** Target: within {100 * r['target_slack']:g}% of the best validation metric that any "
        f"optimizer reached in any tuning run at any epoch ({100 * (1 - r['target_slack']):g}% of it for "
        f"accuracies, {100 * (1 + r['target_slack']):g}% of it for bits per character and negative ELBO, where lower "
        "is better). Measured on the validation metric of the final runs, evaluated after every epoch (the "
        "resolution: one epoch; one step on the full-batch graph task): optimizer steps, training CPU seconds "
        "and wall seconds until the first epoch that reaches it; (k/N) when only k of N seeds reach it.",
        "- **Statement rule.** BADM *wins* against an optimizer when its mean final test metric is better by more "
        "than the sum of the two standard deviations, *loses* when it is worse by more than that, otherwise there "
        "is no difference beyond the spread. Per task: *loses* if some optimizer beats it, *wins* if it beats all, "
        "else *no difference*.",
        "- **Time.** Training only (evaluation excluded), CPU seconds of the worker process (1 torch thread: "
        "robust to the other jobs on the shared cores) and wall seconds (include waiting for the cores).",
        '- **BADM\'s form.** BADM trains in `mode="merged"` (one backward pass per batch, one dual buffer): with '
        "constant sub-batch weights it is the same algorithm as the paper's per-sub-batch form (section 'The "
        "per-sub-batch and merged forms'), at SGD's cost.",
    ]
    if out["skipped"]:
        lines += ["", "Skipped tasks:", ""]
        lines += [f"- {t}: {why}" for t, why in out["skipped"].items()]
    lines += ["", "## Summary", "", summary_table(out), ""]
    for t, res in out["tasks"].items():
        lines += task_section(t, res, (figures or {}).get(t))
    lines += forms_section(out)
    return "\n".join(lines) + "\n"


def summary_table(out: dict) -> str:
    names = out["run"]["optimizers"]
    head = "| task | metric | " + " | ".join(LABELS[n] for n in names) + " | BADM |"
    lines = [head, "|---|---|" + "---:|" * len(names) + "---|"]
    for t, res in out["tasks"].items():
        info = res["info"]
        arrow = "higher is better" if info["higher_is_better"] else "lower is better"
        row = [f"{t} ({info['epochs']} {'steps' if info['batch_size'] == 0 else 'epochs'})",
               f"test {_short(info['metric'])} ({arrow})"]  # fmt: skip
        cells = []
        for n in names:
            f = res["final"].get(n)
            cells.append("-" if f is None else _pm(f["test"], 4 if abs(f["test"][0] or 0) < 10 else 2))
        lines.append("| " + " | ".join(row + cells) + f" | {res['verdict']} |")
    return "\n".join(lines)


def task_section(t: str, res: dict, figure: str | None) -> list[str]:
    info = res["info"]
    higher = info["higher_is_better"]
    big = abs(info["best_val"] or 0) >= 10
    d = 2 if big else 4
    arrow = "higher is better" if higher else "lower is better"
    lines = [
        f"## {t}",
        "",
        f"{info['epochs']} {'full-batch steps' if info['batch_size'] == 0 else 'epochs'}, "
        + (f"batch {info['batch_size']}, " if info["batch_size"] else "")
        + (f"--subset {info['subset']}, " if info["subset"] else "")
        + f"{info['n_fit']} training / {info['n_val']} validation ({100 * info['val_fraction']:g}% held out) / "
        f"{info['n_test']} test examples; metric {info['metric']} ({arrow}); SGD/BADM/QHM rates "
        f"{', '.join(f'{x:g}' for x in info['lrs'])}. Target: {_num(info['target'], d)} "
        f"(best validation metric of the tuning runs {_num(info['best_val'], d)}).",
        "",
        "Tuning (seed 0, final validation metric per configuration; the selected one in bold, 'div.' = diverged):",
        "",
        "| optimizer | configurations: final validation metric |",
        "|---|---|",
    ]
    for n, runs in res["tuning"].items():
        chosen = res["chosen"][n]
        cells = []
        for r in runs:
            v = "div." if r["diverged"] else _num(r["epochs"][-1]["val"], d)
            cell = f"{_knobs(n, r['hp'])}: {v}"
            cells.append(f"**{cell}**" if chosen is not None and r["hp"] == chosen else cell)
        lines.append(f"| {LABELS[n]} | " + "; ".join(cells) + " |")
    lines += [
        "",
        "Selected configurations on seeds "
        f"{info['seeds'][0]}..{info['seeds'][-1]} (mean ± sd; CPU and wall seconds of training):",
        "",
        f"| optimizer | selected | final test {_short(info['metric'])} | final train loss | steps to "
        "target | CPU s to target | wall s to target | train CPU s | train wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, f in res["final"].items():
        hp = fmt_hp(n, res["chosen"][n])
        if f["diverged"]:
            hp += f" ({f['diverged']} of {len(f['seeds'])} seeds diverged)"
        lines.append(
            f"| {LABELS[n]} | {hp} | {_pm(f['test'], d)} | {_pm(f['train_loss'])} | "
            f"{_target_cell(f, 'target_steps', 0)} | {_target_cell(f, 'target_cpu_s', 1)} | "
            f"{_target_cell(f, 'target_wall_s', 1)} | {_pm(f['cpu_s'], 1)}"
            f" | {_pm(f['wall_s'], 1)} |"
        )
    if res["chosen"].get("badm") is not None:
        lines += ["", f"BADM's selection {fmt_hp('badm', res['chosen']['badm'])} is, with constant sub-batch "
                  f"weights, exactly {badm_equivalents(res['chosen']['badm'])}."]  # fmt: skip
    head = {"wins": "BADM wins", "loses": "BADM loses", "no difference": "no difference beyond the spread"}
    lines += ["", f"**{t}: {head.get(res['verdict'], res['verdict'])}.** {res['statement']}"]
    if info["metric"] == "test_accuracy":
        best = max((n for n in res["final"] if n != "badm" and res["final"][n]["test"][0] is not None),
                   key=lambda n: res["final"][n]["test"][0], default=None)  # fmt: skip
        if best is not None and res["final"].get("badm"):
            gap = (res["final"]["badm"]["test"][0] - res["final"][best]["test"][0]) * info["n_test"]
            lines[-1] += (f" BADM's mean minus the best other mean ({LABELS[best]}): {gap:+.1f} of "
                          f"{info['n_test']} test examples.")  # fmt: skip
    ties = {n: sum(1 for r in rs if not r["diverged"] and r["epochs"] and res["chosen"][n] is not None
                   and r["epochs"][-1]["val"] == _final_val(res, n)) for n, rs in res["tuning"].items()}  # fmt: skip
    if any(k > 1 for k in ties.values()):
        lines += ["", "Configurations tied at the best final validation metric (the tie-breaks chose among them): "
                  + ", ".join(f"{LABELS[n]} {k}" for n, k in ties.items()) + "."]  # fmt: skip
    lines += [""]
    if figure:
        lines += [f"![{t}: mean and +- one standard deviation over the seeds]({figure})", ""]
    return lines


def _final_val(res: dict, name: str):
    for r in res["tuning"][name]:
        if r["hp"] == res["chosen"][name]:
            return r["epochs"][-1]["val"]
    return None


def _form_diffs(res: dict) -> tuple[float | None, float | None]:
    """Largest |test metric difference| between the per-sub-batch and the merged run of the same seed: over
    every epoch, and at the final epoch."""
    merged = {r["seed"]: r for r in res.get("final_runs", {}).get("badm", [])}
    every, final = [], []
    for r in res["forms"].get("sub_batch", {}).get("runs", []):
        m = merged.get(r["seed"])
        if m is None or r["diverged"] or m["diverged"]:
            continue
        every += [abs(a["test"] - b["test"]) for a, b in zip(r["epochs"], m["epochs"])]
        final.append(abs(r["epochs"][-1]["test"] - m["epochs"][-1]["test"]))
    return max(every, default=None), max(final, default=None)


def _knobs(name: str, hp: dict) -> str:
    if name == "badm":
        lr, m = _badm_lr_momentum(hp)
        return f"lr {lr:.3g}, mom. {m:.3g}"
    if name == "sgd":
        return f"lr {hp['lr']:.3g}, mom. {hp['momentum']:.3g}"
    if name == "qhm":
        return f"lr {hp['lr']:.3g}, beta {hp['beta']:.3g}"
    return f"lr {hp['lr']:.3g}"


def forms_section(out: dict) -> list[str]:
    rows = [(t, res) for t, res in out["tasks"].items() if res.get("forms")]
    if not rows:
        return []
    lines = [
        "## The per-sub-batch and merged forms",
        "",
        "With sub-batch weights that stay the same from step to step, BADM's per-sub-batch form (the paper's: "
        f"{SUB_BATCHES} sub-batches, one backward pass and one dual per sub-batch) and the merged form (one backward "
        "pass over the batch, one dual) are the same recursion: the aggregated dual and the weights depend on the "
        "sub-batches only through their weighted mean gradient, and that recursion is QHM (docs/algorithm.md, "
        "'S-independence and the QHM identity'). The tables above therefore have one BADM row, trained in the "
        "merged form. The same selected configuration in the per-sub-batch form, on the same seeds:",
        "",
        "| task | form | final test metric | final train loss | train CPU s | largest difference of the test metric "
        "from merged (same seed), any epoch | the same, final epoch | what differs between the forms |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for t, res in rows:
        f = res["forms"]
        big = abs(res["info"]["best_val"] or 0) >= 10
        d = 2 if big else 4
        m = res["final"]["badm"]
        lines.append(f"| {t} | merged | {_pm(m['test'], d)} | {_pm(m['train_loss'])} | {_pm(m['cpu_s'], 1)} | | | |")
        if "sub_batch" in f:
            s = f["sub_batch"]["summary"]
            lines.append(
                f"| {t} | per-sub-batch | {_pm(s['test'], d)} | {_pm(s['train_loss'])} | {_pm(s['cpu_s'], 1)} | "
                f"{_num(_form_diffs(res)[0])} | {_num(_form_diffs(res)[1])} | {_differs(res['info'])} |"
            )
    lines += [
        "",
        "The last column says what separates the two rows besides rounding (the summation order differs): a "
        "training set that does not fill its last batch gives that one step of every epoch sub-batches of unequal "
        "sizes, so weights that differ from the other steps' (the merged form has no per-sub-batch weights to "
        "change); a model with randomness in its forward pass draws it once per sub-batch in the per-sub-batch "
        "form and once per batch in the merged one (the same algorithm on other random draws). Rounding "
        "differences grow over the steps of a chaotic training run, so the rows agree closely but not to the bit.",
        "",
    ]
    digits = out["tasks"].get("digits", {}).get("forms", {})
    if "sub_batch_random" in digits:
        a, b = digits["sub_batch_random"]["summary"], digits["merged_random"]["summary"]
        m = out["tasks"]["digits"]["final"]["badm"]
        info = out["tasks"]["digits"]["info"]
        hi, n_test = info["higher_is_better"], info["n_test"]
        lines += [
            "Weights that change between steps (digits, BADM's selected configuration): every step the sub-batch "
            "weights are the sub-batch sizes times a factor drawn uniformly from [0.5, 1.5]. The per-sub-batch form "
            "aggregates the old duals with the new weights, so it is no longer the merged recursion on the "
            'weighted mean gradient (which `mode="merged"` refuses to pretend: it requires constant weights); '
            "the merged row here feeds the same weighted mean gradient into the one dual.",
            "",
            "| digits, varying weights | final test accuracy | final train loss | steps to target | train CPU s |",
            "|---|---:|---:|---:|---:|",
            f"| per-sub-batch | {_pm(a['test'])} | {_pm(a['train_loss'])} | {_target_cell(a, 'target_steps', 0)} | "
            f"{_pm(a['cpu_s'], 1)} |",
            f"| merged on the weighted gradient | {_pm(b['test'])} | {_pm(b['train_loss'])} | "
            f"{_target_cell(b, 'target_steps', 0)} | {_pm(b['cpu_s'], 1)} |",
            f"| (constant weights, from the table above) | {_pm(m['test'])} | {_pm(m['train_loss'])} | "
            f"{_target_cell(m, 'target_steps', 0)} | {_pm(m['cpu_s'], 1)} |",
            "",
            f"Per-sub-batch against merged with varying weights: {_verdict_words(compare(a['test'], b['test'], hi))} "
            f"in test accuracy by the sum-of-standard-deviations rule (means "
            f"{(a['test'][0] - b['test'][0]) * n_test:+.1f} of {n_test} test images apart); training loss "
            f"{_num(a['train_loss'][0])} against "
            f"{_num(b['train_loss'][0])}; steps to the target {_num(a['target_steps'][0], 0)} against "
            f"{_num(b['target_steps'][0], 0)}.",
            "",
        ]
    return lines


def _differs(info: dict) -> str:
    why = []
    n, b = info["n_fit"], info["batch_size"]
    if b > 0 and n % b:
        last = n % b
        sizes = [len(c) for c in torch.arange(last).tensor_split(info["sub_batches"])]
        why.append(f"last batch of an epoch {last} examples (sub-batches {'/'.join(map(str, sizes))})")
    elif b > 0 and b % info["sub_batches"]:
        why.append(f"batch {b} not a multiple of {info['sub_batches']}: unequal but constant weights")
    if info["task"] in STOCHASTIC:
        why.append(STOCHASTIC[info["task"]] + " drawn per sub-batch")
    return "; ".join(why) or "nothing: the same weights at every step"


def _short(metric: str) -> str:
    return METRIC_SHORT.get(metric, metric.removeprefix("test_"))


def _verdict_words(c: int) -> str:
    return {1: "better beyond the spread", -1: "worse beyond the spread", 0: "no difference beyond the spread"}[c]


def readme_table(out: dict) -> str:
    """The results table of README.md."""
    names = out["run"]["optimizers"]
    lines = ["| task | metric | " + " | ".join(LABELS[n] for n in names) + " | BADM |",
             "|---|---|" + "---:|" * len(names) + "---|"]  # fmt: skip
    for t, res in out["tasks"].items():
        info = res["info"]
        big = abs(info["best_val"] or 0) >= 10
        arrow = "↑" if info["higher_is_better"] else "↓"
        cells = []
        for n in names:
            f = res["final"].get(n)
            cells.append("-" if f is None else _pm(f["test"], 2 if big else 3))
        lines.append(f"| {t} | test {_short(info['metric'])} {arrow} | " + " | ".join(cells)
                     + f" | {res['verdict']} |")  # fmt: skip
    lines += ["", "| task | target (validation) | " + " | ".join(f"{LABELS[n]} steps / CPU s" for n in names) + " |",
              "|---|---:|" + "---:|" * len(names)]  # fmt: skip
    for t, res in out["tasks"].items():
        info = res["info"]
        d = 2 if abs(info["best_val"] or 0) >= 10 else 3
        cells = []
        for n in names:
            f = res["final"].get(n)
            if f is None or f["reached"] == 0:
                cells.append("not reached")
                continue
            n_ok = len(f["seeds"]) - f["diverged"]
            part = "" if f["reached"] == n_ok else f" ({f['reached']}/{n_ok})"
            cells.append(f"{f['target_steps'][0]:.0f} / {f['target_cpu_s'][0]:.1f}{part}")
        lines.append(f"| {t} | {_num(info['target'], d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _strip(out: dict) -> dict:
    """results.json: everything, the spec bookkeeping (cost) dropped."""
    out = copy.deepcopy(out)
    for res in out["tasks"].values():
        for runs in list(res["tuning"].values()) + list(res.get("final_runs", {}).values()):
            for r in runs:
                r.pop("cost", None)
        for f in res.get("forms", {}).values():
            if isinstance(f, dict):
                for r in f.get("runs", []):
                    r.pop("cost", None)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = argv
    if not 1 <= args.budget <= MAX_BUDGET:
        p.error(f"--budget must be in 1..{MAX_BUDGET}")
    if args.seeds < 1 or args.workers < 1 or args.threads < 1:
        p.error("--seeds, --workers and --threads must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    out_dir = Path(args.out) if args.out else None
    if args.from_json:
        with open(args.from_json) as f:
            out = json.load(f)
    else:
        out = run(args)
    figures = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for t, res in out["tasks"].items():
            (out_dir / t).mkdir(exist_ok=True)
            curves_png(res, out_dir / t / "curves.png")
            figures[t] = f"{t}/curves.png"
    text = report(out, figures)
    print(text)
    print("README table:\n\n" + readme_table(out))
    if out_dir is not None:
        from badm_fast.train.cli import atomic_open

        with atomic_open(out_dir / "results.json", "w") as f:
            json.dump(_strip(out), f, separators=(",", ":"))
        with atomic_open(out_dir / "RESULTS.md", "w") as f:
            f.write(text)
        with atomic_open(out_dir / "readme_table.md", "w") as f:
            f.write(readme_table(out) + "\n")
        print(f"wrote {out_dir / 'RESULTS.md'}, {out_dir / 'results.json'}, {out_dir / 'readme_table.md'} and "
              f"{', '.join(str(out_dir / v) for v in figures.values())}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
