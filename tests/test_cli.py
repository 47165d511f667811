"""``badm-train`` as users meet it: refusals, Ctrl-C, progress output, summary.md, threads, plots."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from badm_fast.train import checkpoint, cli, tasks

ROOT = Path(__file__).resolve().parents[1]
ERROR = re.compile(r"^badm-train: error: \S.*$")


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _refused(argv, tmp_path, capsys) -> str:
    """Runs ``badm-train argv`` in-process; checks exit status 2, one stderr line, nothing created."""
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and ERROR.match(lines[0]), captured.err
    assert captured.out == ""
    assert _tree(tmp_path) == before, "a refused job created files"
    return lines[0]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BADM_FAST_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


NO_CUDA = not torch.cuda.is_available()
NO_MPS = not torch.backends.mps.is_available()

REFUSALS = [
    (["--badm-sigma", "nan"], "--badm-sigma: expected a finite number, got 'nan'"),
    (["--badm-sigma", "inf"], "--badm-sigma: expected a finite number, got 'inf'"),
    (["--badm-rho=-inf"], "--badm-rho: expected a finite number"),
    (["--sgd-lr", "nan"], "--sgd-lr: expected a finite number"),
    (["--qhm-nu", "inf", "--optimizers", "qhm"], "--qhm-nu: expected a finite number"),
    (["--adam-lr", "0"], "--adam-lr must be > 0, got 0"),
    (["--sgd-momentum", "1"], "--sgd-momentum must be < 1, got 1"),
    (["--qhm-beta", "-0.5"], "--qhm-beta must be >= 0, got -0.5"),
    (["--adamw-weight-decay", "-1", "--optimizers", "adamw"], "--adamw-weight-decay must be >= 0"),
    (["--badm-sigma", "0"], "--badm-sigma must be > 0, got 0"),
    (["--badm-sigma", "abc"], "--badm-sigma: expected a number, got 'abc'"),
    (["--badm-backend", "nope"], "argument --badm-backend: invalid choice: 'nope'"),
    (["--device", "meta"], "--device meta: meta tensors hold no data"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["--out", "/proc/badm-train-test"], "--out /proc/badm-train-test: /proc is a virtual file system"),
    (["--out", "/sys/badm-train-test/run"], "/sys is a virtual file system"),
    (["--fsdp"], "--fsdp shards the model over the ranks of a torchrun job: add --distributed"),
    (["--overlap"], "--overlap is for BADM's process-group mode: --distributed, without --fsdp"),
    pytest.param(
        ["--badm-backend", "cuda"], "--badm-backend cuda: backend 'cuda' is unavailable on cpu",
        id="backend-cuda-on-cpu",
    ),  # fmt: skip  (the default --device is cpu, where the cuda back end cannot run)
    pytest.param(
        ["--device", "mps"], "--device mps: MPS (Apple GPU) is not available",
        marks=pytest.mark.skipif(not NO_MPS, reason="this machine has MPS"), id="device-mps",
    ),  # fmt: skip
    pytest.param(
        ["--device", "cuda"], "--device cuda:",
        marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"), id="device-cuda",
    ),  # fmt: skip
]


@pytest.mark.parametrize("argv, message", REFUSALS)
def test_refusals_are_one_line_and_create_nothing(argv, message, tmp_path, capsys):
    argv = [*argv] if "--out" in argv else [*argv, "--out", str(tmp_path / "run")]
    line = _refused(argv, tmp_path, capsys)
    assert message in line
    assert not (tmp_path / "run").exists()


def test_out_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    line = _refused(["--out", str(tmp_path / "a-file" / "run")], tmp_path, capsys)
    assert "is a file, so the directory cannot be created" in line


def test_out_that_cannot_be_written_is_refused_by_the_probe(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", denied)
    line = _refused(["--out", str(tmp_path / "deep" / "run")], tmp_path, capsys)
    assert f"cannot write in {tmp_path} (Permission denied)" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = _refused(["--out", str(locked / "run")], tmp_path, capsys)
    finally:
        locked.chmod(0o755)
    assert "cannot write in" in line


def test_backend_from_the_environment_is_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BADM_FAST_BACKEND", "nope")
    assert "BADM_FAST_BACKEND='nope' is not a backend" in _refused(["--out", str(tmp_path / "r")], tmp_path, capsys)


@pytest.mark.parametrize(
    "task, module, package", [("graph", "networkx", "networkx"), ("digits", "sklearn", "scikit-learn"),
                              ("charlm", "matplotlib", "matplotlib"), ("charlm", "tqdm", "tqdm")],
)  # fmt: skip
def test_missing_optional_dependency_names_the_install_command(task, module, package, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    line = _refused(["--task", task, "--out", str(tmp_path / "run")], tmp_path, capsys)
    assert package in line and 'pip install "badm_fast[train]"' in line


def test_missing_data_set_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BADM_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    line = _refused(["--task", "fashion-mnist", "--out", str(tmp_path / "run")], tmp_path, capsys)
    assert "apt-get install dataset-fashion-mnist" in line


@pytest.mark.parametrize(
    "argv", [["--badm-sigma", "nan"], ["--device", "mps"], ["--out", "/proc/x"], ["--badm-backend", "nope"]]
)
def test_refusal_of_the_real_command_has_no_traceback(argv, tmp_path):
    if argv == ["--device", "mps"] and not NO_MPS:
        pytest.skip("this machine has MPS")
    cmd = [sys.executable, "-m", "badm_fast.train", *argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "r")])
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and ERROR.match(lines[0]), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Ctrl-C
# ------------------------------------------------------------------------------------------------


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    args = ["--task", "digits", "--subset", "256", "--batch-size", "16", "--epochs", "500", "--optimizers",
            "badm,sgd", "--threads", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "badm_fast.train", *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait for the first progress line of an epoch
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if re.match(r"badm-train: badm epoch 1/500: ", line):
                break
        assert seen and "epoch 1/500" in seen[-1], "".join(seen)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.splitlines()[-1]
    path = out / "checkpoints" / "badm.pt"
    assert last.startswith(f"badm-train: interrupted while training badm; its last checkpoint is {path}; ")
    command = last.split("; resume with: ", 1)[1]
    assert shlex.split(command) == ["badm-train", *args, "--resume"]
    saved = checkpoint.load_checkpoint(path)
    assert saved["progress"]["epoch"] >= 2 and not saved["progress"]["finished"]
    assert not (out / "checkpoints" / "sgd.pt").exists()


def test_interrupt_message_without_a_checkpoint(tmp_path):
    args = cli.build_parser().parse_args(["--out", str(tmp_path), "--checkpoint-every", "50"])
    line = cli._interrupted({"name": "sgd"}, args, tmp_path, ["--checkpoint-every", "50", "--overwrite"])
    assert line == (
        "badm-train: interrupted while training sgd; sgd has no checkpoint yet (the first is written at step 50; "
        "--resume starts it over); resume with: badm-train --checkpoint-every 50 --overwrite --resume"
    )
    args.checkpoint_every = 0
    line = cli._interrupted({"name": "sgd"}, args, tmp_path, [])
    assert "no checkpoints were written (--checkpoint-every 0)" in line
    assert "before training started" in cli._interrupted({}, args, tmp_path, [])


# ------------------------------------------------------------------------------------------------
# Progress and outputs
# ------------------------------------------------------------------------------------------------


EPOCH_LINE = re.compile(
    r"^badm-train: (?P<name>\w+) epoch (?P<epoch>\d+)/3: train loss \d+\.\d{4}, test_accuracy \d\.\d{4}, "
    r"\d+\.\d s of training$"
)


def test_piped_stderr_gets_one_line_per_epoch_and_summary_md(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "badm_fast.train", "--task", "graph", "--epochs", "3", "--optimizers", "badm,sgd",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "\r" not in proc.stderr, "a progress bar was drawn into a pipe"
    assert lines[0].startswith("badm-train: graph: loading networkx's karate club graph") and lines[0].endswith("...")
    assert re.match(r"badm-train: graph: \d+ training and \d+ test examples; badm, sgd for 3 epochs each", lines[1])
    epochs = [EPOCH_LINE.match(line) for line in lines[2:]]
    assert all(epochs), lines[2:]
    assert [(m["name"], int(m["epoch"])) for m in epochs] == [(n, e) for n in ("badm", "sgd") for e in (1, 2, 3)]
    results = json.loads((out / "results.json").read_text())
    for m in epochs:
        record = results["optimizers"][m["name"]]["epochs"][int(m["epoch"]) - 1]
        assert f"train loss {record['train_loss']:.4f}, test_accuracy {record['test_metric']:.4f}" in m.group(0)
    summary = (out / "summary.md").read_text()
    assert summary.strip() in proc.stdout
    assert "| badm |" in summary and "| sgd |" in summary
    assert results["config"]["threads"] == cli.default_threads()

    quiet = subprocess.run([*cmd, "--quiet", "--overwrite"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_progress_bar_shows_epoch_step_loss_metric_and_phase():
    pytest.importorskip("tqdm")
    buf = io.StringIO()
    bar = cli.Progress("bar", "badm", 2, 8, 0, "test_accuracy", file=buf)
    bar.phase("evaluating")
    bar.evaluated(0.125)
    bar.start_epoch(1, 4)
    bar.update(1)
    bar.set_postfix(loss="2.5000")
    assert bar.postfix() == dict(epoch="1/2", step="1/4", loss="2.5000", test_accuracy="0.1250", phase="training")
    bar.phase("saving")
    text = buf.getvalue()
    for field in ("epoch=1/2", "step=1/4", "loss=2.5000", "test_accuracy=0.1250", "phase=saving", "phase=evaluating"):
        assert field in text, text
    bar.close()
    with pytest.raises(ValueError, match="unknown phase"):
        bar.phase("resting")
    lines = io.StringIO()
    quiet = cli.Progress("lines", "sgd", 3, 9, 0, "test_bpc", file=lines)
    quiet.start_epoch(1, 3)
    quiet.update(3)
    quiet.end_epoch(1, 1.5, 2.25, 0.5)
    assert lines.getvalue() == "badm-train: sgd epoch 1/3: train loss 1.5000, test_bpc 2.2500, 0.5 s of training\n"


def test_default_threads_is_half_the_usable_cores(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cli.default_threads() == 4
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cli.default_threads() == 1


def test_help_has_no_doubled_defaults_and_explains_every_hyperparameter(capsys):
    parser = cli.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for action in options:
        assert action.help, f"{action.option_strings[0]} has no help"
        assert action.help.count("(default") <= 1, action.help
    flags = {a.option_strings[0] for a in options}
    assert {"--" + dest.replace("_", "-") for dest in cli._LIMITS} <= flags
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: per task) (default" not in text
    assert "apt-get install dataset-fashion-mnist" in text and 'pip install "badm_fast[train]"' in text


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def _results(task="digits", batch_size=32, epochs=6, subset=64, max_steps=3):
    """A results.json dictionary with three optimizers, two of them with identical curves."""
    curve = [dict(epoch=e, train_loss=2.0 / e, test_metric=0.5 + 0.05 * e, time_s=0.1 * e, cpu_s=0.1 * e)
             for e in range(1, epochs + 1)]  # fmt: skip
    other = [dict(c, train_loss=c["train_loss"] * 1.1, time_s=c["time_s"] * 2) for c in curve]
    run = dict(initial_metric=0.1, diverged=False)
    cls = tasks.TASKS[task]
    return dict(
        config=dict(task=task, batch_size=batch_size, sub_batches=4, seed=0, epochs=epochs, subset=subset,
                    max_steps_per_epoch=max_steps, badm_mode="sub_batch", threads=1),  # fmt: skip
        data=dict(task=task, n_train=subset, n_test=subset, source=cls.source, loss_unit=cls.loss_unit),
        metric=dict(name=cls.metric, higher_is_better=cls.higher_is_better),
        optimizers=dict(badm=dict(run, epochs=curve), sgd=dict(run, epochs=[dict(c) for c in curve]),
                        adam=dict(run, epochs=other)),  # fmt: skip
    )


@pytest.mark.parametrize("task, batch_size", [("digits", 32), ("graph", 0), ("charlm", 16)])
def test_curves_show_every_point_and_every_series(task, batch_size):
    pytest.importorskip("matplotlib")
    from badm_fast.train.plotting import curves_figure

    fig = curves_figure(_results(task, batch_size))
    fig.canvas.draw()
    axes = fig.axes
    assert len(axes) == 4
    for ax in axes:
        lines = ax.get_lines()
        assert len(lines) == 3
        styles = {(str(line.get_linestyle()), line.get_marker()) for line in lines}
        assert len(styles) == 3, "two optimizers drawn alike"
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for line in lines:
            x, y = line.get_xdata()[0], line.get_ydata()[0]
            assert x0 <= x <= x1 and y0 <= y <= y1, f"{ax.get_xlabel()}/{ax.get_ylabel()}: first point cut off"
            assert x0 <= max(line.get_xdata()) <= x1 and y0 <= max(line.get_ydata()) <= y1
        assert ax.get_legend() is None, "legends go outside the panels"
        assert re.search(r"\(.+\)", ax.get_ylabel()), f"no unit on {ax.get_ylabel()!r}"
    top_left, top_right, bottom_left, bottom_right = axes
    assert top_right.get_lines()[0].get_xdata()[0] == 0, "the metric panels start at the initial weights"
    for ax in (top_left, top_right):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert ax.get_xlabel() == ("full-batch step" if batch_size == 0 else "epoch")
    assert bottom_left.get_xlabel() == bottom_right.get_xlabel() == "training time (s)"
    if task == "charlm":
        assert "nats per character" in top_left.get_ylabel() and "bits per character" in top_right.get_ylabel()
    title = fig._suptitle.get_text()
    assert "--subset 64" in title and "at most 3 steps per epoch" in title
    assert ("full batch" in title) == (batch_size == 0)
    assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == ["badm", "sgd", "adam"]
    assert math.isfinite(sum(ax.get_ylim()[0] for ax in axes))
