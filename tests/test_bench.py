"""bench/: the step and training benchmarks produce well-formed rows; their cases as pytest-benchmark tests.

The smoke tests run one tiny case of each script and check the rows, the CSV and the
markdown they produce; nothing here asserts anything about speed. The benchmark cases
(``test_step_benchmark``) run only when asked for, with ``--benchmark-enable`` or
``--benchmark-only`` (pytest-benchmark) or ``BADM_FAST_BENCH=1``::

    python -m pytest tests/test_bench.py --benchmark-enable -k benchmark
"""

import csv
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from badm_fast import backends

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import bench_step  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402

CPP_OK, CPP_REASON, _ = backends.availability("cpp", "cpu")
needs_cpp = pytest.mark.skipif(not CPP_OK, reason=f"cpp back end unavailable: {CPP_REASON}")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------- shapes, bytes, memory


def test_resnet50_shapes_are_torchvision_resnet50():
    shapes = bench_step.resnet50_shapes()
    assert len(shapes) == 161
    assert sum(math.prod(s) for s in shapes) == bench_step.RESNET50_NUMEL == 25_557_032
    assert shapes[0] == (64, 3, 7, 7) and shapes[-2:] == [(1000, 2048), (1000,)]
    assert bench_step.layout_shapes("list", bench_step.RESNET50_NUMEL) == shapes


@pytest.mark.parametrize("P", [4096, 1 << 20, 16 << 20])
def test_layouts_add_up_to_P(P):
    assert bench_step.layout_shapes("flat", P) == [(P,)]
    shapes = bench_step.layout_shapes("list", P)
    assert len(shapes) == 161
    assert sum(math.prod(s) for s in shapes) == P
    assert min(math.prod(s) for s in shapes) >= 1
    with pytest.raises(ValueError, match="unknown layout"):
        bench_step.layout_shapes("tree", P)


def test_badm_bytes_formula():
    # (3S + 2) values per element, z and grads in the parameter dtype, duals fp32 (fp64 for fp64).
    assert bench_step.badm_bytes(10, 4, torch.float32) == (3 * 4 + 2) * 10 * 4
    assert bench_step.badm_bytes(10, 4, torch.bfloat16) == 10 * (2 * 2 + 4 * 2 + 2 * 4 * 4)
    assert bench_step.badm_bytes(10, 1, torch.float64) == 5 * 10 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, values", [("adam-fused", 7), ("adam-foreach", 7), ("sgd-foreach", 5)])
def test_torch_optimizer_bytes_from_state(method, values, dtype):
    shapes = [(48, 16), (7,), (3, 5, 5)]
    P = sum(math.prod(s) for s in shapes)
    prep = bench_step.prepare_torch_optimizer(method, shapes, dtype, CPU)
    isz = torch.empty((), dtype=dtype).element_size()
    assert prep.nbytes == values * P * isz
    assert prep.n_tensors == 3


def test_memory_is_measured_from_state():
    # Sizes that are multiples of the flat buffers' alignment, so no padding enters the ratios.
    shapes = [(64, 64), (256,), (32, 8, 3, 3)]
    P = sum(math.prod(s) for s in shapes)
    for S in (1, 3):
        opt = bench_step.build_optimizer("badm", shapes, torch.float32, CPU, S=S)
        state, grads, params = bench_step.state_bytes(opt)
        assert (state, grads, params) == (4 * S * P, 4 * S * P, 4 * P)
        assert all(opt.state[p]["duals"].shape == (S, *p.shape) for p in opt.param_groups[0]["params"])
        bench_step.release_badm(opt)
    opt = bench_step.build_optimizer("badm-merged", shapes, torch.bfloat16, CPU, S=4)
    assert bench_step.state_bytes(opt) == (4 * P, 2 * P, 2 * P)  # one fp32 dual, one bf16 gradient row
    opt = bench_step.build_optimizer("adam-fused", shapes, torch.float32, CPU)
    assert bench_step.state_bytes(opt)[0] / P == pytest.approx(8.0, rel=0.01)  # exp_avg, exp_avg_sq (+ step)
    opt = bench_step.build_optimizer("sgd-foreach", shapes, torch.float32, CPU)
    assert bench_step.state_bytes(opt) == (4 * P, 4 * P, 4 * P)

    rows = bench_step.memory_rows(4096, [torch.float32], CPU, sub_batches=(2,))
    by_name = {r["optimizer"]: r for r in rows}
    assert set(by_name) == {"BADM per-sub-batch S=2", "BADM merged S=4", "Adam(fused=True)", "SGD(momentum=0.9)"}
    assert by_name["BADM per-sub-batch S=2"]["state_B"] >= 8.0  # 2 fp32 duals, plus padding of 161 segments
    assert by_name["BADM merged S=4"]["state_B"] < by_name["BADM per-sub-batch S=2"]["state_B"]


# ------------------------------------------------------------------------------- timing utilities


def test_percentile_and_measure_group_bookkeeping():
    assert common.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert common.percentile([1.0, 2.0], 20) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="empty"):
        common.percentile([], 50)
    calls = [0, 0]

    def f0():
        calls[0] += 1

    def f1():
        calls[1] += 1

    s0, s1 = common.measure_group([f0, f1], CPU, min_reps=3, target_s=0.0, rounds=3)
    assert (s0.reps, s1.reps) == (3, 3)
    assert calls == [1 + 3, 1 + 3]  # one warm-up call (target_s=0: no estimate needed), then one per round
    assert s0.p20 <= s0.median <= s0.p80
    with pytest.raises(ValueError, match="min_reps"):
        common.measure(f0, CPU, min_reps=0)


def test_fill_random_tiles_finite_values():
    t = common.fill_random_(torch.empty(3, 70001, dtype=torch.bfloat16), seed=1, scale=0.5, block=1000)
    assert torch.isfinite(t).all() and t.abs().max() <= 0.5
    assert t.float().std() > 0.1


def test_append_csv_keeps_one_header(tmp_path):
    path = tmp_path / "x.csv"
    common.append_csv(path, [{"a": 1, "b": None}], ["a", "b"])
    common.append_csv(path, [{"a": 2, "b": 3.5, "extra": 0}], ["a", "b"])
    with open(path) as f:
        assert list(csv.reader(f)) == [["a", "b"], ["1", ""], ["2", "3.5"]]
    other = common.append_csv(path, [{"c": 1}], ["c"])  # another layout goes beside it
    assert other != path and other.parent == path.parent


def test_markdown_table():
    text = common.markdown_table([{"k": "x", "v": 1.23456}, {"k": "y", "v": None}], [("k", "key"), ("v", "value")])
    assert text.splitlines() == ["| key | value |", "|---|---:|", "| x | 1.23 |", "| y | - |"]


# ------------------------------------------------------------------------------- smoke runs


def _tiny_config(methods, **kw):
    return bench_step.Config(
        sizes=[4096], sub_batches=[2], dtypes=[torch.float32], layouts=["flat"], methods=methods,
        backends=["cpp"] if CPP_OK else [], device=CPU, target_s=0.0, min_reps=2, **kw,
    )  # fmt: skip


def _check_ok_row(row):
    assert row["status"] == "ok", row["status"]
    assert row["reps"] >= 2
    assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert row["gbps"] == pytest.approx(row["bytes"] / (row["median_ms"] / 1e3) / 1e9)
    assert row["x_copy"] == pytest.approx(row["gbps"] / row["copy_gbps"])
    assert row["x_adam_fused"] == pytest.approx(row["gbps"] / row["adam_fused_gbps"])


@needs_cpp
def test_step_case_rows_are_well_formed():
    rows = bench_step.run(_tiny_config(["adam-fused", "kernel", "plain", "optimizer"]), log=lambda s: None)
    by = {(r["method"], r["backend"]): r for r in rows}
    assert set(by) == {("adam-fused", ""), ("kernel", "cpp"), ("plain", ""), ("optimizer", "cpp")}
    for r in rows:
        _check_ok_row(r)
        assert (r["P"], r["dtype"], r["layout"], r["n_tensors"]) == (4096, "fp32", "flat", 1)
    assert by[("adam-fused", "")]["bytes"] == 7 * 4 * 4096 and by[("adam-fused", "")]["S"] == 0
    for key in (("kernel", "cpp"), ("plain", ""), ("optimizer", "cpp")):
        r = by[key]
        assert (r["S"], r["bytes"]) == (2, (3 * 2 + 2) * 4 * 4096)
        assert r["x_plain"] == pytest.approx(by[("plain", "")]["median_ms"] / r["median_ms"])
    assert by[("plain", "")]["x_plain"] == pytest.approx(1.0)
    assert by[("kernel", "cpp")]["x_compiled"] is None  # no compiled case in this run


def test_failing_compile_is_reported_not_raised(monkeypatch):
    def broken():
        raise RuntimeError("no C++ compiler\nfound")

    monkeypatch.setattr(bench_step, "compiled_step", broken)
    rows = bench_step.run(_tiny_config(["compiled", "plain"]), log=lambda s: None)
    by = {r["method"]: r for r in rows}
    assert by["compiled"]["status"] == "error: RuntimeError: no C++ compiler found"
    assert "median_ms" not in by["compiled"]
    assert by["plain"]["status"] == "ok" and by["plain"]["x_compiled"] is None


def test_plain_step_above_the_limit_is_skipped():
    rows = bench_step.run(_tiny_config(["plain"], plain_limit_bytes=1000), log=lambda s: None)
    assert [r["status"] for r in rows] == ["skipped: moves > 1e-06 GB (--all runs it)"]


@needs_cpp
def test_step_command_line_writes_csv_and_markdown(tmp_path, capsys):
    csv_path, md_path = tmp_path / "step.csv", tmp_path / "step.md"
    argv = ["--sizes", "4K", "--sub-batches", "1", "--dtypes", "float32", "--layouts", "flat,list",
            "--methods", "kernel,adam-fused,optimizer-ignore", "--target-s", "0", "--min-reps", "2",
            "--csv", str(csv_path), "--md", str(md_path), "--no-memory"]  # fmt: skip
    bench_step.main(argv)
    bench_step.main(argv)  # appends under the same header
    out = capsys.readouterr().out
    assert "| dtype | P | S | method | median ms |" in out
    assert md_path.read_text() in out and "python bench/bench_step.py --sizes 4K" in md_path.read_text()
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    with open(csv_path) as f:
        assert next(csv.reader(f)) == bench_step.CSV_FIELDS
    # per run: adam-fused (flat, list), kernel (flat), optimizer-ignore (flat, list)
    assert len(rows) == 2 * 5
    assert {r["method"] for r in rows} == {"adam-fused", "kernel", "optimizer-ignore"}
    assert {r["n_tensors"] for r in rows if r["layout"] == "list"} == {"161"}
    for r in rows:
        assert r["status"] == "ok" and float(r["gbps"]) > 0 and int(r["bytes"]) > 0
        assert r["torch"] == torch.__version__ and r["cores"] and r["threads"] and r["date"] and r["commit"]


def test_step_command_line_rejects_unknown_choices():
    with pytest.raises(SystemExit):
        bench_step.main(["--methods", "kernel,rmsprop"])
    with pytest.raises(SystemExit):
        bench_step.main(["--sizes", "lots"])


def _files_under(root) -> dict:
    """path -> (size, mtime) of every file below ``root``."""
    root = Path(root)
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if "__pycache__" not in p.parts}


def test_benchmarks_write_only_where_asked(tmp_path, monkeypatch, capsys):
    """Without --csv / --md / --out no script writes a file (in particular none into the tracked bench/results)."""
    import bench_distributed
    import gpu_check
    import sweep_badm

    def no_csv(*args, **kwargs):
        raise AssertionError("append_csv called without --csv")

    monkeypatch.setattr(common, "append_csv", no_csv)
    monkeypatch.chdir(tmp_path)
    results = Path(BENCH_DIR) / "results"
    before = _files_under(tmp_path), _files_under(results)
    argv = ["--sizes", "4K", "--sub-batches", "1", "--dtypes", "float32", "--layouts", "flat",
            "--methods", "adam-fused", "--target-s", "0", "--min-reps", "2", "--no-memory"]  # fmt: skip
    assert [r["status"] for r in bench_step.main(argv)] == ["ok"]
    assert "| dtype | P | S | method |" in capsys.readouterr().out
    if importlib.util.find_spec("sklearn") is not None:
        argv = ["--models", "digits-cnn", "--optimizers", "sgd", "--target-s", "0", "--min-steps", "2"]
        assert [r["status"] for r in bench_train.main(argv, log=lambda s: None)] == ["ok"]
    assert (_files_under(tmp_path), _files_under(results)) == before
    # the defaults of the scripts that run for minutes or need a GPU
    assert bench_step.build_parser().parse_args([]).csv is None
    assert bench_train.build_parser().parse_args([]).csv is None
    assert bench_distributed.build_parser().parse_args([]).out is None
    assert sweep_badm.build_parser().parse_args([]).out is None
    assert gpu_check.parse_args([]).out is None


def test_train_loop_rows(tmp_path, capsys):
    pytest.importorskip("sklearn")
    work = bench_train.Workload("digits-cnn", CPU)
    for kind in bench_train.OPTIMIZERS:
        row = bench_train.run_loop(work, kind, target_s=0.0, min_steps=3, warmup=1)
        assert row["status"] == "ok" and row["steps"] == 3
        assert 0 < row["opt_share"] <= 1
        assert 0 < row["opt_median_ms"] <= row["p80_ms"]
        assert math.isfinite(row["final_loss"])
        assert row["params"] == sum(p.numel() for p in work.model().parameters())
        expected = "torch.optim" if kind in ("sgd", "adam") else ("cpp" if CPP_OK else "torch")
        assert row["backend"] == expected
    csv_path = tmp_path / "train.csv"
    bench_train.main(["--models", "digits-cnn", "--optimizers", "badm-merged,sgd", "--target-s", "0",
                      "--min-steps", "2", "--csv", str(csv_path)], log=lambda s: None)  # fmt: skip
    assert "| digits-cnn |" in capsys.readouterr().out
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["badm-merged", "sgd"]


# ------------------------------------------------------------------------------- benchmark cases


def _benchmarks_requested(config) -> bool:
    opt = config.getoption
    return bool(
        opt("benchmark_enable", default=False) or opt("benchmark_only", default=False)
    ) or os.environ.get("BADM_FAST_BENCH") == "1"


BENCH_P = int(os.environ.get("BADM_FAST_BENCH_P", 16 << 20))
BENCH_CASES = [
    ("kernel", "cpp", 1), ("kernel", "cpp", 4), ("plain", "", 1), ("plain", "", 4),
    ("compiled", "", 1), ("compiled", "", 4), ("optimizer", "cpp", 4), ("optimizer-ignore", "cpp", 4),
    ("adam-fused", "", 0), ("adam-foreach", "", 0), ("sgd-foreach", "", 0),
]  # fmt: skip


@pytest.mark.benchmark(group="badm-step")
@pytest.mark.parametrize("method, backend, S", BENCH_CASES)
def test_step_benchmark(request, method, backend, S):
    """One case of bench_step.py (fp32, one flat tensor of BADM_FAST_BENCH_P elements, 16M by
    default) timed by pytest-benchmark; GB/s lands in extra_info."""
    if not _benchmarks_requested(request.config):
        pytest.skip("benchmarks run with --benchmark-enable, --benchmark-only or BADM_FAST_BENCH=1")
    if backend == "cpp" and not CPP_OK:
        pytest.skip(CPP_REASON)
    benchmark = request.getfixturevalue("benchmark")
    shapes = bench_step.layout_shapes("flat", BENCH_P)
    if method in bench_step.ANCHORS:
        prep = bench_step.prepare_torch_optimizer(method, shapes, torch.float32, CPU)
        fn, nbytes = prep.fn, prep.nbytes
    elif method in bench_step.BADM_OPT:
        prep = bench_step.prepare_badm_optimizer(method, backend, shapes, S, torch.float32, CPU)
        fn, nbytes = prep.fn, prep.nbytes
    else:
        flat = bench_step.FlatBuffers(BENCH_P, S, torch.float32, CPU)
        kernel = {
            "kernel": lambda: backends.kernel_for(backend),
            "plain": lambda: bench_step.reference.fused_step_,
            "compiled": bench_step.compiled_step,
        }[method]()
        fn, nbytes = flat.step_fn(kernel), flat.nbytes
        fn()  # compiles the torch.compile case outside the timing
    benchmark.extra_info.update(method=method, backend=backend, P=BENCH_P, S=S, bytes=nbytes)
    try:
        benchmark(fn)
    finally:
        if method in bench_step.BADM_OPT:
            prep.close()
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = nbytes / median / 1e9
