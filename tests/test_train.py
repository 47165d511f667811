"""The main job ``badm-train``: smoke runs of every task, outputs, refusals, QHM, data helpers."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

import badm_fast
from badm_fast.train import cli, tasks
from badm_fast.train.qhm import QHM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# task -> tiny budget (arguments of badm-train); every optimizer in the list must lower its loss
SMOKE = {
    "digits": (["--subset", "256", "--batch-size", "32", "--epochs", "2"], "badm,sgd,adam"),
    "fashion-mnist": (["--subset", "384", "--batch-size", "32", "--epochs", "2"], "badm,adam"),
    "charlm": (["--subset", "96", "--batch-size", "16", "--epochs", "2", "--max-steps-per-epoch", "6"], "badm,adam"),
    "graph": (["--epochs", "40"], "badm,sgd,qhm"),
    "generate": (["--subset", "256", "--batch-size", "32", "--epochs", "2"], "badm,adamw"),
}


def run_job(tmp_path, *argv):
    out = tmp_path / "run"
    code = cli.main([*argv, "--out", str(out), "--quiet", "--threads", "2"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("task", list(SMOKE))
def test_smoke_every_task(task, tmp_path, capsys):
    extra, optimizers = SMOKE[task]
    if task == "fashion-mnist" and not (tasks.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    out, res = run_job(tmp_path, "--task", task, "--optimizers", optimizers, *extra)

    assert set(res) >= {"config", "versions", "data", "metric", "optimizers"}
    assert res["config"]["task"] == task
    assert res["config"]["optimizers"] == optimizers.split(",")
    assert set(res["versions"]) >= {"torch", "numpy", "badm_fast", "platform", "python"}
    assert res["versions"]["torch"] == torch.__version__
    assert res["versions"]["badm_fast"] == badm_fast.__version__
    assert res["metric"]["name"] == tasks.TASKS[task].metric
    assert list(res["optimizers"]) == optimizers.split(",")
    epochs = int(extra[extra.index("--epochs") + 1])
    initial = {run["initial_metric"] for run in res["optimizers"].values()}
    assert len(initial) == 1, "every optimizer must start from the same weights"
    for name, run in res["optimizers"].items():
        assert set(run) >= {"hyperparameters", "epochs", "final_train_loss", "final_metric", "best_metric", "time_s"}
        assert run["diverged"] is False
        assert [e["epoch"] for e in run["epochs"]] == list(range(1, epochs + 1))
        for e in run["epochs"]:
            assert set(e) == {"epoch", "train_loss", "test_metric", "time_s", "cpu_s"}
            assert e["cpu_s"] >= 0
            assert math.isfinite(e["train_loss"]) and math.isfinite(e["test_metric"])
        times = [e["time_s"] for e in run["epochs"]]
        assert all(b >= a for a, b in zip(times, times[1:])), "wall time is cumulative"
        first, last = run["epochs"][0]["train_loss"], run["epochs"][-1]["train_loss"]
        assert last < first, f"{task}/{name}: training loss did not fall ({first} -> {last})"
        assert run["final_metric"] == run["epochs"][-1]["test_metric"]
    assert res["optimizers"]["badm"]["hyperparameters"] == {
        "rho": tasks.TASKS[task].defaults["badm_rho"],
        "sigma": tasks.TASKS[task].defaults["badm_sigma"],
    }
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    if task == "generate":
        assert (out / "samples.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    table = capsys.readouterr().out
    for name in res["optimizers"]:
        assert f"| {name} |" in table


def test_same_weights_and_data_order_badm_tracks_its_qhm(tmp_path):
    # With equal sub-batch weights BADM(rho, sigma) is QHM(1/sigma, rho/(rho+sigma), 1 - sigma/rho)
    # (docs/algorithm.md). The job gives both the same initial weights and the same batches, so
    # their training losses must agree to rounding; a different init or order would not.
    sigma, rho = 4.0, 12.0
    out, res = run_job(
        tmp_path, "--task", "digits", "--optimizers", "badm,qhm", "--subset", "256", "--batch-size", "32",
        "--epochs", "3", "--badm-sigma", str(sigma), "--badm-rho", str(rho), "--qhm-lr", str(1 / sigma),
        "--qhm-beta", str(rho / (rho + sigma)), "--qhm-nu", str(1 - sigma / rho),
    )  # fmt: skip
    b, q = res["optimizers"]["badm"]["epochs"], res["optimizers"]["qhm"]["epochs"]
    for eb, eq in zip(b, q):
        assert eb["train_loss"] == pytest.approx(eq["train_loss"], rel=1e-4)


def test_a_divergent_optimizer_is_recorded_and_the_others_run(tmp_path, capsys):
    out, res = run_job(
        tmp_path, "--task", "digits", "--optimizers", "sgd,badm", "--subset", "128", "--batch-size", "32",
        "--epochs", "2", "--sgd-lr", "1e4",
    )  # fmt: skip
    sgd, badm = res["optimizers"]["sgd"], res["optimizers"]["badm"]
    assert sgd["diverged"] and sgd["diverged_at_epoch"] == 1 and sgd["final_metric"] is None
    assert "lower the learning rate" in sgd["error"]
    assert not badm["diverged"] and len(badm["epochs"]) == 2
    captured = capsys.readouterr()
    assert "sgd diverged in epoch 1" in captured.err
    assert "| sgd | diverged in epoch 1 |" in captured.out
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_existing_out_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    argv = ["--task", "graph", "--optimizers", "sgd", "--epochs", "1", "--out", str(out), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert cli.main([*argv, "--overwrite"]) == 0
    assert (out / "results.json").is_file() and (out / "keep.txt").read_text() == "old"


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BADM_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(tasks.DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        tasks.load_fashion_mnist()
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--task", "fashion-mnist", "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "dataset-fashion-mnist" in err and "train-images-idx3-ubyte.gz" in err
    assert not out.exists(), "nothing is written when the data are missing"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizers", "badm,lion"], "unknown lion"),
        (["--optimizers", "sgd,sgd"], "names an optimizer twice"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--sub-batches", "0"], "--sub-batches must be >= 1"),
        (["--batch-size", "2"], "smaller than --sub-batches"),
        (["--badm-sigma", "0"], "--badm-sigma must be > 0"),
        (["--badm-rho", "-1"], "--badm-rho must be >= 0"),
        (["--task", "mnist"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_epoch_batches_are_seeded_permutations():
    a = cli.epoch_batches(103, 10, seed=3, epoch=1)
    assert [len(b) for b in a] == [10] * 10 + [3]
    assert torch.equal(torch.cat(a).sort().values, torch.arange(103))
    assert all(torch.equal(x, y) for x, y in zip(a, cli.epoch_batches(103, 10, seed=3, epoch=1)))
    assert not torch.equal(torch.cat(a), torch.cat(cli.epoch_batches(103, 10, seed=3, epoch=2)))
    assert not torch.equal(torch.cat(a), torch.cat(cli.epoch_batches(103, 10, seed=4, epoch=1)))
    assert [len(b) for b in cli.epoch_batches(103, 0, seed=3, epoch=1)] == [103]
    assert len(cli.epoch_batches(103, 10, seed=3, epoch=1, max_steps=4)) == 4


def test_atomic_open_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "results.json"
    with cli.atomic_open(path, "w") as f:
        f.write("first")
    with pytest.raises(RuntimeError, match="boom"):
        with cli.atomic_open(path, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_read_idx_round_trip_and_bad_magic(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    good = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(tasks.read_idx(good), images)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="bad magic number"):
        tasks.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(header + images.tobytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        tasks.read_idx(short)


def test_gcn_adjacency_is_symmetric_normalised():
    edges = torch.tensor([[0, 1], [1, 2]])
    a = tasks.normalized_adjacency(3, edges)
    raw = torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 1, 1]])
    d = raw.sum(1)
    torch.testing.assert_close(a, raw / torch.sqrt(d[:, None] * d[None, :]))


# ------------------------------------------------------------------------------------------------
# QHM
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-0.1), "Invalid learning rate"),
        (dict(lr=float("nan")), "Invalid learning rate"),
        (dict(beta=1.0), "Invalid beta"),
        (dict(beta=-0.1), "Invalid beta"),
        (dict(nu=float("inf")), "Invalid nu"),
        (dict(weight_decay=-1.0), "Invalid weight_decay"),
    ],
)
def test_qhm_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QHM([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_qhm_matches_its_formula_and_sgd_at_nu_zero():
    torch.manual_seed(0)
    p0 = torch.randn(4, 3, dtype=torch.float64)
    grads = [torch.randn(4, 3, dtype=torch.float64) for _ in range(10)]
    lr, beta, nu, wd = 0.1, 0.8, 0.6, 0.01
    p = torch.nn.Parameter(p0.clone())
    opt = QHM([p], lr=lr, beta=beta, nu=nu, weight_decay=wd)
    theta, buf = p0.clone(), torch.zeros_like(p0)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        d = g + wd * theta
        buf = beta * buf + (1 - beta) * d
        theta = theta - lr * ((1 - nu) * d + nu * buf)
    torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-12)

    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    qhm, sgd = QHM([a], lr=lr, beta=beta, nu=0.0), torch.optim.SGD([b], lr=lr)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        qhm.step()
        sgd.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_qhm_skips_params_without_grad_and_runs_closure():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = QHM([p, q], lr=0.5, beta=0.5, nu=1.0)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(2.0)
    assert torch.equal(q.detach(), torch.ones(2))
    torch.testing.assert_close(p.detach(), torch.full((2,), 1 - 0.5 * 0.5 * 2.0))
