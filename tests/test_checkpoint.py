"""Checkpoints of ``badm-train`` (badm_fast/train/checkpoint.py): a training job killed with SIGKILL
and resumed ends with the weights of an uninterrupted run, bit for bit; writes are atomic;
mismatched arguments and damaged files are refused with clear errors; optimizer states move
between devices through a CPU checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import badm_fast
from badm_fast.train import checkpoint, cli, tasks

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("badm", "sgd")
# 3 epochs x 30 steps per optimizer on 960 digits: a few seconds, long enough to be killed mid-run
JOB = [
    "--task", "digits", "--optimizers", ",".join(OPTIMIZERS), "--subset", "960", "--batch-size", "32",
    "--epochs", "3", "--max-steps-per-epoch", "30", "--threads", "1",
]  # fmt: skip
STEPS_PER_OPTIMIZER = 90
EVERY = 7  # does not divide the epoch: checkpoints fall mid-epoch
SMALL = ["--task", "digits", "--optimizers", "badm,sgd", "--subset", "128", "--epochs", "1", "--threads", "1"]


def run_job(out, *extra, quiet=True):
    argv = [*JOB, "--out", str(out), *extra] + (["--quiet"] if quiet else [])
    assert cli.main(argv) == 0


def final_weights(out, name):
    return torch.load(out / f"final-{name}.pt", weights_only=True)


def assert_same_run(out, ref):
    """The final weights of every optimizer are identical, and so are the recorded results."""
    for name in OPTIMIZERS:
        a, b = final_weights(out, name), final_weights(ref, name)
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs from the uninterrupted run"
    got, want = (json.loads((d / "results.json").read_text())["optimizers"] for d in (out, ref))
    assert list(got) == list(want)
    for name in OPTIMIZERS:
        assert got[name]["initial_metric"] == want[name]["initial_metric"]
        strip = [(e["epoch"], e["train_loss"], e["test_metric"]) for e in got[name]["epochs"]]
        assert strip == [(e["epoch"], e["train_loss"], e["test_metric"]) for e in want[name]["epochs"]], name
        assert got[name]["steps"] == want[name]["steps"] == STEPS_PER_OPTIMIZER


def temporaries(out):
    return [p.name for p in out.rglob("*.tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, without checkpoints (saving must not change the trajectory)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_job(out, "--checkpoint-every", "0")
    assert not (out / "checkpoints").exists()
    return out


# ------------------------------------------------------------------------------------------------
# (a) killed and resumed
# ------------------------------------------------------------------------------------------------


def _wait_for_change(path, previous, proc, deadline):
    """Polls ``path``'s (inode, mtime) until it differs from ``previous``; returns the new one."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before it could be killed:\n{proc.stderr.read()}")
        with_stat = None
        try:
            st = os.stat(path)
            with_stat = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            pass
        if with_stat is not None and with_stat != previous:
            return with_stat, time.monotonic()
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no new checkpoint {path} within the time limit")


def test_sigkill_mid_run_then_resume_gives_identical_weights(reference, tmp_path):
    out = tmp_path / "run"
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [
        sys.executable,
        "-m",
        "badm_fast.train",
        *JOB,
        "--checkpoint-every",
        str(EVERY),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # BADM (the first optimizer) checkpoints at steps 7, 14, ...; the interval between the first
        # two gives the pace; the kill comes about half an interval after the second: some steps
        # beyond the latest checkpoint have run and are lost, and must be redone on resume
        path = out / "checkpoints" / "badm.pt"
        deadline = time.monotonic() + 120
        first, t1 = _wait_for_change(path, None, proc, deadline)
        _, t2 = _wait_for_change(path, first, proc, deadline)
        time.sleep((t2 - t1) / 2)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    saved = checkpoint.load_checkpoint(path)  # whatever the moment of the kill, the file is whole
    assert not saved["progress"]["finished"], "killed after BADM had finished: not a mid-run kill"
    assert saved["progress"]["steps"] % EVERY == 0 and saved["progress"]["steps"] >= 2 * EVERY
    assert not (out / "final-badm.pt").exists() and not (out / "checkpoints" / "sgd.pt").exists()

    run_job(out, "--checkpoint-every", str(EVERY), "--resume")
    assert_same_run(out, reference)
    assert temporaries(out) == [], "a write killed before its rename leaves nothing behind after the resume"


def test_crash_in_second_optimizer_resumes_it_and_keeps_the_finished_one(reference, tmp_path, monkeypatch, capsys):
    """An exception out of the training step (a crash, in process) 2 steps after a checkpoint of
    the second optimizer: the resume takes BADM's finished run from its checkpoint, redoes those
    2 steps of SGD and finishes; a stale temporary file is cleaned up; resuming a finished run
    trains nothing and changes nothing."""
    out = tmp_path / "run"
    real_step, calls = cli.train_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == STEPS_PER_OPTIMIZER + 2 * EVERY + 3:  # SGD's 17th step: 15 and 16 ran after the checkpoint
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(cli, "train_step", crashing_step)
    assert cli.main([*JOB, "--out", str(out), "--checkpoint-every", str(EVERY), "--quiet"]) == 130  # as Ctrl-C
    assert f"interrupted while training sgd; its last checkpoint is {out / 'checkpoints' / 'sgd.pt'}; " in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(cli, "train_step", real_step)
    sgd = checkpoint.load_checkpoint(out / "checkpoints" / "sgd.pt")
    assert sgd["progress"] | {"time_s": 0, "cpu_s": 0, "total": 0} == dict(
        epoch=1, step=2 * EVERY, steps=2 * EVERY, total=0, count=2 * EVERY * 32, time_s=0, cpu_s=0, finished=False
    )
    assert checkpoint.load_checkpoint(out / "checkpoints" / "badm.pt")["progress"]["finished"]
    stale = out / "checkpoints" / ".sgd.pt.999.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")

    run_job(out, "--checkpoint-every", str(EVERY), "--resume", quiet=False)
    err = capsys.readouterr().err
    assert "badm had finished; its results and weights come from" in err
    assert "resuming sgd from" in err and f"epoch 1, {2 * EVERY} steps into it" in err
    assert_same_run(out, reference)
    assert not stale.exists()

    before = {p.name: p.read_bytes() for p in out.glob("final-*.pt")}
    calls.clear()
    monkeypatch.setattr(cli, "train_step", crashing_step)  # counts the steps: none may run
    run_job(out, "--resume")
    assert calls == []
    assert_same_run(out, reference)
    assert before == {p.name: p.read_bytes() for p in out.glob("final-*.pt")}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["process-group", "fsdp"])
def test_distributed_job_resumes_exactly(tmp_path, fsdp):
    """``torchrun --nproc_per_node=2 ... --distributed``: BADM's checkpoint holds every rank's
    duals and every rank's RNG state; SGD (under DDP) one optimizer state. The checkpoints are
    snapshotted while an uninterrupted run goes on (each file is always whole); a new job
    resumes from a mid-run BADM snapshot and a mid-run SGD snapshot and ends with the
    uninterrupted run's weights and results. With ``--fsdp`` (FSDP2) every checkpoint holds the
    whole, gathered model and optimizer states (one entry), loaded back into the shards."""
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    job = [
        "--task", "digits", "--optimizers", "badm,sgd", "--subset", "480", "--batch-size", "32", "--epochs", "2",
        "--sub-batches", "2", "--threads", "1", "--quiet", "--checkpoint-every", "4", *(["--fsdp"] if fsdp else []),
    ]  # fmt: skip
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "badm_fast.train", "--distributed"]
        return subprocess.Popen([*cmd, *job, "--out", str(out), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    ref, snaps = tmp_path / "reference", tmp_path / "snapshots"
    snaps.mkdir()
    proc, seen = torchrun(ref), {}
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        for name in OPTIMIZERS:
            try:
                st = os.stat(ref / "checkpoints" / f"{name}.pt")
                if seen.get(name) != st.st_ino:
                    seen[name] = st.st_ino
                    shutil.copyfile(
                        ref / "checkpoints" / f"{name}.pt", snaps / f"{name}-{len(list(snaps.iterdir()))}.pt"
                    )
            except FileNotFoundError:
                pass
        time.sleep(0.002)
    output = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    assert proc.returncode == 0, output[-3000:]

    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    for name in OPTIMIZERS:  # the latest snapshot taken mid-run
        mid = [p for p in sorted(snaps.glob(f"{name}-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
               if not checkpoint.load_checkpoint(p)["progress"]["finished"]]  # fmt: skip
        assert mid, f"no mid-run checkpoint of {name} was caught"
        saved = checkpoint.load_checkpoint(mid[-1])
        assert len(saved["rng"]) == 2 and len(saved["optimizer"]) == (2 if name == "badm" and not fsdp else 1)
        shutil.copyfile(mid[-1], out / "checkpoints" / f"{name}.pt")
    proc = torchrun(out, "--resume")
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output[-3000:]
    for name in OPTIMIZERS:
        a, b = final_weights(out, name), final_weights(ref, name)
        assert all(torch.equal(a[k], b[k]) for k in b), name
    got, want = (json.loads((d / "results.json").read_text())["optimizers"] for d in (out, ref))
    for name in OPTIMIZERS:
        assert [e["train_loss"] for e in got[name]["epochs"]] == [e["train_loss"] for e in want[name]["epochs"]]


def test_checkpoint_at_the_end_of_an_epoch_resumes_before_its_evaluation(tmp_path, monkeypatch):
    """``--checkpoint-every 3`` with 3 steps per epoch: the checkpoint after an epoch's last step
    comes before the epoch's evaluation; a crash in the next step resumes with an epoch that has
    no step left, evaluates it and goes on as the uninterrupted run."""
    job = [*SMALL, "--epochs", "2", "--max-steps-per-epoch", "3", "--optimizers", "badm", "--quiet"]
    assert cli.main([*job, "--out", str(tmp_path / "ref"), "--checkpoint-every", "0"]) == 0
    real_step, calls = cli.train_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(cli, "train_step", crashing_step)
    assert cli.main([*job, "--out", str(out), "--checkpoint-every", "3"]) == 130  # stopped as by Ctrl-C
    monkeypatch.setattr(cli, "train_step", real_step)
    saved = checkpoint.load_checkpoint(out / "checkpoints" / "badm.pt")
    assert (saved["progress"]["epoch"], saved["progress"]["step"], saved["record"]["epochs"]) == (1, 3, [])
    assert cli.main([*job, "--out", str(out), "--checkpoint-every", "3", "--resume"]) == 0
    a, b = final_weights(out, "badm"), final_weights(tmp_path / "ref", "badm")
    assert all(torch.equal(a[k], b[k]) for k in b)
    got, want = (json.loads((d / "results.json").read_text())["optimizers"]["badm"] for d in (out, tmp_path / "ref"))
    assert [(e["train_loss"], e["test_metric"]) for e in got["epochs"]] == [
        (e["train_loss"], e["test_metric"]) for e in want["epochs"]
    ]


# ------------------------------------------------------------------------------------------------
# (b) atomic writes
# ------------------------------------------------------------------------------------------------


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    checkpoint.atomic_save({"v": torch.arange(4)}, path)
    real_replace = os.replace

    def interrupted(src, dst):  # the new file is written and synced; the process dies before the rename
        assert Path(src).parent == path.parent and Path(src).stat().st_size > 0
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"v": torch.arange(1000)}, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert torch.equal(checkpoint.load(path)["v"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_atomic_save_syncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.atomic_save({"v": torch.ones(3)}, tmp_path / "y.pt")
    assert events == ["fsync file", "replace", "fsync dir"]
    assert torch.equal(checkpoint.load(tmp_path / "y.pt")["v"], torch.ones(3))


def test_failed_checkpoint_write_in_the_job_leaves_the_previous_one(reference, tmp_path, monkeypatch):
    """The job's second BADM checkpoint fails at the rename: the first one (step 7) is intact and
    the resume from it gives the uninterrupted run's weights."""
    out = tmp_path / "run"
    real_replace, seen = os.replace, []

    def replace(src, dst):
        if Path(dst).name == "badm.pt":
            seen.append(dst)
            if len(seen) == 2:
                raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        run_job(out, "--checkpoint-every", str(EVERY))
    monkeypatch.setattr(os, "replace", real_replace)
    saved = checkpoint.load_checkpoint(out / "checkpoints" / "badm.pt")
    assert saved["progress"]["steps"] == EVERY and saved["optimizer"][0]["badm"]["step"] == EVERY
    assert temporaries(out) == []
    run_job(out, "--checkpoint-every", str(EVERY), "--resume")
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------------
# (c) refused resumes
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    assert cli.main([*SMALL, "--max-steps-per-epoch", "3", "--out", str(out), "--quiet"]) == 0
    return out


def _refused(out, extra, capsys):
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        cli.main([*SMALL, "--max-steps-per-epoch", "3", "--out", str(out), "--quiet", "--resume", *extra])
    assert exc.value.code == 2
    assert files == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}, "a refused resume changes no file"
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--batch-size", "16"], ["--batch-size: checkpoint 32, now 16"]),
        (
            ["--seed", "1", "--badm-sigma", "3"],
            ["--seed: checkpoint 0, now 1", "--badm-sigma: checkpoint 2.0, now 3.0"],
        ),
        (["--sub-batches", "2"], ["--sub-batches: checkpoint 4, now 2"]),
        (["--badm-mode", "merged"], ["--badm-mode: checkpoint 'sub_batch', now 'merged'"]),
        (["--sgd-lr", "0.5"], ["sgd.pt was saved with other arguments", "--sgd-lr: checkpoint"]),
    ],
)
def test_resume_with_other_arguments_names_the_differences(small_run, tmp_path, capsys, extra, fragments):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    err = _refused(out, extra, capsys)
    assert "was saved with other arguments" in err
    for fragment in fragments:
        assert fragment in err
    if "--batch-size" in extra:  # the same for every optimizer; the first file named
        assert str(out / "checkpoints" / "badm.pt") in err


def test_damaged_checkpoint_is_named(small_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    path = out / "checkpoints" / "sgd.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    err = _refused(out, [], capsys)
    assert f"checkpoint {path} cannot be read" in err and "damaged" in err

    torch.save({"model": {}}, path)  # a torch file, but not a checkpoint of the job
    assert f"{path} is not a badm-train checkpoint" in _refused(out, [], capsys)

    torch.save({"opt": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)}, path)  # would need unpickling
    err = _refused(out, [], capsys)
    assert f"checkpoint {path} cannot be read (UnpicklingError" in err


DIGITS = tasks.TASKS["digits"].defaults


def test_load_checkpoint_checks_structure(small_run, tmp_path):
    ckpt = checkpoint.load_checkpoint(small_run / "checkpoints" / "badm.pt")
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["version"] == checkpoint.VERSION
    assert ckpt["config"] == dict(
        task="digits", seed=0, subset=128, epochs=1, batch_size=32, sub_batches=4, max_steps_per_epoch=3,
        world_size=1, optimizer="badm", badm_mode="sub_batch",
        badm_rho=DIGITS["badm_rho"], badm_sigma=DIGITS["badm_sigma"],  # the task's defaults
    )  # fmt: skip
    assert ckpt["rng"][0]["torch"].dtype == torch.uint8 and ckpt["rng"][0]["cuda"] is None
    no_progress = {k: v for k, v in ckpt.items() if k != "progress"}
    for broken, fragment in [(no_progress, "missing or malformed: progress"), ({**ckpt, "version": 99}, "version 99")]:
        torch.save(broken, tmp_path / "b.pt")
        with pytest.raises(checkpoint.CheckpointError, match=fragment):
            checkpoint.load_checkpoint(tmp_path / "b.pt")


def test_resume_without_checkpoints_starts_fresh_and_bad_every_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*SMALL, "--max-steps-per-epoch", "2", "--out", str(out), "--resume"]) == 0
    assert "no checkpoint of badm in" in capsys.readouterr().err
    assert (out / "final-badm.pt").is_file() and (out / "checkpoints" / "sgd.pt").is_file()
    with pytest.raises(SystemExit) as exc:
        cli.main([*SMALL, "--out", str(tmp_path / "other"), "--checkpoint-every", "-1"])
    assert exc.value.code == 2
    assert "--checkpoint-every: must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# (d) optimizer states across devices
# ------------------------------------------------------------------------------------------------


def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)


def _optimizer(kind, model):
    if kind == "badm":
        return badm_fast.BADM(model.parameters(), sub_batches=2, rho=3.0, sigma=5.0)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _train(model, opt, steps, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.functional.cross_entropy
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g).to(device), torch.randint(0, 3, (8,), generator=g).to(device)
        if isinstance(opt, badm_fast.BADM):
            badm_fast.split_step(model, opt, loss_fn, x, y)
        else:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()


def _tensors(obj, prefix=""):
    """The tensors of a nested state, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def _same_state(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) == list(tb)
    for key in ta:
        assert torch.equal(ta[key].cpu(), tb[key].cpu()), key


@pytest.mark.parametrize("kind", ["badm", "adam"])
def test_cpu_checkpoint_round_trip_continues_exactly(kind, tmp_path):
    model = _model()
    opt = _optimizer(kind, model)
    _train(model, opt, 3)
    path = tmp_path / "c.pt"
    checkpoint.atomic_save({"model": checkpoint.model_state(model), "optimizer": opt.state_dict()}, path)
    loaded = checkpoint.load(path, map_location="cpu")
    model2 = _model()
    with torch.no_grad():
        for p in model2.parameters():
            p.mul_(0.5)  # everything must come from the checkpoint
    opt2 = _optimizer(kind, model2)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    _same_state(opt2.state_dict(), opt.state_dict())
    _train(model, opt, 3, seed=2)
    _train(model2, opt2, 3, seed=2)
    _same_state(dict(model2.state_dict()), dict(model.state_dict()))
    _same_state(opt2.state_dict(), opt.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this torch sees none)")
@pytest.mark.parametrize("kind, map_location", [("badm", "cpu"), ("badm", "cuda"), ("adam", "cpu")])
def test_cpu_checkpoint_loads_on_cuda_and_back(kind, map_location, tmp_path):
    """A CPU checkpoint loads into an optimizer on a GPU (``load_state_dict`` moves the state;
    for BADM also when the tensors are mapped to the GPU first), continues there, and its
    checkpoint loads back into an optimizer on the CPU, all copies exact."""
    model = _model()
    opt = _optimizer(kind, model)
    _train(model, opt, 3)
    path = tmp_path / "cpu.pt"
    checkpoint.atomic_save({"model": checkpoint.model_state(model), "optimizer": opt.state_dict()}, path)

    loaded = checkpoint.load(path, map_location=map_location)
    gpu_model = _model("cuda")
    gpu_opt = _optimizer(kind, gpu_model)
    gpu_model.load_state_dict(loaded["model"])
    gpu_opt.load_state_dict(loaded["optimizer"])
    _same_state(gpu_opt.state_dict(), opt.state_dict())  # the copy to the device is exact
    assert all(t.is_cuda for k, t in _tensors(gpu_opt.state_dict()).items() if not k.endswith("/step"))

    _train(gpu_model, gpu_opt, 3, device="cuda", seed=2)
    _train(model, opt, 3, seed=2)  # the same steps on the CPU agree to rounding
    for a, b in zip(gpu_model.parameters(), model.parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-4, atol=1e-5)

    back = tmp_path / "gpu.pt"
    checkpoint.atomic_save({"model": checkpoint.model_state(gpu_model), "optimizer": gpu_opt.state_dict()}, back)
    loaded = checkpoint.load(back, map_location="cpu")
    cpu_model = _model()
    cpu_opt = _optimizer(kind, cpu_model)
    cpu_model.load_state_dict(loaded["model"])
    cpu_opt.load_state_dict(loaded["optimizer"])
    _same_state(cpu_opt.state_dict(), gpu_opt.state_dict())
    _same_state(dict(cpu_model.state_dict()), dict(gpu_model.state_dict()))
