#!/usr/bin/env python
"""The C++ CPU ops of badm_fast._C on their own (no optimizer around them).

Cases (medians over rounds of timed calls, bench/common.py's measure_group):

- ``host``: ``fused_step_ext`` over N = 10 / 161 / 1000 fp32 tensors of 256 elements, R = 1,
  one thread, next to ``torch._fused_adam_`` on lists of the same tensors: the per-call host
  overhead (dispatch, validation, work items) dominates at this size;
- ``stream``: one fp32 tensor of 16M elements, R = 1 and 4, two threads: the op's time and
  bandwidth with bytes = (3R + 2) * P * 4 (read params, grads, duals; write params, duals), next
  to ``torch.Tensor.copy_`` moving the same number of bytes;
- ``copy``: ``copy_check_ext`` over 4 fp32 tensors of 16M elements (with and without found_inf)
  next to ``torch._foreach_copy_`` on the same lists, two threads.

- ``--chunk-sweep 4096,8192,...``: instead, builds the extension once per chunk size
  (``-DBADM_FAST_CPU_CHUNK=n``, into a temporary folder, one compile job) and times
  ``fused_step_ext`` with residuals, R = 4, fp32, on one tensor of 64K / 256K / 4M elements and on
  1000 tensors of 256 elements, with one and two threads, each build in a fresh process.

    python bench/bench_cpp_op.py                 # all cases, a markdown table on stdout
    python bench/bench_cpp_op.py --quick         # shorter timing
    python bench/bench_cpp_op.py --chunk-sweep 4096,8192,16384,32768,65536
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.badm_fast


def _hyper(lr, momentum):
    """The (4,) float64 [lr, momentum, weight_decay, maximize] of the ops (reference.hyper_tensor;
    badm_fast is not imported here, so that the chunk sweep can load its own builds)."""
    return torch.tensor([lr, momentum, 0.0, 0.0], dtype=torch.float64)


def _host_rows(target_s):
    rows = []
    torch.set_num_threads(1)
    for n in (10, 161, 1000):
        params = [common.fill_random_(torch.empty(256), seed=i) for i in range(n)]
        grads = [common.fill_random_(torch.empty(256), seed=n + i, scale=1e-3) for i in range(n)]
        duals = [torch.zeros(256) for _ in range(n)]
        exp_avg = [torch.zeros(256) for _ in range(n)]
        exp_avg_sq = [torch.zeros(256) for _ in range(n)]
        steps = [torch.zeros(()) for _ in range(n)]
        weights = torch.ones(1)
        hyper = _hyper(1e-3, 0.9)
        residuals = torch.zeros(2, dtype=torch.float64)

        def badm():
            OPS.fused_step_ext(params, grads, duals, weights, hyper)

        def badm_res():
            OPS.fused_step_ext(params, grads, duals, weights, hyper, residuals)

        def adam():
            torch._fused_adam_(params, grads, exp_avg, exp_avg_sq, [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
                               weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)

        s_badm, s_res, s_adam = common.measure_group([badm, badm_res, adam], target_s=target_s)
        rows.append({"case": f"host N={n} x 256 fp32, R=1, 1 thread", "fused_step_ext us": s_badm.median * 1e6,
                     "with residuals us": s_res.median * 1e6, "torch._fused_adam_ us": s_adam.median * 1e6})
    return rows


def _stream_rows(target_s):
    rows = []
    torch.set_num_threads(2)
    P = 1 << 24
    for R in (1, 4):
        params = [common.fill_random_(torch.empty(P))]
        grads = [common.fill_random_(torch.empty(P), seed=1 + r, scale=1e-3) for r in range(R)]
        duals = [torch.zeros(P) for _ in range(R)]
        weights = torch.full((R,), 1.0 / R)
        hyper = _hyper(1e-3, 0.9)
        nbytes = (3 * R + 2) * P * 4
        half = nbytes // 2 // 4
        src = common.fill_random_(torch.empty(half))
        dst = torch.zeros_like(src)
        s_op, s_copy = common.measure_group(
            [lambda: OPS.fused_step_ext(params, grads, duals, weights, hyper), lambda: dst.copy_(src)],
            target_s=target_s)
        rows.append({"case": f"stream P=16M fp32, R={R}, 2 threads", "op ms": s_op.median * 1e3,
                     "op GB/s": s_op.gbps(nbytes), "copy_ ms": s_copy.median * 1e3, "copy_ GB/s": s_copy.gbps(nbytes)})
    return rows


def _copy_rows(target_s):
    torch.set_num_threads(2)
    P = 1 << 24
    src = [common.fill_random_(torch.empty(P), seed=r) for r in range(4)]
    dst = [torch.zeros(P) for _ in range(4)]
    flag = torch.zeros(1)
    nbytes = 2 * 4 * P * 4
    s_cc, s_ccf, s_fe = common.measure_group(
        [lambda: OPS.copy_check_ext(dst, src), lambda: OPS.copy_check_ext(dst, src, flag),
         lambda: torch._foreach_copy_(dst, src)], target_s=target_s)
    return [{"case": "copy 4 x 16M fp32, 2 threads", "copy_check_ext ms": s_cc.median * 1e3,
             "with found_inf ms": s_ccf.median * 1e3, "_foreach_copy_ ms": s_fe.median * 1e3,
             "with found_inf GB/s": s_ccf.gbps(nbytes), "_foreach_copy_ GB/s": s_fe.gbps(nbytes)}]


def _sweep_case(target_s):
    """The times (us) of the chunk sweep's cases with the extension loaded in this process."""
    out = {}
    hyper = _hyper(1e-3, 0.9)
    R = 4
    weights = torch.full((R,), 1.0 / R)
    residuals = torch.zeros(2, dtype=torch.float64)
    for name, sizes in (("64K", [1 << 16]), ("256K", [1 << 18]), ("4M", [1 << 22]), ("1000x256", [256] * 1000)):
        params = [common.fill_random_(torch.empty(p)) for p in sizes]
        grads = [common.fill_random_(torch.empty(p), seed=1, scale=1e-3) for _ in range(R) for p in sizes]
        duals = [torch.zeros(p) for _ in range(R) for p in sizes]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stats = common.measure(lambda: OPS.fused_step_ext(params, grads, duals, weights, hyper, residuals),
                                   target_s=target_s)
            out[f"{name} {threads}t"] = stats.median * 1e6
    return out


def _chunk_sweep(chunks, target_s):
    from torch.utils.cpp_extension import load  # noqa: F401  (fails early without a tool chain)

    rows = []
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    for chunk in chunks:
        with tempfile.TemporaryDirectory(prefix=f"badm_chunk_{chunk}_") as build:
            flags = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-DBADM_FAST_CPU_ISA_DISPATCH=1",
                     f"-DBADM_FAST_CPU_CHUNK={chunk}"]
            script = (
                "import json, sys, torch\n"
                "from torch.utils.cpp_extension import load\n"
                f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                f"load('_C', {sources!r}, build_directory={build!r},"
                f" extra_include_paths=[{os.path.join(ROOT, 'csrc')!r}],"
                f" extra_cflags={flags!r}, extra_ldflags=['-fopenmp'])\n"
                "import bench_cpp_op\n"
                f"print('RESULT', json.dumps(bench_cpp_op._sweep_case({target_s})))\n"
            )
            env = dict(os.environ, MAX_JOBS="1")
            proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"chunk {chunk}: the build or the run failed:\n{proc.stdout}\n{proc.stderr}")
            rows.append({"chunk": chunk, **json.loads(line[0][len("RESULT "):])})
            print(f"chunk {chunk}: {rows[-1]}", file=sys.stderr)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 0.2 s of timed calls per case instead of 2 s")
    parser.add_argument("--chunk-sweep", default="", help="comma-separated chunk sizes (elements) to build and time")
    args = parser.parse_args(argv)
    target_s = 0.2 if args.quick else 2.0
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {common.load_average()}")
    if args.chunk_sweep:
        rows = _chunk_sweep([int(c) for c in args.chunk_sweep.split(",")], target_s)
        print(common.markdown_table(rows, [(k, k) for k in rows[0]]))
        print(f"load average at the end {common.load_average()}")
        return
    import badm_fast._C  # noqa: F401  (the installed extension)

    for rows in (_host_rows(target_s), _stream_rows(target_s), _copy_rows(target_s)):
        columns = [(k, k) for k in rows[0]]
        print(common.markdown_table(rows, columns))
        print()


if __name__ == "__main__":
    main()
