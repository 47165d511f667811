#!/usr/bin/env python
"""One-shot GPU check of badm_fast: the GPU back ends bit for bit against the reference, and the
time of ``BADM.step()`` against the copy bandwidth and torch.optim's Adam and SGD.

    python bench/gpu_check.py [--out DIR] [--quick] [--budget S]   # one CUDA GPU
    python bench/gpu_check.py --cpu-smoke [--out DIR]              # the script itself, on CPU

Needs torch with CUDA, triton, and for the ``cuda`` back end either an installed
``badm_fast._C`` with its CUDA kernels or nvcc, a C++ compiler and ninja: the extension is then
built once with ``torch.utils.cpp_extension.load`` from ``csrc/`` (the flags of setup.py:
``-O3 -ffp-contract=off`` for C++, ``-O3 --fmad=false`` for nvcc), into ``--build-dir`` (default:
``DIR/ext`` with ``--out``, else a temporary folder removed at exit). Meant to take about 5
minutes on one H200 with the build, and under 8: ``--budget`` (default 420 s from the start)
stops starting new cases, each phase by its share of it, and the skipped ones are rows of the
table; ``--quick`` about half. In order:

1. Parity, every case compared bit for bit with :func:`badm_fast.reference.fused_step_` run on
   the same inputs and device (the contract promises the reference's bits in every dtype; the
   residual sums, reduced in another order, within ``RESIDUAL_RTOL``): ``triton`` and ``cuda``,
   fp32/fp64/bf16/fp16, S in the timing's sub-batch counts, for every variant of the kernel
   that the timing runs (plain; the non-finite flag of the default policy; residuals;
   GradScaler's flag and inverse scale; a raised flag, which must change nothing), on one
   tensor with P % 16 == 0, one odd-sized tensor, an unaligned tensor with padded rows, 161
   tensors (ResNet-50's shapes), 161 odd-sized unaligned tensors with padded rows, three without a
   gradient and an empty one, and the timing's own sizes (16M, one tensor and 161). Every
   tensor is a view into a NaN-poisoned buffer, so a read or write outside it shows. Without
   ``--quick``: one step of 2**31 + 4099 elements (64-bit offsets), windows compared.
2. Optimizer checks: ``BADM(capturable=True).step()`` captured once in a CUDA graph and
   replayed (lr/momentum tensors and weights changed in place between replays, a non-finite
   gradient skipped on the device) against the same steps taken eagerly, capturable and
   host-checked; ``torch.amp.GradScaler`` with a forced infinity and a NaN (state untouched,
   skips counted, scale halved once) against an unscaled twin.
3. Registers and spills of every kernel compiled so far (the parity ran every variant that the
   timing runs): the CUDA extension's from ``cuobjdump --dump-resource-usage`` of its library
   (else from ``nvcc -Xptxas=-v`` of csrc/cuda/badm_kernel.cu), the Triton kernels' from their
   compiled ``n_regs``/``n_spills``.
4. Timing, CUDA events around each call, the median of ``--reps`` calls after ``--warmup``:
   ``dst.copy_(src)`` of 1 GiB (read + write bytes); for fp32/bf16/fp16/fp64, P in {16M, 256M}
   as one tensor and as 161 tensors, S in {1, 4, 8}: the kernels alone (triton, cuda; the
   torch reference at 16M), and ``BADM.step()`` end to end for each back end: the default
   policy (the non-finite check reads the gradients once more), ``on_nonfinite="ignore"``,
   ``step(residuals=True)``, the replay of a CUDA graph of a capturable step, and
   ``scaler.step(opt); scaler.update()``; Adam(fused=True) and SGD(momentum=0.9, foreach=True)
   on the same parameters. GB/s = the bytes of the fused step (read z, S gradient rows, S dual
   rows; write the duals and z; duals in fp32, fp64 for fp64) over the median time, also for
   the end-to-end rows (an effective rate); Adam/SGD bytes from their actual state tensors.
   "of copy" and "vs Adam/SGD" are GB/s ratios, "ms / Adam" the time ratio.

Prints the tables; with ``--out DIR`` writes DIR/gpu_check.csv (every row, with the GPU,
versions and date), DIR/gpu_check.md and DIR/gpu_check.log; nothing is written without it. A
back end or case that fails (missing, build error, wrong bits, out of memory) is a row of the
table and never stops the others. Exit status 1 when a parity or optimizer check failed or,
on a GPU, a GPU back end is missing.

``--cpu-smoke`` runs everything that can run on CPU with small sizes: the Triton kernels under
the interpreter (TRITON_INTERPRET=1), the extension's C++ kernel (``cpp``) in the role of
``cuda``, no build, no CUDA graph (the capturable step runs eagerly); the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import datetime
import functools
import gc
import importlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
LR, MOMENTUM = 0.01, 0.9  # timing hyperparameters (the values do not change the time)
GRAD_STD = 1e-3
RESIDUAL_RTOL = 1e-9  # fp64 sums of the same terms in another order
POISON_TAIL = 5  # NaN elements after every tensor of a parity case
LARGE_P = (1 << 31) + 4099

OUT_FILES = ("gpu_check.csv", "gpu_check.md", "gpu_check.log")
# No new case of a phase starts after this share of what the set-up left of --budget.
PHASE_SHARE = {"parity": 0.5, "large": 0.55, "check": 0.6, "time": 1.0}


# ============================================================================ command line


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="folder for gpu_check.csv, gpu_check.md and gpu_check.log (default: none, print only)")
    ap.add_argument("--quick", action="store_true",
                    help="P = 16M only, S in {1, 4}, fp32 and bf16, fewer parity cases, no 2**31 check")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run everything that can run on CPU with tiny sizes (Triton interpreter, the C++ kernel "
                    "as 'cuda'): checks the script; the numbers mean nothing")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per case, the median reported (default 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds since the start after which no new case starts (default 420; 200 with --quick)")
    ap.add_argument("--build-dir", default=None,
                    help="where the extension is built (default: DIR/ext with --out, else a temporary folder)")
    build = ap.add_mutually_exclusive_group()
    build.add_argument("--no-build", action="store_true", help="never build the extension; use badm_fast._C as it is")
    build.add_argument("--rebuild", action="store_true",
                       help="build the extension from csrc/ even if badm_fast._C has CUDA kernels")
    args = ap.parse_args(argv)  # fmt: skip
    if args.reps is None:
        args.reps = 2 if args.cpu_smoke else 20
    if args.warmup is None:
        args.warmup = 1 if args.cpu_smoke else 3
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    if args.budget is None:
        args.budget = 120.0 if args.cpu_smoke else 200.0 if args.quick else 420.0
    return args


@dataclass
class Plan:
    """What one run covers (sizes for a GPU, tiny ones for --cpu-smoke)."""

    device: str
    dtypes: list
    sizes: list[int]  # P of the timing cases
    subs: list[int]  # S of the timing and parity cases
    n_list: int  # tensors of the "list" layout (ResNet-50's 161)
    copy_elems: int
    # (name, sizes, offset, row_pad, skip, flag names or None for all, dtypes or None for all)
    parity_layouts: list
    large_check: bool
    reference_max_p: int  # the torch reference is timed up to this P
    timing_dtypes: list | None = None  # None: dtypes
    timing_subs: list | None = None  # None: subs
    timing_list: int | None = None  # None: n_list
    timing_only: set | None = None  # None: every (tensors, S) timing case; else only these
    hidden: int = 256  # width of the MLP of the GradScaler check
    capture_S: int = 4  # sub-batches of the CUDA-graph check
    capture_sizes: tuple = (1000, 33, 4096, 7)  # its parameters


def make_plan(args, torch) -> Plan:
    f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
    if args.cpu_smoke:  # every code path once, small enough for the Triton interpreter
        n_list = 8
        return Plan(
            device="cpu", dtypes=[f32, bf16, f16, f64], sizes=[2051], subs=[1, 3], n_list=n_list,
            copy_elems=1 << 16, large_check=False, reference_max_p=1 << 30, timing_dtypes=[f32], timing_subs=[1, 2],
            timing_list=3, timing_only={(1, 1), (3, 2)}, hidden=4, capture_S=2,
            capture_sizes=(200, 33, 7),
            parity_layouts=[
                ("1 tensor, P % 16 == 0", [2048], 0, 0, (), None, [f32, f64]),
                ("1 tensor, odd P", [2051], 0, 0, (), None, [bf16, f16]),
                ("1 tensor, unaligned, rows padded by 3", [1031], 1, 3, (), None, [f32]),
                (f"{n_list} tensors", list_sizes(3000, n_list), 0, 0, (), ("plain", "flag+residuals", "scaler"),
                 [f32]),
                (f"{n_list} tensors, odd, unaligned, padded, 2 without grad, 1 empty",
                 odd_sizes(list_sizes(1500, n_list)), 1, 3, (2, 5), ("flag", "skipped"), [f16]),
            ],
        )  # fmt: skip
    sizes = [16 * MIB] if args.quick else [16 * MIB, 256 * MIB]
    subs = [1, 4] if args.quick else [1, 4, 8]
    few = ("plain", "flag+residuals", "scaler")  # unaligned first parameter: each variant compiles again
    layouts = [
        ("1 tensor, P = 2^20 (P % 16 == 0)", [1 << 20], 0, 0, (), None, None),
        ("1 tensor, P = 2^20 + 3", [(1 << 20) + 3], 0, 0, (), None, None),
        ("161 tensors (ResNet-50 shapes), 2^20", list_sizes(1 << 20, 161), 0, 0, (), None, None),
        ("1 tensor, unaligned, rows padded by 3", [65537], 1, 3, (), few, None),
        ("161 tensors, odd, unaligned, padded, 3 without grad, 1 empty",
         odd_sizes(list_sizes(1 << 20, 161)), 1, 3, (5, 17, 100), few, None),
        ("1 tensor, P = 16M (timing size)", [16 * MIB], 0, 0, (), few, None),
        ("161 tensors, 16M (timing size)", list_sizes(16 * MIB, 161), 0, 0, (), few, None),
    ]  # fmt: skip
    if args.quick:
        layouts = layouts[:6]  # not the 161 tensors of 16M
    return Plan(
        device="cuda", dtypes=[f32, bf16] if args.quick else [f32, bf16, f16, f64], sizes=sizes, subs=subs,
        n_list=161, copy_elems=1 << 28, parity_layouts=layouts, large_check=not args.quick,
        reference_max_p=16 * MIB,
    )  # fmt: skip


# ============================================================================ shapes and bytes


def resnet50_numels() -> list[int]:
    """Element counts of the 161 parameter tensors of torchvision's ResNet-50 (25,557,032)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            out = 4 * width
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]
    return [math.prod(s) for s in shapes]


def list_sizes(P: int, n: int = 161) -> list[int]:
    """``n`` tensor sizes adding up to ``P``: ResNet-50's (the first ``n`` of them, or all 161)
    scaled by the same factor, each at least 1; the largest absorbs the rounding."""
    base = resnet50_numels()[:n]
    total = sum(base)
    sizes = [max(1, round(b * P / total)) for b in base]
    big = max(range(len(sizes)), key=sizes.__getitem__)
    sizes[big] += P - sum(sizes)
    if sizes[big] < 1:
        raise ValueError(f"P={P} is too small for {n} tensors")
    return sizes


def odd_sizes(sizes: list[int]) -> list[int]:
    """Odd-sized variants (sizes not multiples of 16), with an empty tensor at index 1."""
    out = [s + 1 + 2 * (k % 7) if s % 2 == 0 else s + 2 * (k % 5) for k, s in enumerate(sizes)]
    out[1] = 0
    return out


def compute_dtype(torch, dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def badm_bytes(torch, P: int, S: int, dtype) -> int:
    """Bytes of one fused step: read z, S gradient rows, S dual rows; write S dual rows and z."""
    isz = torch.empty((), dtype=dtype).element_size()
    csz = torch.empty((), dtype=compute_dtype(torch, dtype)).element_size()
    return P * (2 * isz + S * isz + 2 * S * csz)


def torch_optim_bytes(opt) -> int:
    """Bytes of one torch.optim step from its tensors (bench/common.py's torch_optimizer_bytes)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common

    return common.torch_optimizer_bytes(opt)


def dt_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def size_label(P) -> str:
    if isinstance(P, int) and P >= MIB and P % MIB == 0:
        return f"{P // MIB}M"
    return str(P)


def short_error(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# ============================================================================ results


# Columns of each section: (key, header, format). One table builder formats them all.
COLUMNS = {
    "parity": [("backend", "backend", ""), ("layout", "layout", ""), ("dtype", "dtype", ""),
               ("cases", "cases", ""), ("status", "status", ""), ("note", "note", "")],
    "check": [("check", "check", ""), ("backend", "backend", ""), ("dtype", "dtype", ""), ("S", "S", ""),
              ("status", "status", ""), ("note", "note", "")],
    "resource": [("backend", "backend", ""), ("kernel", "kernel", ""), ("arch", "arch", ""),
                 ("regs", "registers", ""), ("spills", "spills", ""), ("stack", "stack B", ""),
                 ("shared", "shared B", ""), ("source", "source", ""), ("status", "status", ""), ("note", "note", "")],
    "time": [("case", "case", ""), ("backend", "backend", ""), ("dtype", "dtype", ""), ("P", "P", "size"),
             ("tensors", "tensors", ""), ("S", "S", ""), ("ms", "ms", "ms"), ("spread", "p10-p90 ms", ""),
             ("gbps", "GB/s", "gbps"), ("of_copy", "of copy", "pct"), ("vs_adam", "vs Adam", "x"),
             ("vs_sgd", "vs SGD", "x"), ("ms_vs_adam", "ms / Adam", "x"), ("status", "status", ""),
             ("note", "note", "")],
}  # fmt: skip
TITLES = {"parity": "Parity with reference.fused_step_ (bit for bit)", "check": "Optimizer checks",
          "time": "Timing", "resource": "Registers and spills"}  # fmt: skip
EXTRA_FIELDS = ["ms_p10", "ms_p90", "bytes", "reps", "layout_name"]
FAILED = ("FAIL", "error")


def _fmt(value, kind: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, float):
        return size_label(value) if kind == "size" else str(value).replace("|", "\\|").replace("\n", " ")[:200]
    if math.isnan(value):
        return "nan"
    if kind == "pct":
        return f"{value:.0%}"
    if kind == "x":
        return f"{value:.2f}"
    if kind == "gbps":
        return f"{value:.0f}" if value >= 10 else f"{value:.2f}"
    if kind == "ms":
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"
    return f"{value:.4g}"


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """The one table builder: a markdown table of ``rows`` with ``columns`` (key, header, format)."""
    numeric = {"ms", "gbps", "pct", "x"}
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---:" if f in numeric else "---" for _, _, f in columns) + "|"]  # fmt: skip
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


class Report:
    """Rows of every section, the log, and the outputs (written only with --out)."""

    def __init__(self, t0: float, echo: Callable[[str], None] = print):
        self.rows: list[dict] = []
        self.lines: list[str] = []
        self.t0 = t0
        self.echo = echo
        self.copy_gbps: float | None = None

    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        self.lines.append(line)
        self.echo(line)

    def add(self, section: str, **row) -> dict:
        row = dict(section=section, **row)
        row.setdefault("status", "ok")
        self.rows.append(row)
        return row

    def section(self, name: str) -> list[dict]:
        return [r for r in self.rows if r["section"] == name]

    @contextlib.contextmanager
    def attempt(self, row: dict, failure: str = "error"):
        """Run the body for ``row``: an exception becomes the row's status ``failure`` with the
        message (its traceback logged when GPU_CHECK_TRACEBACK is set) and is not raised again."""
        try:
            yield row
        except Exception as exc:  # noqa: BLE001 - reported, the next case runs
            row.update(status=failure, note=short_error(exc))
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                self.log(traceback.format_exc())

    def failures(self) -> list[dict]:
        return [r for r in self.rows if r["section"] in ("parity", "check") and r["status"] in FAILED]

    def markdown(self, header: list[str]) -> str:
        parts = list(header)
        for name, cols in COLUMNS.items():
            rows = self.section(name)
            if rows:
                parts += ["", f"### {TITLES[name]}", "", markdown_table(rows, cols)]
        return "\n".join(parts) + "\n"

    def write(self, out_dir: str, meta: dict, header: list[str]) -> list[str]:
        os.makedirs(out_dir, exist_ok=True)
        keys = ["section"] + list(dict.fromkeys(k for cols in COLUMNS.values() for k, _, _ in cols)) + EXTRA_FIELDS
        paths = [os.path.join(out_dir, f) for f in OUT_FILES]
        with open(paths[0], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(meta) + keys, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({**meta, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}})
        with open(paths[1], "w") as f:
            f.write(self.markdown(header))
        with open(paths[2], "w") as f:
            f.write("\n".join(self.lines) + "\n")
        return paths


# ============================================================================ context


class Context:
    """Everything the checks share: torch, the device, the back ends, the plan, the budget."""

    def __init__(self, torch, plan: Plan, report: Report, budget: float, args):
        self.torch, self.plan, self.report, self.budget, self.args = torch, plan, report, budget, args
        self.device = plan.device
        self.log = report.log
        self.kernels: dict[str, Callable | None] = {}  # back end -> its contract step, None when missing
        self.missing: dict[str, str] = {}
        self.ext_name = "cuda" if plan.device == "cuda" else "cpp"
        self.ext_file: str | None = None
        self.badm_fast = None
        self.reference = None
        self.kernels_pkg = None
        self.setup_s = 0.0  # seconds the set-up took (set once the back ends are ready)

    def available(self) -> list[str]:
        return [n for n in ("triton", self.ext_name) if self.kernels.get(n) is not None]

    def elapsed(self) -> float:
        return time.perf_counter() - self.report.t0

    def over_budget(self, phase: str = "time") -> bool:
        """Whether a new case of ``phase`` must not start: each phase may run until its share of
        the time the set-up (imports, the extension's build) left of the budget has passed, so
        that the timing always gets its part."""
        left = max(0.0, self.budget - self.setup_s)
        return self.elapsed() > self.setup_s + left * PHASE_SHARE[phase]

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def generator(self, seed: int):
        return self.torch.Generator(device=self.device).manual_seed(seed)


# ============================================================================ set-up


def import_project():
    """badm_fast from this checkout (installed or not) and its Triton kernels package."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import badm_fast

    try:
        kernels = importlib.import_module("badm_fast.kernels")
    except ImportError:
        # A checkout that is not pip-installed has no badm_fast.kernels (setup.py maps the
        # top-level kernels/ folder onto it): alias it, so that the back-end table finds it too.
        kernels = importlib.import_module("kernels")
        sys.modules["badm_fast.kernels"] = kernels
        badm_fast.kernels = kernels
    return badm_fast, kernels


def extension_sources(root: str = ROOT, with_cuda: bool = True) -> list[str]:
    """The sources of badm_fast._C in setup.py's order: the binding and the baseline CPU kernel
    first, the other CPU kernels, then the CUDA binding and kernels."""
    csrc = os.path.join(root, "csrc")
    first = [os.path.join(csrc, f) for f in ("binding.cpp", "badm_cpu_default.cpp")]
    cpu = sorted(os.path.join(csrc, f) for f in os.listdir(csrc) if f.startswith("badm_cpu_") and f.endswith(".cpp"))
    sources = first + [s for s in cpu if s not in first]
    if with_cuda:
        cuda = os.path.join(csrc, "cuda")
        sources += sorted(os.path.join(cuda, f) for f in os.listdir(cuda) if f.endswith(".cpp"))
        sources += sorted(os.path.join(cuda, f) for f in os.listdir(cuda) if f.endswith(".cu"))
    return sources


def extension_flags() -> dict[str, list[str]]:
    """setup.py's flags (no -std: torch adds its own). Without BADM_FAST_CPU_ISA_DISPATCH the
    AVX2/AVX-512 CPU kernels compile to nothing (CPU speed is not the subject here)."""
    return {
        "extra_cflags": ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden",
                         "-Wno-unknown-pragmas"],
        "extra_cuda_cflags": ["-O3", "--fmad=false"],
        "extra_ldflags": ["-fopenmp"],
    }  # fmt: skip


def probe_installed_extension() -> tuple[bool, str]:
    """Whether ``badm_fast._C`` imports and has CUDA kernels, asked in a child process (importing
    it here would register the op library, and a freshly built one could not be loaded after it)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torch\n"
        "try:\n import badm_fast._C as m\n"
        "except Exception as e:\n"
        " print('NOIMPORT', type(e).__name__, (str(e).splitlines() or [''])[0]); raise SystemExit\n"
        "ok = torch._C._dispatch_has_kernel_for_dispatch_key('badm_fast::fused_step_ext', 'CUDA')\n"
        "print('CUDA' if ok else 'NOCUDA', m.__file__)\n"
    )  # fmt: skip
    try:
        proc = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"probe failed: {short_error(exc)}"
    last = (proc.stdout.strip().splitlines() or [f"no output (rc {proc.returncode}): {proc.stderr.strip()[-200:]}"])[-1]
    return last.startswith("CUDA "), last


def _has_kernel(torch, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("badm_fast::fused_step_ext", key)
    except RuntimeError:
        return False


def load_extension(ctx: Context, build_dir: str | None) -> str:
    """Make ``badm_fast._C`` importable with the kernels of this device; returns where it came
    from. Raises with the reason when it cannot be had."""
    torch, args = ctx.torch, ctx.args
    key = "CUDA" if ctx.device == "cuda" else "CPU"
    if ctx.device != "cuda" or args.no_build:
        mod = importlib.import_module("badm_fast._C")
        ctx.ext_file = getattr(mod, "__file__", None)
        if not _has_kernel(torch, key):
            raise RuntimeError(f"badm_fast._C ({ctx.ext_file}) has no {key} kernels" + (" and --no-build was given"
                                                                                        if args.no_build else ""))
        return f"installed badm_fast._C ({ctx.ext_file})"
    reason = "--rebuild"
    if not args.rebuild:
        ok, reason = probe_installed_extension()
        if ok:
            mod = importlib.import_module("badm_fast._C")
            ctx.ext_file = getattr(mod, "__file__", None)
            return f"installed badm_fast._C ({ctx.ext_file})"
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        raise RuntimeError(f"badm_fast._C unusable ({reason}) and no CUDA toolkit found to build it (set CUDA_HOME)")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    if build_dir is None:
        build_dir = tempfile.mkdtemp(prefix="badm_gpu_check_ext_")
        atexit.register(shutil.rmtree, build_dir, True)
    os.makedirs(build_dir, exist_ok=True)
    sources = extension_sources()
    ctx.log(f"building badm_fast._C ({reason}) from {len(sources)} sources into {build_dir} "
            f"(TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}) ...")  # fmt: skip
    t0 = time.perf_counter()
    mod = load(name="_C", sources=sources, extra_include_paths=[os.path.join(ROOT, "csrc")],
               build_directory=build_dir, with_cuda=True, verbose=False, **extension_flags())  # fmt: skip
    sys.modules["badm_fast._C"] = mod
    ctx.badm_fast._C = mod
    ctx.ext_file = getattr(mod, "__file__", None)
    if not _has_kernel(torch, key):
        raise RuntimeError("the extension built from csrc/ has no CUDA kernels")
    return f"built from csrc/ in {time.perf_counter() - t0:.0f} s ({ctx.ext_file}; installed: {reason})"


def set_up_backends(ctx: Context) -> None:
    """The contract's step of each kernel back end, or the reason it is missing (a row)."""
    backends = ctx.badm_fast.backends
    ok, reason, _ = backends.availability("triton", ctx.device)
    ctx.kernels["triton"] = backends.get("triton")[0] if ok else None
    if not ok:
        ctx.missing["triton"] = reason
    build_dir = ctx.args.build_dir or (os.path.join(ctx.args.out, "ext") if ctx.args.out else None)
    try:
        origin = load_extension(ctx, build_dir)
        ok, reason, _ = backends.availability(ctx.ext_name, ctx.device)
        if not ok:
            raise RuntimeError(reason)
        ctx.kernels[ctx.ext_name] = backends.get(ctx.ext_name)[0]
        ctx.log(f"extension: {origin}")
    except Exception as exc:  # noqa: BLE001 - reported as rows
        ctx.kernels[ctx.ext_name] = None
        ctx.missing[ctx.ext_name] = short_error(exc)
        tail = "\n".join(str(exc).strip().splitlines()[-25:])  # a build error's compiler output ends there
        ctx.log(f"extension unavailable: {short_error(exc)}" + (f"\n{tail}" if "\n" in str(exc).strip() else ""))
        if os.environ.get("GPU_CHECK_TRACEBACK"):
            ctx.log(traceback.format_exc())
    for name in ("triton", ctx.ext_name):
        if ctx.kernels[name] is None:  # a GPU back end missing on a GPU is a failure of the run
            ctx.report.add("check", check="back end available", backend=name,
                           status="error" if ctx.device == "cuda" else "missing", note=ctx.missing[name])  # fmt: skip


# ============================================================================ kernel inputs


@dataclass
class Inputs:
    """Arguments of the kernel contract; every tensor is a view into one of ``buffers``, and
    ``views[k]`` = (buffer index, offset, numel) of the k-th tensor of params + grads + duals."""

    params: list
    grads: list
    duals: list
    weights: Any
    hyper: Any
    buffers: list = field(default_factory=list)
    views: list = field(default_factory=list)

    def clone(self) -> "Inputs":
        buffers = [b.clone() for b in self.buffers]
        tensors = [None if v is None else buffers[v[0]][v[1]: v[1] + v[2]] for v in self.views]
        n, m = len(self.params), len(self.grads)
        return Inputs(tensors[:n], tensors[n: n + m], tensors[n + m:], self.weights.clone(), self.hyper.clone(),
                      buffers, self.views)  # fmt: skip


def parity_inputs(ctx: Context, sizes, rows, dtype, seed, offset=0, row_pad=0, skip=(), wd=0.0, maximize=False):
    """Random contract inputs in NaN-poisoned buffers: each parameter in its own buffer at
    ``offset``, each item's gradient rows (and dual rows) in one buffer, ``row_pad`` poisoned
    elements between rows; items in ``skip`` get no gradient."""
    torch, dev = ctx.torch, ctx.device
    cdt = compute_dtype(torch, dtype)
    gen = ctx.generator(seed)
    buffers = []

    def rows_in_buffer(n, r, dt, std):
        """``r`` views of ``n`` random elements in one poisoned buffer, with their (buffer, start, n)."""
        buf = torch.full((offset + r * (n + row_pad) + POISON_TAIL,), float("nan"), dtype=dt, device=dev)
        out = []
        for k in range(r):
            start = offset + k * (n + row_pad)
            view = buf[start: start + n]
            view.copy_(torch.randn(n, generator=gen, device=dev, dtype=torch.float64) * std)
            out.append((view, (len(buffers), start, n)))
        buffers.append(buf)
        return out

    n = len(sizes)
    params = [rows_in_buffer(m, 1, dtype, 1.0)[0] for m in sizes]
    no_grad = [(None, None)] * rows
    grad_rows = [rows_in_buffer(m, rows, dtype, 0.5) if i not in skip else no_grad for i, m in enumerate(sizes)]
    dual_rows = [rows_in_buffer(m, rows, cdt, 0.5) for m in sizes]
    grads = [grad_rows[i][r] for r in range(rows) for i in range(n)]  # grads[r*N + i]: row r of item i
    duals = [dual_rows[i][r] for r in range(rows) for i in range(n)]
    views = [v for _, v in params + grads + duals]
    w = torch.rand(rows, generator=gen, device=dev, dtype=torch.float64) + 0.1
    lr = float(torch.rand((), generator=gen, device=dev, dtype=torch.float64)) * 0.3 + 0.01  # not exact in fp32
    mu = float(torch.rand((), generator=gen, device=dev, dtype=torch.float64)) * 0.95
    hyper = ctx.reference.hyper_tensor(lr, mu, wd, maximize, device=dev)
    return Inputs([t for t, _ in params], [t for t, _ in grads], [t for t, _ in duals], (w / w.sum()).to(cdt), hyper,
                  buffers, views)


INT_OF = {8: "int64", 4: "int32", 2: "int16"}


def bit_mismatches(torch, a, b) -> int:
    """Elements whose bits differ (two NaNs are equal whatever their payload)."""
    ints = getattr(torch, INT_OF[a.element_size()])
    differ = (a.view(ints) != b.view(ints)) & ~(torch.isnan(a) & torch.isnan(b))
    return int(differ.sum())


def compare_inputs(torch, got: Inputs, want: Inputs, res_got=None, res_want=None) -> str | None:
    """None when every buffer (views and poison) has the same bits and the residual sums agree
    within RESIDUAL_RTOL; else what differs. The buffers of one dtype are compared in one pass
    (one host synchronisation per dtype, not per buffer); only a failure is located per buffer."""
    groups: dict = {}
    for k, (x, y) in enumerate(zip(got.buffers, want.buffers)):
        groups.setdefault(x.dtype, []).append((k, x, y))
    total = sum(bit_mismatches(torch, torch.cat([x for _, x, _ in g]), torch.cat([y for _, _, y in g]))
                for g in groups.values())  # fmt: skip
    if total:
        bad = [(k, n) for g in groups.values() for k, x, y in g if (n := bit_mismatches(torch, x, y))]
        k, n = bad[0]
        return f"{total} elements differ in {len(bad)} buffers (first: buffer {k}, {n})"
    if res_want is not None:
        a, b = res_got.double().cpu(), res_want.double().cpu()
        err = float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())
        if not err <= RESIDUAL_RTOL:
            return f"residuals {a.tolist()} vs {b.tolist()} (relative {err:.1e})"
    return None


# The kernel variants that the timing runs: (name, residuals, found_inf value or None, inv_scale
# value or None). Each compiles once per dtype (and per R == 1 or not, and per alignment of the
# first parameter: Triton specialises on them), so the list stays at what the timing uses.
FLAG_CASES = [
    ("plain", False, None, None),  # kernel-only timing, on_nonfinite="ignore"
    ("flag", False, 0.0, None),  # the default policy's step
    ("flag+residuals", True, 0.0, None),  # step(residuals=True)
    ("scaler", False, 0.0, 0.3125 + 2.0**-20),  # GradScaler (an inexact scale: the multiply is seen)
    ("skipped", True, 1.0, None),  # a raised flag: nothing changes (the variant of flag+residuals)
]


def run_contract(ctx: Context, step, inputs: Inputs, flags) -> tuple[Inputs, Any]:
    torch, dev = ctx.torch, ctx.device
    _, residuals, found, inv = flags
    out = inputs.clone()
    res = torch.tensor([0.25, 0.5], dtype=torch.float64, device=dev) if residuals else None  # sums are added
    fi = torch.tensor([found], dtype=torch.float32, device=dev) if found is not None else None
    iv = torch.tensor([inv], dtype=torch.float32, device=dev) if inv is not None else None
    step(out.params, out.grads, out.duals, out.weights, out.hyper, res, fi, iv)
    return out, res


def check_parity(ctx: Context) -> None:
    """Every back end against the reference on the plan's layouts, dtypes, S and kernel variants:
    one row per (back end, layout, dtype)."""
    torch, report = ctx.torch, ctx.report
    names = ctx.available()
    if not names:
        return
    for li, (layout, sizes, offset, row_pad, skip, flag_names, dtypes) in enumerate(ctx.plan.parity_layouts):
        flags = [f for f in FLAG_CASES if flag_names is None or f[0] in flag_names]
        for dtype in dtypes or ctx.plan.dtypes:
            rows = {n: report.add("parity", backend=n, layout=layout, dtype=dt_name(dtype), cases=0) for n in names}
            if ctx.over_budget("parity"):
                for r in rows.values():
                    r.update(status="skipped", note="time budget")
                continue
            failures = {n: [] for n in names}
            t0 = time.perf_counter()
            for S in ctx.plan.subs:
                case = (li * 31 + S) % 6
                try:
                    base = parity_inputs(ctx, sizes, S, dtype, seed=1000 * li + 10 * S + len(dt_name(dtype)),
                                         offset=offset, row_pad=row_pad, skip=skip,
                                         wd=0.0 if case % 2 == 0 else 0.01, maximize=case % 3 == 1)  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    for n in names:
                        failures[n].append(f"S={S} inputs: {short_error(exc)}")
                    continue
                for fl in flags:
                    want, res_want = run_contract(ctx, ctx.reference.fused_step_, base, fl)
                    for n in names:
                        rows[n]["cases"] += 1
                        try:
                            got, res_got = run_contract(ctx, ctx.kernels[n], base, fl)
                            diff = compare_inputs(torch, got, want, res_got, res_want)
                            del got
                        except Exception as exc:  # noqa: BLE001
                            diff = short_error(exc)
                        if diff:
                            failures[n].append(f"S={S} {fl[0]}: {diff}")
                    del want
                del base
                ctx.free()
            for n in names:
                f = failures[n]
                rows[n].update(status="ok" if not f else "FAIL", note="; ".join(f[:2]) + (f" (+{len(f) - 2})"
                                                                                          if len(f) > 2 else ""))
            ctx.log(f"  parity {layout[:48]:<48} {dt_name(dtype):<9} "
                    + " ".join(f"{n}:{rows[n]['status']}" for n in names) + f" ({time.perf_counter() - t0:.1f} s)")


def check_large(ctx: Context, P: int = LARGE_P, boundary: int = 1 << 31, W: int = MIB) -> None:
    """One bf16 step of 2**31 + 4099 elements (S = 1) per back end: three windows of ``W`` (the
    start, across 2**31, the end) bit for bit against the reference run on copies of them."""
    torch, dev = ctx.torch, ctx.device
    windows = [slice(0, W), slice(boundary - W // 2, boundary + W // 2), slice(P - W, P)]
    label = "P = 2^31 + 4099 (64-bit offsets), windows" if P == LARGE_P else f"P = {P}, windows"
    for name in ctx.available():
        row = ctx.report.add("check", check=label, backend=name, dtype="bfloat16", S=1)
        if ctx.over_budget("large"):
            row.update(status="skipped", note="time budget")
            continue
        z = g = d = None
        with ctx.report.attempt(row, "FAIL"):
            gen = ctx.generator(7)
            z = torch.randn(P, device=dev, dtype=torch.bfloat16, generator=gen)
            g = torch.randn(P, device=dev, dtype=torch.bfloat16, generator=gen)
            d = torch.randn(P, device=dev, dtype=torch.float32, generator=gen)
            w = torch.ones(1, device=dev)
            hyper = ctx.reference.hyper_tensor(0.0123, 0.87, device=dev)
            want = []
            for s in windows:
                zw, gw, dw = z[s].clone(), g[s].clone(), d[s].clone()
                ctx.reference.fused_step_([zw], [gw], [dw], w, hyper)
                want.append((zw, dw))
            ctx.kernels[name]([z], [g], [d], w, hyper)
            ctx.sync()
            bad = sum(bit_mismatches(torch, z[s], zw) + bit_mismatches(torch, d[s], dw)
                      for s, (zw, dw) in zip(windows, want))  # fmt: skip
            row.update(status="ok" if bad == 0 else "FAIL", note=f"{bad} elements differ in 3 windows of {W}")
        del z, g, d
        ctx.free()


# ============================================================================ optimizer checks


def _state(params, opt):
    return [p.detach().clone() for p in params] + [opt.state[p]["duals"].clone() for p in params]


def _max_diff(a, b) -> float:
    return max((float((u.double() - v.double()).abs().max()) for u, v in zip(a, b) if u.numel()), default=0.0)


def _same_bits(torch, a, b) -> bool:
    return all(bit_mismatches(torch, u, v) == 0 for u, v in zip(a, b))


def check_capture(ctx: Context, backend: str) -> None:
    """``BADM(capturable=True).step(weights=w, residuals=True)`` captured once in a CUDA graph and
    replayed, against the same steps taken eagerly by a capturable and a host-checked twin (all
    bit for bit): lr and momentum tensors and the weights tensor are changed in place between
    replays, and at step 4 an infinite gradient in the last sub-batch is skipped on the device. On CPU
    (smoke) the "graph" optimizer steps eagerly too."""
    torch, dev, BADM = ctx.torch, ctx.device, ctx.badm_fast.BADM
    graph_mode, S = dev == "cuda", ctx.plan.capture_S
    name = "CUDA graph of a capturable step vs eager" if graph_mode else "capturable step vs eager (CPU: no graph)"
    row = ctx.report.add("check", check=name, backend=backend, dtype="float32", S=S)
    with ctx.report.attempt(row, "FAIL"):
        sizes = ctx.plan.capture_sizes
        gen = ctx.generator(11)
        init = [torch.randn(n, generator=gen, device=dev) for n in sizes]
        w1, w2 = [[1.0, 2.0, 1.0, 4.0][s % 4] for s in range(S)], [[4.0, 1.0, 1.0, 2.0][s % 4] for s in range(S)]
        schedule = [  # (lr, momentum, weights); powers of two: normalised alike on the host and the device
            (0.05, 0.9, w1), (0.05, 0.9, w1), (0.05, 0.9, w1), (0.03, 0.9, w2), (0.03, 0.9, w2), (0.03, 0.8, [1.0] * S),
        ]  # fmt: skip
        grads = [[[torch.randn(n, generator=gen, device=dev) * 0.1 for n in sizes] for _ in range(S)]
                 for _ in schedule]  # fmt: skip
        grads[4][S - 1][2][5] = float("inf")  # step 4, the last sub-batch

        def make(capturable):
            params = [torch.nn.Parameter(t.clone()) for t in init]
            hyper = {}
            if capturable:
                hyper = dict(lr=torch.tensor(0.05, dtype=torch.float64, device=dev),
                             momentum=torch.tensor(0.9, dtype=torch.float64, device=dev))  # fmt: skip
            opt = BADM(params, lr=hyper.get("lr", 0.05), momentum=hyper.get("momentum", 0.9), sub_batches=S,
                       backend=backend, on_nonfinite="skip", capturable=capturable)  # fmt: skip
            w = torch.ones(S, device=dev)
            return dict(params=params, opt=opt, hyper=hyper, w=w, capturable=capturable)

        runs = {"graph": make(True), "eager capturable": make(True), "host-checked": make(False)}
        graph = None
        side = torch.cuda.Stream() if graph_mode else None
        worst, notes = {k: 0 for k in runs}, []
        for k, (lr, mu, weights) in enumerate(schedule):
            for r in runs.values():  # the sub-batches' gradients, copied into the (static) rows
                opt = r["opt"]
                opt.zero_grad()
                for s in range(S):
                    with opt.sub_batch(s):
                        for p, grad in zip(r["params"], grads[k][s]):
                            p.grad = grad
                if r["capturable"]:  # device values, written in place outside the graph
                    r["hyper"]["lr"].fill_(lr)
                    r["hyper"]["momentum"].fill_(mu)
                    r["w"].copy_(torch.tensor(weights))
                else:
                    opt.param_groups[0].update(lr=lr, momentum=mu)
            g = runs["graph"]
            step = lambda r=g: r["opt"].step(weights=r["w"], residuals=True)  # noqa: E731
            if not graph_mode:
                step()
            elif k < 2:  # warm-up (compiles, caches the work tables) on a side stream
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                if graph is None:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step()
                graph.replay()
            runs["eager capturable"]["opt"].step(weights=runs["eager capturable"]["w"], residuals=True)
            runs["host-checked"]["opt"].step(weights=weights, residuals=True)
            ctx.sync()
            ref_state = _state(g["params"], g["opt"])
            for key in ("eager capturable", "host-checked"):
                other = _state(runs[key]["params"], runs[key]["opt"])
                if not _same_bits(torch, ref_state, other):
                    worst[key] = max(worst[key], _max_diff(ref_state, other))
                    notes.append(f"step {k}: graph != {key} (max {worst[key]:.1e})")
                res_g = torch.stack([g["opt"].residuals["primal"], g["opt"].residuals["dual"]])
                res_o = torch.stack([runs[key]["opt"].residuals["primal"], runs[key]["opt"].residuals["dual"]])
                rel = float(((res_g - res_o).abs() / res_o.abs().clamp_min(1e-300)).max())
                if not rel <= 1e-12:
                    notes.append(f"step {k}: residuals vs {key} differ by {rel:.1e}")
        skipped = {key: r["opt"].skipped_steps for key, r in runs.items()}
        if any(v != 1 for v in skipped.values()):
            notes.append(f"skipped steps {skipped} (expected 1 each)")
        if notes:
            row.update(status="FAIL", note="; ".join(notes[:3]))
        else:
            row["note"] = (f"{len(schedule)} steps ({'4 replays of one capture' if graph_mode else 'eager'}), "
                           "lr/momentum/weights changed, 1 inf skipped: bits equal to both twins")  # fmt: skip
    ctx.free()


def _mlp(torch, device, hidden, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)).to(device)


def _batch(torch, device, step, n=96):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 64, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def check_grad_scaler(ctx: Context, backend: str, S: int = 3) -> None:
    """GradScaler over 5 steps against an unscaled twin on the "torch" back end (power-of-two
    scales: the same steps).
    Step 2: an infinity in the last sub-batch's ``.grad`` (what GradScaler checks: the scale
    halves); step 3: a NaN in sub-batch 0 (seen by BADM's own check only). Both steps are
    skipped with the state untouched, counted, and redone."""
    torch, dev = ctx.torch, ctx.device
    row = ctx.report.add("check", check="GradScaler, forced inf and NaN skipped", backend=backend,
                         dtype="float32", S=S)  # fmt: skip
    with ctx.report.attempt(row, "FAIL"):
        a, b = _mlp(torch, dev, ctx.plan.hidden), _mlp(torch, dev, ctx.plan.hidden)
        kw = dict(lr=0.05, momentum=0.8, sub_batches=S)  # the unscaled twin on the reference: the same bits
        opt_a, opt_b = ctx.badm_fast.BADM(a.parameters(), backend="torch", **kw), ctx.badm_fast.BADM(
            b.parameters(), backend=backend, **kw)
        scaler = torch.amp.GradScaler(dev, init_scale=2.0**12, growth_interval=1000)
        pa, pb = list(a.parameters()), list(b.parameters())

        def backward(model, opt, x, y, scale=None, poison=None):
            opt.zero_grad()
            for s, (xs, ys) in enumerate(zip(x.tensor_split(S), y.tensor_split(S))):
                with opt.sub_batch(s):
                    loss = torch.nn.functional.cross_entropy(model(xs), ys)
                    (loss if scale is None else scale(loss)).backward()
                    if poison is not None and poison[0] == s:
                        model[0].weight.grad[s % model[0].weight.shape[0], 11] = poison[1]

        untouched, worst = True, 0.0
        for step in range(5):
            x, y = _batch(torch, dev, step)
            backward(a, opt_a, x, y)
            opt_a.step()
            for attempt in range(2 if step in (2, 3) else 1):
                poison = None
                if attempt == 0 and step == 2:
                    poison = (S - 1, float("inf"))
                elif attempt == 0 and step == 3:
                    poison = (0, float("nan"))
                backward(b, opt_b, x, y, scale=scaler.scale, poison=poison)
                before = _state(pb, opt_b) if poison else None
                scaler.step(opt_b)
                scaler.update()
                if poison:
                    untouched = untouched and _same_bits(torch, before, _state(pb, opt_b))
            worst = max(worst, _max_diff(_state(pa, opt_a), _state(pb, opt_b)))
        skipped, scale = opt_b.skipped_steps, scaler.get_scale()
        ok = untouched and skipped == 2 and scale == 2.0**11 and worst <= 1e-6
        row.update(status="ok" if ok else "FAIL",
                   note=f"state untouched {untouched}; {skipped} skips counted (2 expected); scale 2^12 -> "
                   f"{scale:g}; max |scaled - unscaled| {worst:.1e}")  # fmt: skip
    ctx.free()


def run_optimizer_checks(ctx: Context) -> None:
    for check, backends in ((check_capture, ctx.available() + ["torch"]), (check_grad_scaler, ctx.available())):
        for backend in backends:
            if ctx.over_budget("check"):
                ctx.report.add("check", check=check.__name__, backend=backend, status="skipped", note="time budget")
                continue
            check(ctx, backend)
    for r in ctx.report.section("check"):
        ctx.log(f"  {r['check'][:48]:<48} {r['backend']:<7} {r['status']} {r.get('note', '')}"[:220])


# ============================================================================ timing


def time_calls(ctx: Context, fn: Callable[[], Any], reps: int, warmup: int) -> tuple[float, float, float]:
    """(median, p10, p90) milliseconds of ``fn()``, each call timed on its own (CUDA events)."""
    torch = ctx.torch
    for _ in range(warmup):
        fn()
    if ctx.device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in events)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * (len(times) - 1) + 0.5))]  # noqa: E731
    n = len(times)
    median = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    return median, pick(0.1), pick(0.9)


def add_timing(ctx: Context, base: dict, nbytes: int | None, make: Callable[[], Any], note: str = "") -> dict:
    """One timing row: ``make()`` prepares and returns the function to time, or ``(function,
    bytes)`` when the bytes are known only then; a failure there or while timing is the row's error."""
    args = ctx.args
    row = ctx.report.add("time", **base, bytes=nbytes, note=note, reps=args.reps)
    with ctx.report.attempt(row, "error"):
        fn = make()
        if isinstance(fn, tuple):
            fn, nbytes = fn
            row["bytes"] = nbytes
        ms, p10, p90 = time_calls(ctx, fn, args.reps, args.warmup)
        gbps = nbytes / (ms * 1e-3) / 1e9
        row.update(ms=ms, ms_p10=p10, ms_p90=p90, spread=f"{p10:.3f}-{p90:.3f}", gbps=gbps)
        if ctx.report.copy_gbps:
            row["of_copy"] = gbps / ctx.report.copy_gbps
    if row["status"] != "ok":
        ctx.free()
    ctx.log(f"  {row['case']:<26} {row['backend']:<7} {row['dtype']:<9} P={size_label(row['P']):>5} "
            f"n={row['tensors']:<3} S={row['S']} "
            + (f"{row['ms']:9.3f} ms {row['gbps']:7.0f} GB/s" if row["status"] == "ok" else row["note"]))  # fmt: skip
    return row


def measure_copy(ctx: Context) -> None:
    torch = ctx.torch
    n = ctx.plan.copy_elems
    src = torch.empty(n, device=ctx.device).normal_()
    dst = torch.empty_like(src)
    nbytes = 2 * src.nbytes
    base = dict(case="copy (dst.copy_(src))", backend="torch", dtype="float32", P=n, tensors=1, S="")
    row = add_timing(ctx, base, nbytes, lambda dst=dst, src=src: (lambda: dst.copy_(src)),
                     note=f"{nbytes / MIB:.0f} MiB moved")  # fmt: skip
    if row["status"] == "ok":
        ctx.report.copy_gbps = row["gbps"]
        row["of_copy"] = 1.0
    del src, dst
    ctx.free()


@dataclass
class Source:
    """Parameters (one buffer per tensor) and one gradient per parameter for a timing layout."""

    params: list
    grads: list


def timing_source(ctx: Context, sizes, dtype, seed=0) -> Source:
    torch = ctx.torch
    gen = ctx.generator(seed)
    params = [torch.empty(n, dtype=dtype, device=ctx.device).normal_(generator=gen) for n in sizes]
    grads = [torch.empty(n, dtype=dtype, device=ctx.device).normal_(0.0, GRAD_STD, generator=gen) for n in sizes]
    return Source(params, grads)


def contract_args(ctx: Context, src: Source, S: int):
    """Kernel-contract arguments over ``src``: S gradient rows and S dual rows per tensor (each
    tensor's rows in one (S, n) allocation, as the optimizer keeps them)."""
    torch = ctx.torch
    dtype = src.params[0].dtype
    cdt = compute_dtype(torch, dtype)
    g_rows = [g.unsqueeze(0).repeat(S, 1) for g in src.grads]
    d_rows = [torch.zeros((S, p.numel()), dtype=cdt, device=ctx.device).normal_(0.0, GRAD_STD) for p in src.params]
    n = len(src.params)
    params = [p.clone() for p in src.params]
    grads = [g_rows[i][r] for r in range(S) for i in range(n)]
    duals = [d_rows[i][r] for r in range(S) for i in range(n)]
    weights = torch.full((S,), 1.0 / S, dtype=cdt, device=ctx.device)
    hyper = ctx.reference.hyper_tensor(LR, MOMENTUM, device=ctx.device)
    return params, grads, duals, weights, hyper


def make_badm(ctx: Context, src: Source, S: int, backend: str, **kw):
    """A BADM over copies of ``src.params`` whose S gradient rows are filled through
    ``opt.sub_batch(s)`` (``.grad`` stays the last sub-batch's, as after a training step's
    backward passes); a step can then be repeated."""
    params = [ctx.torch.nn.Parameter(p.clone()) for p in src.params]
    opt = ctx.badm_fast.BADM(params, lr=LR, momentum=MOMENTUM, sub_batches=S, backend=backend, **kw)
    for s in range(S):
        with opt.sub_batch(s):
            for p, g in zip(params, src.grads):
                p.grad = g
    if opt.backend != backend:
        raise RuntimeError(f"BADM chose backend {opt.backend!r}, {backend!r} was asked for")
    return opt, params


def graph_step(ctx: Context, step: Callable[[], Any]) -> Callable[[], Any]:
    """``step`` captured in a CUDA graph after 3 warm-up calls on a side stream: returns the replay."""
    torch = ctx.torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_torch_optim(ctx: Context, src: Source, base: dict) -> None:
    torch = ctx.torch
    cases = [
        ("torch Adam(fused=True)", lambda ps: torch.optim.Adam(ps, lr=1e-4, fused=True)),
        ("torch SGD(momentum, foreach)", lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True)),
    ]
    for case, build in cases:

        def make(build=build):
            params = [torch.nn.Parameter(p.clone()) for p in src.params]
            for p, g in zip(params, src.grads):
                p.grad = g
            opt = build(params)
            opt.step()  # creates the state, whose tensors give the bytes
            return opt.step, torch_optim_bytes(opt)

        add_timing(ctx, dict(base, case=case, backend="torch", S=""), None, make, note="bytes from its state")
        ctx.free()


def time_badm_steps(ctx: Context, src: Source, base: dict, S: int, nbytes: int) -> None:
    """``BADM.step()`` end to end per back end: default policy, "ignore", residuals, the replay of
    a CUDA graph of a capturable step, GradScaler."""
    torch, dev = ctx.torch, ctx.device
    for backend in ctx.available():
        b = dict(base, backend=backend, S=S)
        held = {}

        def optimizer(key, **kw):
            if key not in held:
                held.clear()
                ctx.free()
                held[key] = make_badm(ctx, src, S, backend, **kw)[0]
            return held[key]

        add_timing(ctx, dict(b, case="BADM.step"), nbytes, lambda: optimizer("raise").step,
                   note="default policy: + non-finite check of the gradients")  # fmt: skip
        add_timing(ctx, dict(b, case="BADM.step residuals"), nbytes,
                   lambda: functools.partial(optimizer("raise").step, residuals=True))  # fmt: skip

        def scaler_step():
            opt = optimizer("raise")
            scaler = torch.amp.GradScaler(dev, init_scale=2.0**10, growth_interval=1 << 30)
            scaler.scale(torch.ones((), device=dev))  # creates the scale

            def fn():
                scaler.step(opt)
                scaler.update()

            return fn

        add_timing(ctx, dict(b, case="BADM.step GradScaler"), nbytes, scaler_step,
                   note="scaler.step(opt); scaler.update()")  # fmt: skip
        add_timing(ctx, dict(b, case="BADM.step ignore"), nbytes,
                   lambda: optimizer("ignore", on_nonfinite="ignore").step)  # fmt: skip

        def captured():
            opt = optimizer("capturable", capturable=True)
            return graph_step(ctx, opt.step) if dev == "cuda" else opt.step

        add_timing(ctx, dict(b, case="BADM.step capturable"), nbytes, captured,
                   note="replay of a CUDA graph of step()" if dev == "cuda" else "eager (CPU: no graph)")  # fmt: skip
        held.clear()
        ctx.free()


def time_kernels(ctx: Context, src: Source, base: dict, S: int, nbytes: int) -> None:
    """The contract's step of each back end called directly (no flags, no residuals)."""
    args = contract_args(ctx, src, S)
    names = ctx.available() + (["torch"] if base["P"] <= ctx.plan.reference_max_p else [])
    for name in names:
        fn = ctx.reference.fused_step_ if name == "torch" else ctx.kernels[name]
        add_timing(ctx, dict(base, case="kernel" if name != "torch" else "kernel (reference)", backend=name, S=S),
                   nbytes, lambda fn=fn, args=args: (lambda: fn(*args)))  # fmt: skip
    del args
    ctx.free()


def run_timing(ctx: Context) -> None:
    torch, plan = ctx.torch, ctx.plan
    ctx.log("copy bandwidth ...")
    measure_copy(ctx)
    for name, fn in ((n, ctx.kernels[n]) for n in ("triton", ctx.ext_name)):
        if fn is None:
            ctx.report.add("time", case="kernel and BADM.step", backend=name, status="missing", note=ctx.missing[name])
    n_list = plan.timing_list or plan.n_list
    layouts = [("1 tensor", 1), (f"{n_list} tensors", n_list)]
    order = [(P, dtype) for P in plan.sizes for dtype in plan.timing_dtypes or plan.dtypes]  # smaller P first
    for P, dtype in order:
        for layout, n in layouts:
            sizes = [P] if n == 1 else list_sizes(P, n)
            base = dict(dtype=dt_name(dtype), P=P, tensors=n, layout_name=layout)
            if ctx.over_budget():
                subs = ",".join(map(str, plan.timing_subs or plan.subs))
                ctx.report.add("time", case="all cases", backend="", S=subs, status="skipped", note="time budget",
                               **base)  # fmt: skip
                continue
            ctx.log(f"{dt_name(dtype)} P={size_label(P)} {layout} ...")
            src = None
            try:
                src = timing_source(ctx, sizes, dtype, seed=P % 997 + n)
                time_torch_optim(ctx, src, base)
                for S in plan.timing_subs or plan.subs:
                    if plan.timing_only is not None and (n, S) not in plan.timing_only:
                        continue
                    if ctx.over_budget():
                        ctx.report.add("time", case="all cases", backend="", S=S, status="skipped",
                                       note="time budget", **base)  # fmt: skip
                        continue
                    nbytes = badm_bytes(torch, P, S, dtype)
                    time_kernels(ctx, src, base, S, nbytes)
                    time_badm_steps(ctx, src, base, S, nbytes)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory while allocating the layout
                ctx.report.add("time", case="set-up", backend="", S="", status="error", note=short_error(exc), **base)
            del src
            ctx.free()
    add_ratios(ctx.report)


def add_ratios(report: Report) -> None:
    """GB/s ratios against Adam(fused) and SGD, and the time ratio against Adam, same (dtype, P,
    layout)."""
    key = lambda r: (r.get("dtype"), r.get("P"), r.get("tensors"))  # noqa: E731
    anchors = {}
    for r in report.section("time"):
        if r["status"] == "ok" and r["case"].startswith("torch "):
            anchors[(key(r), "adam" if "Adam" in r["case"] else "sgd")] = r
    for r in report.section("time"):
        if r["status"] != "ok" or "gbps" not in r or r["case"].startswith("copy"):
            continue
        adam, sgd = anchors.get((key(r), "adam")), anchors.get((key(r), "sgd"))
        if adam:
            r["vs_adam"], r["ms_vs_adam"] = r["gbps"] / adam["gbps"], r["ms"] / adam["ms"]
        if sgd:
            r["vs_sgd"] = r["gbps"] / sgd["gbps"]


# ============================================================================ registers and spills


def parse_cuobjdump(text: str) -> list[dict]:
    """Rows (kernel, arch, regs, stack, shared, local) from ``cuobjdump --dump-resource-usage``:
    ``arch = sm_90`` lines, then ``Function <mangled>:`` followed by ``REG:40 STACK:0 SHARED:0
    LOCAL:0 ...`` (on the same line or the next)."""
    rows, arch, func = [], "", None
    for line in text.splitlines():
        m = re.search(r"arch\s*=\s*(sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function\s+([^\s:]+)\s*:", line)
        if m:
            func = m.group(1)
        if func and "REG:" in line:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append(dict(kernel=func, arch=arch, regs=int(vals.get("REG", 0)), stack=int(vals.get("STACK", 0)),
                             shared=int(vals.get("SHARED", 0)), local=int(vals.get("LOCAL", 0))))  # fmt: skip
            func = None
    return rows


def parse_ptxas(text: str) -> list[dict]:
    """Rows (kernel, arch, regs, stack, spill stores/loads, shared) of the entry functions in
    ``ptxas -v`` output (the properties of other device functions are not attributed to them)."""
    rows, cur, props_of = [], None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = dict(kernel=m.group(1), arch=m.group(2), regs=None, stack=0, spill_stores=0, spill_loads=0, shared=0)
            rows.append(cur)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props_of = m.group(1)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props_of in (None, cur["kernel"]):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            cur["shared"] = int(m2.group(1)) if m2 else 0
    return rows


def demangle(names: list[str]) -> dict[str, str]:
    """Short readable kernel names (c++filt when found; namespaces and argument lists dropped)."""
    out = {n: n for n in names}
    tool = shutil.which("c++filt")
    if tool and names:
        try:
            proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60)
            lines = proc.stdout.splitlines()
            if len(lines) == len(names):
                out = dict(zip(names, lines))
        except (OSError, subprocess.SubprocessError):
            pass
    for k, v in out.items():
        v = v.replace("(anonymous namespace)::", "").replace("badm_fast::cuda::", "").replace("badm_fast::", "")
        v = v[5:] if v.startswith("void ") else v  # the return type of a template instance
        depth, cut = 0, len(v)
        for i, ch in enumerate(v):  # drop the argument list: the first '(' outside template brackets
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0 and i > 0:
                cut = i
                break
        out[k] = v[:cut][:120]
    return out


def cuda_resource_rows(ctx: Context) -> list[dict]:
    """The CUDA extension's kernels: cuobjdump of the loaded library, else ptxas -v of a
    standalone compile of csrc/cuda/badm_kernel.cu for this GPU."""
    from torch.utils.cpp_extension import CUDA_HOME

    def tool(name):
        path = os.path.join(CUDA_HOME, "bin", name) if CUDA_HOME else None
        return path if path and os.path.exists(path) else shutil.which(name)

    cuobjdump = tool("cuobjdump")
    if cuobjdump and ctx.ext_file:
        proc = subprocess.run([cuobjdump, "--dump-resource-usage", ctx.ext_file], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        parsed = parse_cuobjdump(proc.stdout)
        if parsed:
            names = demangle([r["kernel"] for r in parsed])
            return [dict(backend="cuda", kernel=names[r["kernel"]], arch=r["arch"], regs=r["regs"],
                         spills=f"local {r['local']} B", stack=r["stack"], shared=r["shared"],
                         source="cuobjdump --dump-resource-usage") for r in parsed]  # fmt: skip
        ctx.log(f"cuobjdump found no kernels in {ctx.ext_file} (rc {proc.returncode}): {proc.stderr.strip()[-200:]}")
    nvcc = tool("nvcc")
    if not nvcc:
        raise RuntimeError("neither cuobjdump (with the extension's library) nor nvcc found")
    major, minor = ctx.torch.cuda.get_device_capability()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-cubin", "-O3", "--fmad=false", "-std=c++17", "-Xptxas=-v", f"-arch=sm_{major}{minor}",
               "-I", os.path.join(ROOT, "csrc"), "-o", os.path.join(tmp, "k.cubin"),
               os.path.join(ROOT, "csrc", "cuda", "badm_kernel.cu")]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    parsed = parse_ptxas(proc.stderr + proc.stdout)
    if not parsed:
        raise RuntimeError(f"ptxas -v gave no kernels (rc {proc.returncode}): {proc.stderr.strip()[-200:]}")
    names = demangle([r["kernel"] for r in parsed])
    return [dict(backend="cuda", kernel=names[r["kernel"]], arch=r["arch"], regs=r["regs"],
                 spills=f"{r['spill_stores']} B stores, {r['spill_loads']} B loads", stack=r["stack"],
                 shared=r["shared"], source="nvcc -Xptxas=-v badm_kernel.cu") for r in parsed]  # fmt: skip


TRITON_KERNELS = ("_badm_step_kernel", "_residual_reduce_kernel", "_badm_nonfinite_kernel", "_badm_copy_kernel")


def _compiled_kernels(fn) -> list:
    """The compiled kernels of a Triton JITFunction, whatever the Triton version's cache layout
    (``device_caches[device]`` a tuple whose first dict maps keys to kernels; older: ``cache``)."""
    found = []
    caches = getattr(fn, "device_caches", None)
    if caches:
        for entry in caches.values():
            seq = entry if isinstance(entry, (tuple, list)) else (entry,)
            for part in seq:
                if isinstance(part, dict):
                    found += list(part.values())
                    break
    for per_device in (getattr(fn, "cache", None) or {}).values():
        if isinstance(per_device, dict):
            found += list(per_device.values())
    return found


def _triton_label(fn, k) -> str:
    """The kernel's name with its specialisation: pointer dtypes and constexpr values."""
    src = getattr(k, "src", None)
    parts = []
    names = list(getattr(fn, "arg_names", []))

    def arg_name(key):
        idx = key[0] if isinstance(key, tuple) and key else key
        return names[idx] if isinstance(idx, int) and idx < len(names) else str(key)

    sig = getattr(src, "signature", None) or {}
    parts += [str(t).lstrip("*") for n, t in sig.items() if n in ("z_like_ptr", "like_ptr")]  # the storage dtype
    for key, value in (getattr(src, "constants", None) or {}).items():
        name = arg_name(key)
        if name.isupper() or name.startswith("HAS_"):
            parts.append(f"{name}={int(value) if isinstance(value, bool) else value}")
    attrs = getattr(src, "attrs", None) or {}
    if any(arg_name(key) == "z_like_ptr" and "divisibility" in str(v) for key, v in attrs.items()):
        parts.append("z%16B")
    meta = getattr(k, "metadata", None)
    if meta is not None and hasattr(meta, "num_warps"):
        parts.append(f"warps={meta.num_warps}")
    return f"{fn.__name__}[{' '.join(parts)}]"


def triton_resource_rows(module) -> list[dict]:
    """``n_regs``/``n_spills`` of every compiled variant of the Triton kernels in ``module``."""
    rows = []
    for name in TRITON_KERNELS:
        fn = getattr(module, name, None)
        if fn is None:
            continue
        for k in _compiled_kernels(fn):
            if getattr(k, "n_regs", None) is None and hasattr(k, "_init_handles"):
                with contextlib.suppress(Exception):
                    k._init_handles()
            meta = getattr(k, "metadata", None)
            target = getattr(meta, "target", None)
            arch = getattr(target, "arch", "") if target is not None else ""
            rows.append(dict(backend="triton", kernel=_triton_label(fn, k), arch=f"sm_{arch}" if arch else "",
                             regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None), stack="",
                             shared=getattr(meta, "shared", ""), source="Triton compiled kernel"))  # fmt: skip
    return rows


def report_resources(ctx: Context) -> None:
    """Resource rows of the Triton kernels and of the CUDA extension (an error is a row too)."""
    report = ctx.report
    if ctx.kernels.get("triton") is not None:
        try:
            mod = importlib.import_module(ctx.kernels_pkg.__name__ + ".badm_triton")
            if getattr(mod, "INTERPRETED", False):
                rows = [dict(kernel="(all)", status="n/a", note="Triton interpreter: nothing compiled")]
            else:
                none = dict(kernel="(all)", status="n/a", note="no compiled kernel found")
                rows = triton_resource_rows(mod) or [none]
        except Exception as exc:  # noqa: BLE001
            rows = [dict(kernel="(all)", status="error", note=short_error(exc))]
        for r in rows:
            report.add("resource", **dict(dict(backend="triton"), **r))
    if ctx.device == "cuda" and ctx.kernels.get("cuda") is not None:
        try:
            rows = cuda_resource_rows(ctx)
        except Exception as exc:  # noqa: BLE001
            rows = [dict(kernel="(all)", status="error", note=short_error(exc))]
        for r in rows:
            report.add("resource", **dict(dict(backend="cuda"), **r))
    elif ctx.kernels.get(ctx.ext_name) is not None:
        report.add("resource", backend=ctx.ext_name, kernel="(CPU kernel)", status="n/a", note="CPU: no GPU registers")


# ============================================================================ main


def _meta(torch, plan: Plan, args) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "not installed"
    gpu = (torch.cuda.get_device_name() if plan.device == "cuda"
           else f"CPU smoke ({platform.processor() or platform.machine()})")  # fmt: skip
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=platform.node(), gpu=gpu, torch=torch.__version__, triton=triton_version,
        cuda=torch.version.cuda or "", mode="cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full",
    )  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(time.perf_counter())
    log = report.log
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first defined
    elif os.environ.pop("TRITON_INTERPRET", None) is not None:
        log("TRITON_INTERPRET was set: unset for this run (the GPU kernels must be compiled)")
    import torch

    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny ops: a second thread only adds contention on a loaded machine
    elif not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on "
              "a machine with an NVIDIA GPU and a CUDA build of torch, or use --cpu-smoke", file=sys.stderr)
        return 2  # fmt: skip
    plan = make_plan(args, torch)
    ctx = Context(torch, plan, report, args.budget, args)
    ctx.badm_fast, ctx.kernels_pkg = import_project()
    ctx.reference = ctx.badm_fast.reference
    badm_triton = sys.modules.get(ctx.kernels_pkg.__name__ + ".badm_triton")
    if badm_triton is not None and getattr(badm_triton, "INTERPRETED", None) != bool(args.cpu_smoke):
        log("warning: the Triton kernels were defined before this run with another TRITON_INTERPRET setting")
    meta = _meta(torch, plan, args)
    log(f"{meta['gpu']} | torch {meta['torch']} (CUDA {meta['cuda'] or '-'}) | triton {meta['triton']} | "
        f"{meta['mode']}, budget {args.budget:.0f} s")  # fmt: skip

    set_up_backends(ctx)
    ctx.setup_s = ctx.elapsed()
    log(f"back ends: {', '.join(ctx.available()) or 'none'}; parity ...")
    check_parity(ctx)
    if plan.large_check:
        log("2^31 + 4099 elements ...")
        check_large(ctx)
    log("optimizer checks ...")
    run_optimizer_checks(ctx)
    log("registers and spills ...")  # of the kernels compiled so far: every variant the timing runs
    report_resources(ctx)
    log("timing ...")
    run_timing(ctx)

    header = [f"## badm_fast gpu_check: {meta['gpu']}, {meta['date']}", "",
              f"torch {meta['torch']} (CUDA {meta['cuda'] or '-'}), triton {meta['triton']}; {meta['mode']} run "
              f"(`python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`); "
              f"copy bandwidth {report.copy_gbps or float('nan'):.0f} GB/s; median of {args.reps} timed calls; "
              f"{time.perf_counter() - report.t0:.0f} s"]  # fmt: skip
    failed = report.failures()
    log(f"done: {len(failed)} failed checks, {len(report.rows)} rows")
    print()
    print(report.markdown(header))
    if args.out:
        paths = report.write(args.out, meta, header)
        print("written: " + ", ".join(paths))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
