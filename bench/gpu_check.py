"""One-shot GPU check of badm_fast: correctness of the GPU back ends and step time vs copy bandwidth.

    python bench/gpu_check.py [--out results.csv] [--quick]     # --out: also append the rows to a CSV

Runs from a source checkout on one CUDA GPU (about 3-4 minutes on an H200; ``--quick`` about
one) and needs torch with CUDA, triton, and for the ``cuda`` back end either an installed
``badm_fast._C`` with its CUDA kernel or a C++/CUDA tool chain with ninja (the extension is then
built once into build/gpu_check_ext with torch.utils.cpp_extension.load, -O3). In order:

1. correctness: the ``triton`` and ``cuda`` back ends against the fp64 reference
   (tests/parity.py ``check_kernel``) for every dtype, odd sizes, padded rows, residuals on;
   the Triton kernel with hyperparameters in device tensors; a CUDA-graph capture and replay of
   each back end; one step beyond 2**31 elements (64-bit offsets; skipped by ``--quick``).
   Optimizer level: ``BADM(capturable=True).step`` captured in a CUDA graph and replayed
   (changing rho, sigma and the weights between replays, a non-finite gradient skipped on the
   device) against eager steps; ``torch.compile`` (inductor) of a training step with
   ``opt.step()`` inside against eager, the fused step a ``badm_fast::fused_step`` node of the
   graph; ``torch.amp.GradScaler`` with forced infinities (state untouched, steps counted).
2. copy bandwidth: ``dst.copy_(src)`` of a 1 GiB buffer, read + write bytes over the median time.
3. step time, CUDA events, warm-up then the median of ``--reps`` (>= 20) timed calls, for
   P in {16M, 256M} and S in {1, 4, 8} (fp32 and bf16 parameters) for the ``triton``, ``cuda``
   and ``torch`` (reference) back ends, and torch.optim.Adam(fused=True) and
   SGD(momentum=0.9, foreach=True) on P elements; plus a sweep of Triton launch configurations.

Bytes moved per step are counted per buffer: BADM reads z, S gradient rows and S dual rows and
writes S dual rows and z, with z and gradients in the parameter dtype and duals in fp32 (fp64
for fp64), i.e. (3S + 2) * P * 4 bytes for fp32 parameters. Adam(fused) moves 7 values per
element (param r/w, grad, exp_avg r/w, exp_avg_sq r/w); SGD with momentum 5 nominal values
(param r/w, grad, momentum buffer r/w; foreach runs several kernels, so its real traffic is
higher and the GB/s shown is an effective rate). GB/s = bytes / median time; "of copy" is that
rate over the measured copy bandwidth.

Prints one markdown table and, with ``--out``, appends every row to that CSV with the machine, GPU, torch,
triton and CUDA versions and the date. A back end that fails (missing, build error, wrong
result, out of memory) is reported in the table and does not stop the others.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import glob
import importlib
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        default=None,
        help="CSV file the rows are appended to (default: none, the table is printed only)",
    )
    ap.add_argument("--quick", action="store_true", help="P = 16M only, S in {1, 4}, no 2**31 check, short sweep")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per case, median reported (>= 20; default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default: %(default)s)")
    build = ap.add_mutually_exclusive_group()
    build.add_argument(
        "--no-build", action="store_true", help="never build the extension; use badm_fast._C if importable"
    )
    build.add_argument(
        "--rebuild", action="store_true", help="build the extension from csrc/ even if badm_fast._C is importable"
    )
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="exercise this script on CPU with tiny sizes (Triton interpreter, C++ kernel as 'cuda'); "
        "checks the script, the numbers mean nothing",
    )
    args = ap.parse_args(argv)
    if args.reps < 20 and not args.cpu_smoke:
        ap.error("--reps must be >= 20 (the median of at least 20 timed calls)")
    return args


# --------------------------------------------------------------------------------------------
# Set-up: imports from the checkout, the extension, the back ends
# --------------------------------------------------------------------------------------------


def import_project():
    """Import badm_fast (installed or from this checkout), its kernels and tests/parity.py."""
    for p in (ROOT, os.path.join(ROOT, "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import badm_fast

    try:
        kernels = importlib.import_module("badm_fast.kernels")
    except ImportError:
        # A checkout that is not pip-installed has no badm_fast.kernels (setup.py maps the
        # top-level kernels/ folder onto it): alias it so that the dispatch finds it too.
        kernels = importlib.import_module("kernels")
        sys.modules["badm_fast.kernels"] = kernels
        badm_fast.kernels = kernels
    import parity

    return badm_fast, kernels, parity


def has_op_kernel(torch, dispatch_key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("badm_fast::fused_step_ext", dispatch_key)
    except RuntimeError:  # the op is not registered at all
        return False


def load_extension(torch, badm_fast, build, log):
    """Where the op badm_fast::fused_step_ext comes from; raises with the reason when it cannot be had.

    ``build``: "auto" imports badm_fast._C and builds it from csrc/ when that fails, "never"
    only imports, "always" builds. The build uses torch.utils.cpp_extension.load (ninja, parallel,
    into build/gpu_check_ext, the baseline CPU kernel plus the CUDA sources); without ninja it
    falls back to ``setup.py build_ext --inplace`` (serial, slower).
    """
    first_error = "--rebuild"
    if build != "always":
        try:
            importlib.import_module("badm_fast._C")
            return "installed badm_fast._C"
        except ImportError as exc:
            first_error = exc
    if build == "never":
        raise RuntimeError(f"badm_fast._C is not importable ({first_error}) and --no-build was given")
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available, load

    with_cuda = torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    t0 = time.perf_counter()
    if not is_ninja_available():
        log("ninja not found: building badm_fast._C with `setup.py build_ext --inplace` (serial) ...")
        env = dict(os.environ, BADM_FAST_FORCE_CUDA="1" if with_cuda else "0")
        env.pop("BADM_FAST_NO_EXTENSION", None)
        proc = subprocess.run(
            [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"setup.py build_ext failed: {proc.stderr.strip()[-500:]}")
        built = sorted(
            glob.glob(os.path.join(ROOT, "badm_fast", "_C*.so")) + glob.glob(os.path.join(ROOT, "badm_fast", "_C*.pyd"))
        )
        if not built:
            raise RuntimeError("setup.py build_ext produced no badm_fast/_C library")
        spec = importlib.util.spec_from_file_location("badm_fast._C", built[-1])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        # Same order as setup.py: the binding and the baseline CPU kernel first. The AVX2/AVX-512
        # variants compile to nothing without BADM_FAST_CPU_ISA_DISPATCH (CPU speed is not the
        # subject here).
        first = [os.path.join(ROOT, "csrc", f) for f in ("binding.cpp", "badm_cpu_default.cpp")]
        sources = first + [f for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) if f not in first]
        cuda_dir = os.path.join(ROOT, "csrc", "cuda")
        cuda_sources = sorted(glob.glob(os.path.join(cuda_dir, "*.cpp")) + glob.glob(os.path.join(cuda_dir, "*.cu")))
        if with_cuda and not cuda_sources:
            log("csrc/cuda/ has no sources: building the CPU kernel only")
        if with_cuda:
            sources += cuda_sources
        build_dir = os.path.join(ROOT, "build", "gpu_check_ext")
        os.makedirs(build_dir, exist_ok=True)
        log(f"building badm_fast._C from {len(sources)} sources into {os.path.relpath(build_dir, ROOT)} ...")
        mod = load(
            name="_C",  # the library's init function is PyInit__C
            sources=sources,
            extra_include_paths=[os.path.join(ROOT, "csrc")],
            extra_cflags=["-O3", "-g0", "-std=c++17", "-fopenmp"],
            extra_cuda_cflags=["-O3", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            with_cuda=with_cuda,
            verbose=False,
        )
    sys.modules["badm_fast._C"] = mod
    badm_fast._C = mod
    return f"built from csrc/ in {time.perf_counter() - t0:.0f} s (import: {first_error})"


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


class Report:
    """Rows of the check and timing tables; printed as markdown, appended to the CSV."""

    FIELDS = [
        "kind",
        "backend",
        "P",
        "S",
        "dtype",
        "ms",
        "ms_p10",
        "ms_p90",
        "bytes",
        "gbps",
        "of_copy",
        "status",
        "note",
    ]

    def __init__(self):
        self.rows = []
        self.copy_gbps = None

    def add(self, **row):
        full = {k: "" for k in self.FIELDS}
        full.update(row)
        self.rows.append(full)
        return full

    @contextlib.contextmanager
    def check(self, note_name, backend, dtype, S):
        """Record one check row: status "ok" when the body completes, "FAIL" with the exception when it raises.

        Yields the row (a dict): the body may set ``status`` and ``note`` (a check that ran but found
        a wrong result) or ``backend`` (known only once the body ran). An ``Exception`` is recorded
        (its traceback printed when GPU_CHECK_TRACEBACK is set) and not raised again, so that the
        next check runs; anything else propagates without a row.
        """
        row = dict(kind="check", note_name=note_name, backend=backend, dtype=dtype, S=S, status="ok", note="")
        try:
            yield row
        except Exception as exc:  # noqa: BLE001 - reported, the next check runs
            row.update(status="FAIL", note=_short(exc))
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                traceback.print_exc()
        self.add(**row)

    def markdown(self):
        lines = []
        checks = [r for r in self.rows if r["kind"] == "check"]
        if checks:
            lines += ["| check | backend | dtype | cases | status | note |", "|---|---|---|---|---|---|"]
            for r in checks:
                lines.append(
                    f"| {r['note_name']} | {r['backend']} | {r['dtype']} | {r['S']} | {r['status']} | "
                    f"{_md(r['note'])} |"
                )
            lines.append("")
        timed = [r for r in self.rows if r["kind"] != "check"]
        lines += ["| backend | P | S | dtype | ms | GB/s | of copy | note |", "|---|---:|---:|---|---:|---:|---:|---|"]
        for r in timed:
            ms = f"{r['ms']:.3f}" if isinstance(r["ms"], float) else ""
            gbps = (
                (f"{r['gbps']:.0f}" if r["gbps"] >= 10 else f"{r['gbps']:.2f}") if isinstance(r["gbps"], float) else ""
            )
            frac = f"{r['of_copy']:.1%}" if isinstance(r["of_copy"], float) else ""
            note = r["note"] if r["status"] in ("ok", "") else f"{r['status']}: {r['note']}"
            lines.append(
                f"| {r['backend']} | {_size(r['P'])} | {r['S']} | {r['dtype']} | {ms} | {gbps} | {frac} | {_md(note)} |"
            )
        return "\n".join(lines)

    def write_csv(self, path, meta):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(meta) + self.FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in self.rows:
                out = dict(meta)
                out.update({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
                if r["kind"] == "check":
                    out["note"] = f"{r['note_name']}: {r['note']}"
                w.writerow(out)


def _md(text):
    return str(text).replace("|", "/").replace("\n", " ")[:160]


def _size(P):
    if not isinstance(P, int):
        return str(P)
    if P >= MIB and P % MIB == 0:
        return f"{P // MIB}M"
    return str(P)


def _short(exc):
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def run_checks(ctx, report, quick):
    parity, dev = ctx.parity, ctx.device
    shapes = [(1, 1), (3, 7), (8, 4097)]
    if dev == "cuda":
        shapes += [(2, 100003), (2, (1 << 22) + 5)]  # the last: thousands of programs / thread blocks
    for name, fn in ctx.kernels.items():
        if fn is None:
            report.add(kind="check", note_name="parity", backend=name, status="missing", note=ctx.missing[name])
            continue
        for dtype in parity.ALL_DTYPES:
            failures, n = [], 0
            for S, P in shapes:
                for row_pad in (0, 3):
                    n += 1
                    try:
                        parity.check_kernel(
                            fn, S, P, dtype, device=dev, seed=P + S + row_pad, row_pad=row_pad, residuals=True
                        )
                    except Exception as exc:  # noqa: BLE001 - reported, the next case runs
                        failures.append(f"S={S} P={P} pad={row_pad}: {_short(exc)}")
            report.add(
                kind="check",
                note_name="parity vs fp64 reference",
                backend=name,
                dtype=_dt(dtype),
                S=n,
                status="ok" if not failures else f"FAIL {len(failures)}/{n}",
                note="; ".join(failures[:2]),
            )
    if ctx.kernels.get("triton") is not None:
        check_tensor_hypers(ctx, report)
    for name, fn in ctx.kernels.items():
        if fn is not None and dev == "cuda":
            check_graph_capture(ctx, report, name, fn)
    if not quick and dev == "cuda":
        for name, fn in ctx.kernels.items():
            if fn is not None:
                check_int64(ctx, report, name, fn)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# Optimizer-level checks: CUDA-graph capture of a capturable BADM step, torch.compile of a
# training step, GradScaler with forced infinities. A small MLP, S = 3 (S = 1 for compile).
# --------------------------------------------------------------------------------------------


def _mlp(torch, device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)).to(device)


def _batch(torch, device, step, n=96):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 64, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def _backward(torch, model, opt, x, y, scale=None):
    opt.zero_grad()
    for s, (xs, ys) in enumerate(zip(x.chunk(opt.sub_batches), y.chunk(opt.sub_batches))):
        with opt.sub_batch(s):
            loss = torch.nn.functional.cross_entropy(model(xs), ys)
            (loss if scale is None else scale(loss)).backward()


def _opt_state(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    return params + [opt.state[p]["duals"].clone() for p in model.parameters()]


def _max_diff(a, b):
    return max((float((u.double() - v.double()).abs().max()) for u, v in zip(a, b) if u.numel()), default=0.0)


def _verdict(result, ok, note):
    result.update(status="ok" if ok else "FAIL", note=note)


def check_optimizer_capture(ctx, report, backend):
    """BADM(capturable=True).step captured once in a CUDA graph and replayed for 5 steps, against
    an eager capturable twin: rho/sigma and the weights change between replays (device tensors),
    and a step with an infinite gradient in sub-batch 1 is skipped on the device. On CPU (smoke)
    the replays are eager calls."""
    torch, dev = ctx.torch, ctx.device
    BADM = ctx.badm_fast.BADM
    name = "BADM(capturable) step, CUDA graph replays" if dev == "cuda" else "BADM(capturable) step (no graph: CPU)"
    try:
        with report.check(name, backend, "float32", 3) as result:
            if backend not in ctx.badm_fast.backends.CAPTURABLE:
                try:
                    BADM(_mlp(torch, dev).parameters(), backend=backend, capturable=True)
                except ctx.badm_fast.BackendUnavailable as exc:
                    result["note"] = f"refused as designed: {str(exc)[:120]}"
                    return
                raise AssertionError(f"capturable=True accepted backend {backend!r}, whose kernel takes host floats")
            g_model, e_model = _mlp(torch, dev), _mlp(torch, dev)
            kw = dict(sub_batches=3, rho=1.0, sigma=4.0, backend=backend, capturable=True)
            opt_g, opt_e = BADM(g_model.parameters(), **kw), BADM(e_model.parameters(), **kw)
            w = torch.tensor([1.0, 2.0, 3.0], device=dev)  # the graph reads it at each replay
            graph, worst, skipped_ok = None, 0.0, True
            for step in range(6):
                x, y = _batch(torch, dev, step)
                _backward(torch, g_model, opt_g, x, y)
                _backward(torch, e_model, opt_e, x, y)
                if step == 3:  # new hyperparameters and weights, written outside the graph
                    for o in (opt_g, opt_e):
                        o.param_groups[0].update(rho=2.5, sigma=5.0)
                    opt_g.device_state.load_hyperparameters(opt_g.param_groups)
                    w.copy_(torch.tensor([3.0, 1.0, 1.0]))
                if step == 4:  # skipped on the device by both
                    for o in (opt_g, opt_e):
                        o._buffers[0][0].grads[1, 7] = float("inf")
                    before = _opt_state(g_model, opt_g)
                opt_e.step(weights=w, residuals=True)
                if step == 0 or dev != "cuda":  # warm-up (compiles the kernels) on a side stream
                    if dev == "cuda":
                        side = torch.cuda.Stream()
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            opt_g.step(weights=w, residuals=True)
                        torch.cuda.current_stream().wait_stream(side)
                    else:
                        opt_g.step(weights=w, residuals=True)
                else:
                    if graph is None:
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            opt_g.step(weights=w, residuals=True)
                    graph.replay()
                if dev == "cuda":
                    torch.cuda.synchronize()
                state_g = _opt_state(g_model, opt_g)
                worst = max(worst, _max_diff(state_g, _opt_state(e_model, opt_e)))
                if step == 4:
                    skipped_ok = _max_diff(state_g, before) == 0.0
            res = _max_diff(
                [opt_g.residuals["primal"], opt_g.residuals["dual"]],
                [opt_e.residuals["primal"], opt_e.residuals["dual"]],
            )
            counts = (int(opt_g.skipped_steps_tensor), int(opt_e.skipped_steps_tensor))
            ok = (
                worst <= 1e-6 and skipped_ok and counts == (1, 1) and res <= 1e-6 * (1 + float(opt_e.residuals["dual"]))
            )
            _verdict(
                result,
                ok,
                f"max |graph - eager| {worst:.1e} over 6 steps (weights/rho/sigma changed, 1 inf skipped: "
                f"state untouched {skipped_ok}, device counters {counts}); residuals diff {res:.1e}",
            )
    finally:
        ctx.free()


def check_compiled_training_step(ctx, report):
    """torch.compile (inductor on CUDA, aot_eager on CPU) of zero_grad/forward/backward/opt.step()
    on an MLP, S = 1, backend "auto", 3 steps against eager; the fused step must be a
    ``badm_fast::fused_step`` node of a captured graph."""
    torch, dev = ctx.torch, ctx.device
    compiler = "inductor" if dev == "cuda" else "aot_eager"
    name = f"torch.compile({compiler}) training step"
    try:
        with report.check(name, "auto", "float32", 1) as result:
            torch._dynamo.reset()
            model, twin = _mlp(torch, dev), _mlp(torch, dev)
            opt = ctx.badm_fast.BADM(model.parameters(), rho=1.0, sigma=4.0)
            opt_twin = ctx.badm_fast.BADM(twin.parameters(), rho=1.0, sigma=4.0)
            result["backend"] = opt.backend
            graphs = []

            def recording(gm, example_inputs):
                graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
                return torch._dynamo.backends.registry.lookup_backend(compiler)(gm, example_inputs)

            def make(m, o):
                def train_step(x, y):
                    o.zero_grad()
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                    loss.backward()
                    o.step()
                    return loss

                return train_step

            compiled, eager = torch.compile(make(model, opt), backend=recording), make(twin, opt_twin)
            t0 = time.perf_counter()
            loss_diff = 0.0
            for step in range(3):
                x, y = _batch(torch, dev, step)
                loss_diff = max(loss_diff, abs(float(compiled(x, y).detach()) - float(eager(x, y).detach())))
            seconds = time.perf_counter() - t0
            diff = _max_diff(_opt_state(model, opt), _opt_state(twin, opt_twin))
            in_graph = any("badm_fast.fused_step.default" in g for g in graphs)
            # Inductor fuses and reorders float ops of the forward and backward: a few fp32 ulps per
            # op; three steps of size 1/sigma = 0.25 keep the difference far below 1e-4.
            ok = in_graph and diff <= 1e-4 and loss_diff <= 1e-4 and opt._step_count == 3
            _verdict(
                result,
                ok,
                f"max |compiled - eager| {diff:.1e} (weights, duals), {loss_diff:.1e} (loss); "
                f"fused_step node in graph: {in_graph}; {len(graphs)} graphs, {seconds:.0f} s with compilation",
            )
    finally:
        torch._dynamo.reset()
        ctx.free()


def check_grad_scaler(ctx, report, backend):
    """GradScaler over 5 steps against an unscaled twin (power-of-two scales: equal). Step 2: an
    infinity in the last sub-batch's row (the .grad GradScaler checks: the scale halves); step 3: a
    NaN in row 0 (seen only by BADM's check of every row). Both steps are skipped with the state
    untouched, then redone. With the Triton back end on CUDA the unscale runs inside the fused
    pass and the skips are counted on the device (skipped_steps_tensor)."""
    torch, dev = ctx.torch, ctx.device
    name = "GradScaler, forced inf/NaN skipped"
    try:
        with report.check(name, backend, "float32", 3) as result:
            a, b = _mlp(torch, dev), _mlp(torch, dev)
            kw = dict(sub_batches=3, rho=2.0, sigma=4.0, backend=backend)
            opt_a, opt_b = ctx.badm_fast.BADM(a.parameters(), **kw), ctx.badm_fast.BADM(b.parameters(), **kw)
            scaler = torch.amp.GradScaler(dev, init_scale=2.0**12, growth_interval=1000)
            untouched, worst = True, 0.0
            for step in range(5):
                x, y = _batch(torch, dev, step)
                _backward(torch, a, opt_a, x, y)
                opt_a.step()
                for attempt in range(2 if step in (2, 3) else 1):
                    _backward(torch, b, opt_b, x, y, scale=scaler.scale)
                    if attempt == 0 and step in (2, 3):
                        row, bad = (2, float("inf")) if step == 2 else (0, float("nan"))
                        opt_b._buffers[0][0].grads[row, 11] = bad
                        before = _opt_state(b, opt_b)
                    scaler.step(opt_b)
                    scaler.update()
                    if attempt == 0 and step in (2, 3):
                        untouched = untouched and _max_diff(before, _opt_state(b, opt_b)) == 0.0
                worst = max(worst, _max_diff(_opt_state(a, opt_a), _opt_state(b, opt_b)))
            skipped = opt_b.skipped_steps + int(opt_b.skipped_steps_tensor)
            scale = scaler.get_scale()
            ok = untouched and skipped == 2 and scale == 2.0**11 and worst <= 1e-6
            where = "device" if int(opt_b.skipped_steps_tensor) else "host"
            _verdict(
                result,
                ok,
                f"state untouched {untouched}; {skipped} skips counted on the {where}; scale 2**12 -> {scale:g}; "
                f"max |scaled - unscaled run| {worst:.1e}",
            )
    finally:
        ctx.free()


def run_optimizer_checks(ctx, report, ext_name):
    available = [n for n in ("triton", ext_name) if ctx.kernels.get(n) is not None]
    for backend in available + ["torch"]:
        check_optimizer_capture(ctx, report, backend)
    for backend in available:
        check_grad_scaler(ctx, report, backend)
    check_compiled_training_step(ctx, report)


def check_tensor_hypers(ctx, report):
    torch, parity, dev = ctx.torch, ctx.parity, ctx.device
    step_fn = ctx.kernels["triton"]
    failures, n = [], 0
    for dtype in parity.ALL_DTYPES:
        hdt = torch.float64 if dtype == torch.float64 else torch.float32

        def step(z, grads, duals, weights, rho, sigma, residuals=None, _hdt=hdt):
            step_fn(
                z,
                grads,
                duals,
                weights,
                torch.tensor(rho, dtype=_hdt, device=z.device),
                torch.tensor(sigma, dtype=_hdt, device=z.device),
                residuals,
            )

        for S, P in [(1, 7), (3, 100003)]:
            n += 1
            try:
                parity.check_kernel(step, S, P, dtype, device=dev, seed=S, row_pad=3, residuals=True)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{_dt(dtype)} S={S} P={P}: {_short(exc)}")
    report.add(
        kind="check",
        note_name="rho/sigma as device tensors",
        backend="triton",
        dtype="all",
        S=n,
        status="ok" if not failures else f"FAIL {len(failures)}/{n}",
        note="; ".join(failures[:2]),
    )


def check_graph_capture(ctx, report, name, fn):
    """Capture one step in a CUDA graph, replay it twice, compare with two reference steps."""
    torch, parity = ctx.torch, ctx.parity
    with report.check("CUDA graph capture + 2 replays", name, "float32", 1):
        (z, grads, duals, weights, rho, sigma), _ = parity.make_inputs(3, 100003, torch.float32, "cuda", seed=9)
        want_z, want_d = z.double().cpu(), duals.double().cpu()
        for _ in range(2):
            parity.reference.fused_step_(want_z, grads.double().cpu(), want_d, weights.double().cpu(), rho, sigma)
        if name == "triton":  # the capture-safe form: hyperparameters in device tensors
            hyper = (torch.tensor(rho, device="cuda"), torch.tensor(sigma, device="cuda"))
        else:
            hyper = (rho, sigma)
        # Warm up (Triton compiles here) on copies, on a side stream as capture requires.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(z.clone(), grads, duals.clone(), weights, *hyper)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(z, grads, duals, weights, *hyper)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(z.double().cpu(), want_z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(duals.double().cpu(), want_d, rtol=1e-5, atol=1e-5)


def check_int64(ctx, report, name, fn):
    """One step on P = 2**31 + 4099 bf16 elements; windows at the start, across 2**31 and at the end."""
    torch, parity = ctx.torch, ctx.parity
    P, W = (1 << 31) + 4099, MIB
    z = grads = duals = None
    try:
        with report.check("P = 2**31 + 4099 (64-bit offsets)", name, "bfloat16", 1):
            gen = torch.Generator(device="cuda").manual_seed(0)
            z = torch.randn(P, device="cuda", dtype=torch.bfloat16, generator=gen)
            grads = torch.randn(1, P, device="cuda", dtype=torch.bfloat16, generator=gen)
            duals = torch.randn(1, P, device="cuda", dtype=torch.float32, generator=gen)
            weights = torch.ones(1, device="cuda")
            rho, sigma = 0.7, 1.3
            windows = [slice(0, W), slice((1 << 31) - W // 2, (1 << 31) + W // 2), slice(P - W, P)]
            want = []
            for w in windows:
                zw, dw = z[w].clone(), duals[:, w].clone()
                parity.reference.fused_step_(zw, grads[:, w], dw, weights, rho, sigma)
                want.append((zw, dw))
            fn(z, grads, duals, weights, rho, sigma)
            torch.cuda.synchronize()
            rtol, atol = parity.TOLERANCES[torch.bfloat16]
            for w, (zw, dw) in zip(windows, want):
                torch.testing.assert_close(z[w].float(), zw.float(), rtol=rtol, atol=atol)
                torch.testing.assert_close(duals[:, w], dw, rtol=2e-6, atol=2e-6)
    finally:
        del z, grads, duals
        ctx.free()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_fn(ctx, fn, reps, warmup):
    """(median, p10, p90) milliseconds of ``fn()``, each call timed with its own CUDA events."""
    torch = ctx.torch
    for _ in range(warmup):
        fn()
    if ctx.device != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    else:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), q[0], q[-1]


def add_timing(ctx, report, backend, P, S, dtype, nbytes, fn, reps, warmup, note=""):
    row = dict(kind="time", backend=backend, P=P, S=S, dtype=_dt(dtype), bytes=nbytes, note=note)
    try:
        ms, p10, p90 = time_fn(ctx, fn, reps, warmup)
        gbps = nbytes / (ms * 1e-3) / 1e9
        row.update(ms=ms, ms_p10=p10, ms_p90=p90, gbps=gbps, status="ok")
        if report.copy_gbps:
            row["of_copy"] = gbps / report.copy_gbps
    except Exception as exc:  # noqa: BLE001 - one failing case never stops the others
        row.update(status="error", note=_short(exc))
        ctx.free()
    report.add(**row)
    ctx.log(
        f"  {backend:<22} P={_size(P):>5} S={S} {_dt(dtype):<9} "
        + (f"{row['ms']:.3f} ms  {row['gbps']:.0f} GB/s" if row.get("status") == "ok" else row["note"])
    )


def measure_copy(ctx, report, reps, warmup):
    torch = ctx.torch
    n = ctx.copy_elems
    src = torch.empty(n, device=ctx.device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    add_timing(
        ctx,
        report,
        "copy (torch dst.copy_)",
        n,
        "",
        torch.float32,
        nbytes,
        lambda d=dst, s=src: d.copy_(s),
        reps,
        warmup,
        note=f"{nbytes / 2**30:.0f} GiB read + write",
    )
    if report.rows[-1]["status"] == "ok":
        report.copy_gbps = report.rows[-1]["gbps"]
        report.rows[-1]["of_copy"] = 1.0
    del src, dst
    ctx.free()


def badm_bytes(P, S, dtype, torch):
    isz = torch.empty((), dtype=dtype).element_size()
    csz = 8 if dtype == torch.float64 else 4
    return P * (2 * isz + S * isz + 2 * S * csz)


def time_badm(ctx, report, P, S, dtype, reps, warmup, backends):
    torch = ctx.torch
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    try:
        z = torch.empty(P, device=ctx.device, dtype=dtype).normal_()
        grads = torch.empty(S, P, device=ctx.device, dtype=dtype).normal_()
        duals = torch.empty(S, P, device=ctx.device, dtype=cdt).normal_()
    except Exception as exc:  # noqa: BLE001
        for name in backends:
            report.add(
                kind="time", backend=name, P=P, S=S, dtype=_dt(dtype), status="error", note=f"allocation: {_short(exc)}"
            )
        ctx.free()
        return
    weights = torch.full((S,), 1.0 / S, device=ctx.device, dtype=cdt)
    nbytes = badm_bytes(P, S, dtype, torch)
    for name in backends:
        fn = ctx.kernels.get(name) if name != "torch" else ctx.reference_step
        if fn is None:
            report.add(
                kind="time",
                backend=name,
                P=P,
                S=S,
                dtype=_dt(dtype),
                status="missing",
                note=ctx.missing.get(name, "unavailable"),
            )
            continue
        add_timing(
            ctx,
            report,
            name,
            P,
            S,
            dtype,
            nbytes,
            lambda fn=fn, a=(z, grads, duals, weights): fn(*a, 0.9, 1.0),
            reps,
            warmup,
        )
    del z, grads, duals
    ctx.free()


def time_torch_optim(ctx, report, P, dtype, reps, warmup):
    torch = ctx.torch
    isz = torch.empty((), dtype=dtype).element_size()
    cases = [
        ("torch Adam(fused=True)", 7, lambda ps: torch.optim.Adam(ps, lr=1e-4, fused=True)),
        ("torch SGD(mom, foreach)", 5, lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True)),
    ]
    for name, values, make in cases:
        p = opt = None
        try:
            p = torch.nn.Parameter(torch.empty(P, device=ctx.device, dtype=dtype).normal_())
            p.grad = torch.empty_like(p).normal_()
            opt = make([p])
            opt.step()  # creates the state
            add_timing(
                ctx,
                report,
                name,
                P,
                1,
                dtype,
                values * P * isz,
                opt.step,
                reps,
                warmup,
                note=f"{values} values/element",
            )
        except Exception as exc:  # noqa: BLE001
            report.add(kind="time", backend=name, P=P, S=1, dtype=_dt(dtype), status="error", note=_short(exc))
        del p, opt
        ctx.free()


def triton_sweep(ctx, report, P, S, dtype, reps, warmup, configs):
    """Step time of the Triton kernel for several (block size, warps) launch configurations."""
    torch = ctx.torch
    step = ctx.kernels.get("triton")
    if step is None:
        return
    badm_triton = importlib.import_module(ctx.kernels_pkg.__name__ + ".badm_triton")
    default = badm_triton.default_launch_config(dtype)
    z = torch.empty(P, device=ctx.device, dtype=dtype).normal_()
    grads = torch.empty(S, P, device=ctx.device, dtype=dtype).normal_()
    duals = torch.empty(S, P, device=ctx.device, dtype=torch.float32).normal_()
    weights = torch.full((S,), 1.0 / S, device=ctx.device)
    nbytes = badm_bytes(P, S, dtype, torch)
    for block, warps in configs:
        note = f"BLOCK={block} num_warps={warps}" + (" (default)" if (block, warps) == default else "")
        add_timing(
            ctx,
            report,
            "triton sweep",
            P,
            S,
            dtype,
            nbytes,
            lambda b=block, w=warps, a=(z, grads, duals, weights): step(*a, 0.9, 1.0, block_size=b, num_warps=w),
            reps,
            warmup,
            note=note,
        )
    del z, grads, duals
    ctx.free()


# --------------------------------------------------------------------------------------------


class Context:
    def __init__(self, torch, parity, device, log):
        self.torch, self.parity, self.device, self.log = torch, parity, device, log
        self.kernels = {}  # back end -> fused-step function or None
        self.missing = {}  # back end -> why it is missing
        self.reference_step = parity.reference.fused_step_
        self.copy_elems = 1 << 28  # 1 GiB of fp32

    def free(self):
        import gc

        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.pop("TRITON_INTERPRET", None) is not None:
        log("TRITON_INTERPRET was set: unset for this run (the GPU kernels must be compiled)")

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit(
            f"gpu_check: no CUDA device is available (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); run it on a machine with an NVIDIA GPU and a CUDA build of torch "
            "(or --cpu-smoke to exercise the script on CPU)"
        )
    device = "cpu" if args.cpu_smoke else "cuda"
    badm_fast, kernels, parity = import_project()
    ctx = Context(torch, parity, device, log)
    ctx.kernels_pkg = kernels
    ctx.badm_fast = badm_fast
    report = Report()

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=platform.node(),
        gpu=torch.cuda.get_device_name() if device == "cuda" else f"CPU smoke ({platform.processor() or 'cpu'})",
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda or "",
        quick=int(args.quick),
    )
    log(f"{meta['gpu']} | torch {meta['torch']} (CUDA {meta['cuda']}) | triton {meta['triton']}")

    # Back ends.
    if kernels.triton_available():
        ctx.kernels["triton"] = kernels.badm_step
    else:
        ctx.kernels["triton"] = None
        ctx.missing["triton"] = kernels.triton_unavailable_reason()
    ext_name = "cuda" if device == "cuda" else "cpp"
    try:
        build = "never" if args.no_build else "always" if args.rebuild else "auto"
        origin = load_extension(torch, badm_fast, build, log)
        key = "CUDA" if device == "cuda" else "CPU"
        if not has_op_kernel(torch, key):
            raise RuntimeError(f"badm_fast._C ({origin}) has no {key} kernel of badm_fast::fused_step_ext")
        ctx.kernels[ext_name] = torch.ops.badm_fast.fused_step_ext
        log(f"extension: {origin}")
    except Exception as exc:  # noqa: BLE001
        ctx.kernels[ext_name] = None
        ctx.missing[ext_name] = _short(exc)
        log(f"extension unavailable: {_short(exc)}")
        if os.environ.get("GPU_CHECK_TRACEBACK"):
            traceback.print_exc()

    # 1. correctness
    log("correctness checks ...")
    run_checks(ctx, report, args.quick or args.cpu_smoke)
    log("optimizer checks (CUDA-graph capture, torch.compile, GradScaler) ...")
    run_optimizer_checks(ctx, report, ext_name)
    for r in report.rows:
        log(f"  {r['note_name']:<36} {r['backend']:<7} {r['dtype']:<9} {r['status']} {r['note']}")

    # 2. copy bandwidth, 3. step times
    reps, warmup = args.reps, args.warmup
    if args.cpu_smoke:
        sizes, subs, dtypes, ctx.copy_elems = [4099], [1, 2], [torch.float32, torch.bfloat16], 1 << 16
        reps, warmup = min(reps, 3), 1
    elif args.quick:
        sizes, subs, dtypes = [16 * MIB], [1, 4], [torch.float32, torch.bfloat16]
    else:
        sizes, subs, dtypes = [16 * MIB, 256 * MIB], [1, 4, 8], [torch.float32, torch.bfloat16]
    log("copy bandwidth ...")
    measure_copy(ctx, report, reps, warmup)
    log("step times ...")
    for dtype in dtypes:
        for P in sizes:
            for S in subs:
                time_badm(ctx, report, P, S, dtype, reps, warmup, ["triton", ext_name, "torch"])
            time_torch_optim(ctx, report, P, dtype, reps, warmup)
    log("Triton launch configurations ...")
    configs = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8)]
    if args.quick or args.cpu_smoke:
        configs = [(1024, 4), (2048, 8), (4096, 8)]
    for dtype in (torch.float32, torch.bfloat16):
        try:
            triton_sweep(ctx, report, sizes[-1], 4 if not args.cpu_smoke else 2, dtype, reps, warmup, configs)
        except Exception as exc:  # noqa: BLE001
            report.add(
                kind="time",
                backend="triton sweep",
                P=sizes[-1],
                S=4,
                dtype=_dt(dtype),
                status="error",
                note=_short(exc),
            )
            ctx.free()

    print()
    print(f"## badm_fast gpu_check: {meta['gpu']}, {meta['date']}")
    print(
        f"torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}; "
        f"copy bandwidth {report.copy_gbps or float('nan'):.0f} GB/s; median of {reps} timed calls"
    )
    print()
    print(report.markdown())
    if args.out:
        report.write_csv(args.out, meta)
        print(f"\n{len(report.rows)} rows appended to {args.out}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    failed = [r for r in report.rows if r["kind"] == "check" and r["status"] not in ("ok",)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
