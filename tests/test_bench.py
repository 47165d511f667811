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
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from badm_fast import backends

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import bench_step  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
import gpu_check  # noqa: E402

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
    import compare
    import gpu_check

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
    assert compare.build_parser().parse_args([]).out is None
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


# ------------------------------------------------------------------------------- gpu_check (runs on CPU here)


def _gpu_check_ctx(budget=None):
    """A gpu_check Context on CPU, as --cpu-smoke makes it (no back end set up)."""
    args = gpu_check.parse_args(["--cpu-smoke"])
    plan = gpu_check.make_plan(args, torch)
    report = gpu_check.Report(time.perf_counter(), echo=lambda line: None)
    ctx = gpu_check.Context(torch, plan, report, args.budget if budget is None else budget, args)
    ctx.badm_fast, ctx.kernels_pkg = gpu_check.import_project()
    ctx.reference = ctx.badm_fast.reference
    return ctx


def test_gpu_check_arguments_and_plans():
    args = gpu_check.parse_args([])
    assert (args.out, args.quick, args.cpu_smoke) == (None, False, False)
    assert (args.reps, args.warmup, args.budget) == (20, 3, 420)
    assert gpu_check.parse_args(["--quick"]).budget == 200
    full, quick = gpu_check.make_plan(args, torch), gpu_check.make_plan(gpu_check.parse_args(["--quick"]), torch)
    assert full.sizes == [16 << 20, 256 << 20] and full.subs == [1, 4, 8] and full.n_list == 161 and full.large_check
    assert set(full.dtypes) == {torch.float32, torch.float64, torch.bfloat16, torch.float16}
    assert quick.sizes == [16 << 20] and not quick.large_check
    for plan in (full, quick, gpu_check.make_plan(gpu_check.parse_args(["--cpu-smoke"]), torch)):
        names = {f[0] for f in gpu_check.FLAG_CASES}
        for name, sizes, offset, pad, skip, flags, dtypes in plan.parity_layouts:
            assert flags is None or set(flags) <= names, name
            assert all(i < len(sizes) for i in skip)
    # parity covers aligned and odd sizes, unaligned starts and padded rows, one tensor and many
    layouts = full.parity_layouts
    assert any(len(s) == 1 and s[0] % 16 == 0 for _, s, *_ in layouts)
    assert any(len(s) == 1 and s[0] % 2 == 1 for _, s, *_ in layouts)
    assert any(off and pad for _, _, off, pad, *_ in layouts) and any(len(s) == 161 for _, s, *_ in layouts)
    assert [16 << 20] in [s for _, s, *_ in layouts]  # the timing size itself
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--reps", "0"])


def test_gpu_check_sizes_and_bytes():
    assert len(gpu_check.resnet50_numels()) == 161 and sum(gpu_check.resnet50_numels()) == 25_557_032
    for P in (3000, 1 << 20, 256 << 20):
        sizes = gpu_check.list_sizes(P)
        assert len(sizes) == 161 and sum(sizes) == P and min(sizes) >= 1
    odd = gpu_check.odd_sizes(gpu_check.list_sizes(1 << 20))
    assert odd[1] == 0 and all(n % 2 == 1 for k, n in enumerate(odd) if k != 1)
    assert gpu_check.badm_bytes(torch, 10, 4, torch.float32) == (3 * 4 + 2) * 10 * 4
    assert gpu_check.badm_bytes(torch, 10, 1, torch.float64) == 5 * 10 * 8
    assert gpu_check.badm_bytes(torch, 10, 2, torch.bfloat16) == 10 * (2 * 2 + 2 * 2 + 2 * 2 * 4)


def test_gpu_check_extension_build_plan():
    sources = [os.path.relpath(s, gpu_check.ROOT) for s in gpu_check.extension_sources()]
    assert sources[:2] == [os.path.join("csrc", "binding.cpp"), os.path.join("csrc", "badm_cpu_default.cpp")]
    root = Path(gpu_check.ROOT)
    expected = {"csrc/binding.cpp", "csrc/cuda/binding_cuda.cpp"}
    expected |= {str(p.relative_to(root)) for p in root.glob("csrc/badm_cpu_*.cpp")}
    expected |= {str(p.relative_to(root)) for p in root.glob("csrc/cuda/*.cu")}
    assert set(sources) == expected and len(sources) == len(set(sources))
    cpu_only = gpu_check.extension_sources(with_cuda=False)
    assert not any("cuda" in os.path.relpath(s, gpu_check.ROOT) for s in cpu_only)
    flags = gpu_check.extension_flags()
    assert {"-O3", "-ffp-contract=off"} <= set(flags["extra_cflags"])
    assert flags["extra_cuda_cflags"] == ["-O3", "--fmad=false"]
    assert not any(f.startswith("-std") for v in flags.values() for f in v)  # torch adds its own


def test_gpu_check_probe_of_the_installed_extension():
    ok, why = gpu_check.probe_installed_extension()
    assert not ok  # no CUDA here: either the CPU-only build ("NOCUDA ...") or no extension ("NOIMPORT ...")
    assert why.startswith("NOCUDA ") == CPP_OK or why.startswith("NOIMPORT")


def test_gpu_check_bit_comparison():
    a = torch.tensor([1.0, -0.0, float("nan"), 2.0])
    b = torch.tensor([1.0, 0.0, float("nan"), 2.0])
    assert gpu_check.bit_mismatches(torch, a, b) == 1  # -0.0 is not 0.0
    payload = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    assert gpu_check.bit_mismatches(torch, torch.tensor([float("nan")]), payload) == 0  # any NaN equals any NaN
    for dt, ints in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16), (torch.float64, torch.int64)):
        x = torch.arange(5, dtype=dt)
        y = x.clone()
        y.view(ints)[3] += 1  # one ulp
        assert gpu_check.bit_mismatches(torch, x, y) == 1


def test_gpu_check_parity_finds_wrong_bits_stray_writes_and_residuals():
    ctx = _gpu_check_ctx()
    base = gpu_check.parity_inputs(ctx, [7, 0, 33], 2, torch.float32, seed=1, offset=1, row_pad=3, skip=(2,))
    assert base.grads[2] is None and base.grads[5] is None and base.params[1].numel() == 0
    assert base.params[0].data_ptr() % 16 != 0 and torch.isnan(base.buffers[0][0])  # unaligned, poisoned before
    assert torch.isnan(base.buffers[0][8:]).all()  # and after
    g0 = base.grads[0]
    assert g0.storage_offset() == 1 and base.grads[3].storage_offset() == 1 + 7 + 3  # row 1 after 3 poisoned
    ref = ctx.reference.fused_step_
    flags = next(f for f in gpu_check.FLAG_CASES if f[0] == "flag+residuals")
    want, res_want = gpu_check.run_contract(ctx, ref, base, flags)
    got, res_got = gpu_check.run_contract(ctx, ref, base, flags)
    assert gpu_check.compare_inputs(torch, got, want, res_got, res_want) is None
    assert not torch.equal(want.params[0], base.params[0])  # the step ran on a copy
    assert torch.equal(res_want.new_tensor([0.25, 0.5]) <= res_want, torch.tensor([True, True]))

    def one_ulp(params, grads, duals, *rest):
        ref(params, grads, duals, *rest)
        params[2].view(torch.int32)[4] += 1

    def stray(params, grads, duals, *rest):
        ref(params, grads, duals, *rest)
        d = duals[0]
        d.as_strided((1,), (1,), d.storage_offset() + d.numel()).fill_(0.0)  # into the padding between rows

    def residual_off(params, grads, duals, weights, hyper, residuals, *rest):
        ref(params, grads, duals, weights, hyper, residuals, *rest)
        residuals.mul_(1 + 1e-7)

    for broken, message in [(one_ulp, "1 elements differ"), (stray, "1 elements differ"), (residual_off, "residuals")]:
        got, res_got = gpu_check.run_contract(ctx, broken, base, flags)
        assert message in gpu_check.compare_inputs(torch, got, want, res_got, res_want)


def test_gpu_check_parity_rows(monkeypatch):
    ctx = _gpu_check_ctx()
    ctx.plan.parity_layouts = [("tiny", [5, 17], 1, 3, (1,), ("plain", "skipped"), [torch.float32, torch.float16])]
    ctx.plan.subs = [1, 2]

    def broken(params, grads, duals, *rest):
        ctx.reference.fused_step_(params, grads, duals, *rest)
        duals[-1][0] = 7.0  # even when found_inf says nothing may change

    ctx.kernels = {"triton": ctx.reference.fused_step_, "cpp": broken}
    gpu_check.check_parity(ctx)
    rows = {(r["backend"], r["dtype"]): r for r in ctx.report.section("parity")}
    assert set(rows) == {(b, d) for b in ("triton", "cpp") for d in ("float32", "float16")}
    for d in ("float32", "float16"):
        assert rows[("triton", d)]["status"] == "ok" and rows[("triton", d)]["cases"] == 4
        assert rows[("cpp", d)]["status"] == "FAIL" and "S=1 plain: 1 elements differ" in rows[("cpp", d)]["note"]
    assert len(ctx.report.failures()) == 2
    late = _gpu_check_ctx(budget=0.0)  # over budget: the rows say so
    late.plan.parity_layouts = ctx.plan.parity_layouts
    late.kernels = {"triton": ctx.reference.fused_step_}
    gpu_check.check_parity(late)
    assert {r["status"] for r in late.report.section("parity")} == {"skipped"}
    assert all(late.over_budget(phase) for phase in gpu_check.PHASE_SHARE)


def test_gpu_check_large_step_windows():
    ctx = _gpu_check_ctx()

    def off_at_the_boundary(params, grads, duals, *rest):
        ctx.reference.fused_step_(params, grads, duals, *rest)
        params[0][4096] = 0.0

    ctx.kernels = {"triton": ctx.reference.fused_step_, "cpp": off_at_the_boundary}
    gpu_check.check_large(ctx, P=10_000, boundary=4096, W=256)
    rows = {r["backend"]: r for r in ctx.report.section("check")}
    assert rows["triton"]["status"] == "ok" and rows["triton"]["check"] == "P = 10000, windows"
    assert rows["cpp"]["status"] == "FAIL" and rows["cpp"]["note"].startswith("1 elements differ")


CUOBJDUMP_SAMPLE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,7]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN9badm_fast4cuda12_GLOBAL__N_117fused_step_kernelIfLb1EEEvNS0_11StepScalarsENS0_9StepTableE:
  REG:40 STACK:0 SHARED:256 LOCAL:0 CONSTANT[0]:3040 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z12check_kernelv:REG:24 STACK:8 SHARED:0 LOCAL:16 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin ptx code:
================
arch = sm_90
"""

PTXAS_SAMPLE = """
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    64 bytes stack frame, 64 bytes spill stores, 64 bytes spill loads
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_90'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, 384 bytes cmem[0]
"""


def test_gpu_check_parses_cuobjdump_and_ptxas():
    rows = gpu_check.parse_cuobjdump(CUOBJDUMP_SAMPLE)
    assert [(r["arch"], r["regs"], r["stack"], r["shared"], r["local"]) for r in rows] == [
        ("sm_90", 40, 0, 256, 0), ("sm_90", 24, 8, 0, 16)]  # fmt: skip
    assert rows[1]["kernel"] == "_Z12check_kernelv"
    names = gpu_check.demangle([rows[0]["kernel"], "_Z12check_kernelv"])
    if shutil_which("c++filt"):
        assert names[rows[0]["kernel"]] == "fused_step_kernel<float, true>"
        assert names["_Z12check_kernelv"] == "check_kernel"
    rows = gpu_check.parse_ptxas(PTXAS_SAMPLE)
    assert [(r["kernel"], r["regs"], r["stack"], r["spill_stores"], r["spill_loads"], r["shared"]) for r in rows] == [
        ("_Z6kernelPf", 255, 16, 8, 12, 4096), ("_Z5otherv", 32, 0, 0, 0, 0)]  # fmt: skip


def shutil_which(name):
    import shutil

    return shutil.which(name)


def test_gpu_check_reads_triton_compiled_kernels():
    class Compiled:
        def __init__(self, regs, spills, constants, aligned):
            self.n_regs, self.n_spills = regs, spills
            self.metadata = SimpleNamespace(num_warps=8, shared=4096, target=SimpleNamespace(arch=90))
            self.src = SimpleNamespace(signature={"tab_ptr": "*i64", "z_like_ptr": "*bf16", "R": "i32"},
                                       constants=constants, attrs={(1,): [["tt.divisibility", 16]]} if aligned else {})

    arg_names = ["tab_ptr", "z_like_ptr", "R", "HAS_RESIDUALS", "BLOCK"]
    kernels = {"a": Compiled(40, 0, {(3,): True, (4,): 2048}, True),
               "b": Compiled(64, 2, {(3,): False, (2,): 1}, False)}
    step = SimpleNamespace(__name__="_badm_step_kernel", arg_names=arg_names,
                           device_caches={0: (kernels, {}, None, None, None)})  # triton 3.x layout
    old = SimpleNamespace(__name__="_badm_copy_kernel", arg_names=[], cache={0: {"k": Compiled(16, 0, {}, False)}})
    rows = gpu_check.triton_resource_rows(SimpleNamespace(_badm_step_kernel=step, _badm_copy_kernel=old))
    assert [(r["regs"], r["spills"], r["arch"], r["shared"]) for r in rows] == [
        (40, 0, "sm_90", 4096), (64, 2, "sm_90", 4096), (16, 0, "sm_90", 4096)]  # fmt: skip
    assert rows[0]["kernel"] == "_badm_step_kernel[bf16 HAS_RESIDUALS=1 BLOCK=2048 z%16B warps=8]"
    assert rows[1]["kernel"] == "_badm_step_kernel[bf16 HAS_RESIDUALS=0 R=1 warps=8]"


def test_gpu_check_report_tables_and_files(tmp_path):
    report = gpu_check.Report(time.perf_counter(), echo=lambda line: None)
    report.log("hello")
    report.add("parity", backend="triton", layout="1 tensor", dtype="float32", cases=3, note="a | b")
    report.add("time", case="torch Adam(fused=True)", backend="torch", dtype="float32", P=1 << 24, tensors=1, S="",
               ms=2.0, gbps=100.0)
    report.add("time", case="BADM.step", backend="triton", dtype="float32", P=1 << 24, tensors=1, S=4, ms=4.0,
               gbps=150.0, of_copy=0.5)
    report.add("check", check="capture", backend="cuda", status="FAIL", note="differs")
    gpu_check.add_ratios(report)
    step = report.section("time")[1]
    assert step["vs_adam"] == pytest.approx(1.5) and step["ms_vs_adam"] == pytest.approx(2.0)
    md = report.markdown(["## title"])
    assert "### Parity with reference.fused_step_ (bit for bit)" in md and "### Optimizer checks" in md
    assert "| BADM.step | triton | float32 | 16M | 1 | 4 | 4.000 |  | 150 | 50% | 1.50 |" in md
    assert "a \\| b" in md and "### Registers and spills" not in md  # empty sections are left out
    assert [r["check"] for r in report.failures()] == ["capture"]
    paths = report.write(str(tmp_path / "out"), {"gpu": "X"}, ["## title"])
    assert [Path(p).name for p in paths] == list(gpu_check.OUT_FILES)
    with open(paths[0]) as f:
        rows = list(csv.DictReader(f))
    assert [r["section"] for r in rows] == ["parity", "time", "time", "check"] and rows[0]["gpu"] == "X"
    assert Path(paths[1]).read_text() == md and "hello" in Path(paths[2]).read_text()


def test_gpu_check_time_calls_median_and_spread():
    ctx = _gpu_check_ctx()
    ctx.args.reps, ctx.args.warmup = 5, 1
    calls = []
    median, p10, p90 = gpu_check.time_calls(ctx, lambda: calls.append(1), reps=5, warmup=2)
    assert len(calls) == 7 and 0 <= p10 <= median <= p90
    row = gpu_check.add_timing(ctx, dict(case="x", backend="b", dtype="float32", P=10, tensors=1, S=1), 1000,
                               lambda: (lambda: None))  # fmt: skip
    assert row["status"] == "ok" and row["gbps"] > 0
    row = gpu_check.add_timing(ctx, dict(case="y", backend="b", dtype="float32", P=10, tensors=1, S=1), 1000,
                               lambda: 1 / 0)  # fmt: skip
    assert row["status"] == "error" and row["note"].startswith("ZeroDivisionError")


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_and_writes_only_to_out(tmp_path):
    """The whole script on CPU (--cpu-smoke): every check passes, every section has rows, and the
    only files written are the three under --out (the working directory stays empty)."""
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BADM_FAST_BACKEND")}
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.join(BENCH_DIR, "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(gpu_check.OUT_FILES)
    with open(tmp_path / "out" / "gpu_check.csv") as f:
        rows = list(csv.DictReader(f))
    by = {}
    for r in rows:
        by.setdefault(r["section"], []).append(r)
    assert set(by) == {"parity", "check", "time", "resource"}
    assert not [r for r in rows if r["status"] in ("FAIL", "error")]
    backends_run = {r["backend"] for r in by["parity"]}
    assert backends_run == {"triton", "cpp"} - ({"cpp"} if not CPP_OK else set())
    assert {r["case"] for r in by["time"] if r["status"] == "ok"} >= {
        "copy (dst.copy_(src))", "torch Adam(fused=True)", "torch SGD(momentum, foreach)", "kernel",
        "kernel (reference)", "BADM.step", "BADM.step ignore", "BADM.step residuals", "BADM.step capturable",
        "BADM.step GradScaler"}  # fmt: skip
    assert {r["check"] for r in by["check"]} == {"capturable step vs eager (CPU: no graph)",
                                                 "GradScaler, forced inf and NaN skipped"}  # fmt: skip
    assert "### Timing" in proc.stdout and "skipped" not in {r["status"] for r in rows}, seconds


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
