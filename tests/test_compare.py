"""bench/compare.py: the tuned comparison (validation split, equal budgets, seeds, time to target).

The smoke test runs the real command with a tiny budget (graph and a digits subset, 2
configurations per optimizer, 2 seeds, 1 epoch) in well under a minute.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import compare  # noqa: E402

from badm_fast.train import tasks  # noqa: E402


def _files_under(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if "__pycache__" not in p.parts}


def test_equal_budget_and_grids():
    lrs = compare.PLANS["digits"]["lrs"]
    sizes = {n: len(compare.grid(n, lrs)) for n in compare.OPTIMIZERS}
    assert set(sizes.values()) == {compare.MAX_BUDGET}
    for k in range(1, compare.MAX_BUDGET + 1):
        assert {len(compare.grid(n, lrs, k)) for n in compare.OPTIMIZERS} == {k}
    # BADM's grid is SGD's (lr, momentum) grid in BADM's lr/momentum form
    for b, s in zip(compare.grid("badm", lrs), compare.grid("sgd", lrs)):
        assert b["knobs"] == s["knobs"]
        lr, m = b["knobs"]["lr"], b["knobs"]["momentum"]
        assert b["hp"]["rho"] == pytest.approx(m / lr) and b["hp"]["sigma"] == pytest.approx((1 - m) / lr)
    with pytest.raises(ValueError):
        compare.grid("sgd", lrs, 7)


def test_badm_forms_match_the_qhm_identity():
    f = compare.badm_forms(0.25, 0.5)  # rho = sigma = 2: plain SGD with lr 0.5
    assert (f["rho"], f["sigma"]) == (2.0, 2.0)
    assert f["qhm"] == dict(lr=0.5, beta=0.5, nu=0.0)
    assert f["sgd"] == dict(lr=0.5, momentum=0.0)
    f = compare.badm_forms(0.1, 0.9)
    assert f["qhm"]["lr"] == pytest.approx(1.0) and f["qhm"]["nu"] == pytest.approx(1 - 1 / 9)
    assert "sgd" not in f


def test_hold_out_leaves_the_test_set_and_is_fixed():
    pytest.importorskip("sklearn")
    a = tasks.get_task("digits", seed=0, subset=300)
    fit, val = a.hold_out(0.2, seed=0)
    assert torch.equal(fit.test_inputs, a.test_inputs) and torch.equal(fit.test_targets, a.test_targets)
    assert fit.n_train + val.test_inputs.shape[0] == a.n_train
    assert torch.equal(fit.train_inputs, val.train_inputs)
    # no validation example is a training example
    rows = {tuple(x.flatten().tolist()) for x in fit.train_inputs}
    assert not any(tuple(x.flatten().tolist()) in rows for x in val.test_inputs[:20])
    # stratified: every class is in the validation set
    assert set(val.test_targets.tolist()) == set(a.train_targets.tolist())
    fit2, val2 = a.hold_out(0.2, seed=0)
    assert torch.equal(val.test_inputs, val2.test_inputs)
    with pytest.raises(ValueError):
        a.hold_out(1.0)


def test_selection_target_and_statements():
    def run(vals, loss=1.0, diverged=False):
        return dict(diverged=diverged, epochs=[dict(val=v, train_loss=loss) for v in vals])

    runs = [run([0.5, 0.9]), run([0.8, 0.9]), run([0.1, 0.95], diverged=True), run([0.2, 0.7])]
    assert compare.select(runs, True) is runs[1]  # tie on the final metric: the better mean
    assert compare.select(runs, False) is runs[3]
    assert compare.select([run([1.0], diverged=True)], True) is None
    assert compare.target_of(1.0, True) == pytest.approx(0.98)
    assert compare.target_of(2.0, False) == pytest.approx(2.04)
    r = dict(epochs=[dict(epoch=1, steps=10, val=2.5, cpu_s=1.0, wall_s=2.0),
                     dict(epoch=2, steps=20, val=2.0, cpu_s=2.0, wall_s=4.0)])  # fmt: skip
    assert compare.time_to_target(r, 2.04, False)["steps"] == 20
    assert compare.time_to_target(r, 1.9, False) is None
    final = {"badm": dict(test=(0.9, 0.01)), "sgd": dict(test=(0.95, 0.01)), "adam": dict(test=(0.905, 0.01))}
    verdict, text = compare.statement(final, True)
    assert verdict == "loses" and "SGD" in text
    final = {"badm": dict(test=(0.99, 0.001)), "sgd": dict(test=(0.95, 0.01))}
    assert compare.statement(final, True)[0] == "wins"
    assert compare.statement(final, False)[0] == "loses"
    final = {"badm": dict(test=(0.95, 0.02)), "sgd": dict(test=(0.96, 0.01))}
    assert compare.statement(final, True)[0] == "no difference"


def test_smoke_command_selects_on_validation_and_writes_only_to_out(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("networkx")
    pytest.importorskip("matplotlib")
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    monkeypatch.chdir(work)
    repo = Path(BENCH_DIR).parent
    before = _files_under(work), _files_under(repo / "bench")
    argv = ["--tasks", "graph", "digits", "--budget", "2", "--seeds", "2", "--epochs", "1", "--subset", "160",
            "--workers", "1", "--out", str(out)]  # fmt: skip
    assert compare.main(argv) == 0
    assert (_files_under(work), _files_under(repo / "bench")) == before  # nothing written outside --out
    printed = capsys.readouterr().out
    assert "# badm-train results" in printed and "README table" in printed
    for name in ("RESULTS.md", "results.json", "readme_table.md", "graph/curves.png", "digits/curves.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["budget"] == {n: 2 for n in compare.OPTIMIZERS}
    assert res["run"]["wall_s"] > 0 and res["run"]["cpu_s"] > 0
    text = (out / "RESULTS.md").read_text()
    for t in ("graph", "digits"):
        r = res["tasks"][t]
        higher = r["info"]["higher_is_better"]
        assert r["info"]["n_val"] > 0 and r["info"]["n_fit"] + r["info"]["n_val"] <= 160
        for n in compare.OPTIMIZERS:
            runs = r["tuning"][n]
            assert len(runs) == 2 and all(x["seed"] == compare.TUNE_SEED and x["phase"] == "tune" for x in runs)
            assert all(e["test"] is None for x in runs for e in x["epochs"])  # tuning never looks at the test set
            ok = [x for x in runs if not x["diverged"]]
            if not ok:
                continue
            best = max(ok, key=lambda x: compare.selection_key(x, higher))
            assert r["chosen"][n] == best["hp"]  # the argmax of the recorded validation metrics
            finals = r["final_runs"][n]
            assert [x["seed"] for x in finals] == [1, 2] and all(x["hp"] == best["hp"] for x in finals)
            f = r["final"][n]
            tests = [x["epochs"][-1]["test"] for x in finals if not x["diverged"]]
            assert f["test"][0] == pytest.approx(sum(tests) / len(tests))
            assert all(math.isfinite(v) for v in tests)
        assert r["verdict"] in ("wins", "loses", "no difference")
        head = {"wins": "BADM wins", "loses": "BADM loses", "no difference": "no difference beyond the spread"}
        assert f"## {t}" in text and f"**{t}: {head[r['verdict']]}.**" in text
        assert "sub_batch" in r["forms"]
    assert "sub_batch_random" in res["tasks"]["digits"]["forms"]
    assert "The per-sub-batch and merged forms" in text
    # the report renders again from results.json alone
    capsys.readouterr()
    assert compare.main(["--from-json", str(out / "results.json")]) == 0
    assert capsys.readouterr().out.startswith("# badm-train results")


def test_unavailable_task_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(tasks.FashionMNISTTask, "root", "/nonexistent/fashion-mnist")
    reason = compare._available("fashion-mnist")
    assert reason is not None and "dataset-fashion-mnist" in reason
