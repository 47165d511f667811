"""The Triton kernel (badm_fast.kernels) against the reference, on CPU under TRITON_INTERPRET=1.

The Triton interpreter runs one program at a time with numpy, so its cost grows with the
number of programs: the parity sweep uses 65536-element blocks (sizes up to 100003 take one or
two programs, the second one masked), and separate cases run the default launch
configuration and small blocks (many programs, many residual atomics) on fewer shapes.
A compile-only case builds the real (non-interpreted) kernel for sm_90 in a subprocess.
"""

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

# The interpreter mode is read when the kernels are defined, i.e. when
# badm_fast.kernels.badm_triton is first imported; it must be set before that.
if "badm_fast.kernels.badm_triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import parity  # noqa: E402

from badm_fast import kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=f"{kernels.triton_unavailable_reason()}")

BIG_BLOCK = 65536


@pytest.fixture(scope="module")
def bt():
    """The kernel module, in interpreter mode."""
    from badm_fast.kernels import badm_triton

    if not badm_triton.INTERPRETED:
        pytest.skip("badm_fast.kernels.badm_triton was imported before TRITON_INTERPRET=1 was set")
    return badm_triton


def big_block_step(z, grads, duals, weights, rho, sigma, residuals=None):
    return kernels.badm_step(z, grads, duals, weights, rho, sigma, residuals, block_size=BIG_BLOCK)


# The full cross product of the shared parity grid: 4 dtypes x 5 sizes x 4 sub-batch counts x
# 2 row strides (160 cases, about 40 s on two cores), residuals on.
@pytest.mark.parametrize("row_pad", [0, 3])
@pytest.mark.parametrize("S", parity.SUB_BATCHES)
@pytest.mark.parametrize("P", parity.SIZES)
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
def test_parity(bt, dtype, P, S, row_pad):
    parity.check_kernel(big_block_step, S, P, dtype, seed=P + 31 * S, row_pad=row_pad, residuals=True)


@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
def test_parity_without_residuals(bt, dtype):
    parity.check_kernel(big_block_step, 3, 4097, dtype, seed=5, row_pad=3)


@pytest.mark.parametrize("P", [4097, 100003])
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
def test_parity_default_launch_config(bt, dtype, P):
    # The GPU configuration: 2048 (fp64: 1024) elements per program, tails masked.
    parity.check_kernel(kernels.badm_step, 2, P, dtype, seed=7, row_pad=3, residuals=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_many_small_blocks(bt, dtype):
    # 98 programs, each adding its partial residuals atomically.
    def step(*args):
        kernels.badm_step(*args, block_size=1024)

    parity.check_kernel(step, 3, 100003, dtype, seed=11, row_pad=5, residuals=True)


def _as_tensor_hypers(rho_dtype, which):
    def step(z, grads, duals, weights, rho, sigma, residuals=None):
        if "rho" in which:
            rho = torch.tensor(rho, dtype=rho_dtype, device=z.device)
        if "sigma" in which:
            sigma = torch.tensor([sigma], dtype=rho_dtype, device=z.device)  # one-element 1-D also accepted
        kernels.badm_step(z, grads, duals, weights, rho, sigma, residuals, block_size=BIG_BLOCK)

    return step


@pytest.mark.parametrize("which", [("rho", "sigma"), ("rho",), ("sigma",)])
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
def test_parity_tensor_hyperparameters(bt, dtype, which):
    # The capture-safe form: rho/sigma read on the device from tensors of the arithmetic dtype.
    step = _as_tensor_hypers(torch.float64 if dtype == torch.float64 else torch.float32, which)
    for S, P in [(1, 7), (3, 100003)]:
        parity.check_kernel(step, S, P, dtype, seed=S, row_pad=3, residuals=True)


def test_tensor_hyperparameters_are_read_at_each_call(bt):
    # Updating the tensors in place (what a captured graph replays) changes the next step.
    gen = torch.Generator().manual_seed(3)
    S, P = 3, 1000
    z = torch.randn(P, generator=gen)
    grads = torch.randn(S, P, generator=gen)
    duals = torch.randn(S, P, generator=gen)
    weights = torch.tensor([0.2, 0.3, 0.5])
    rho_t, sigma_t = torch.tensor(0.5), torch.tensor(2.0)
    z_ref, d_ref = z.clone(), duals.clone()
    for rho, sigma in [(0.5, 2.0), (1.5, 3.0), (0.0, 0.75)]:
        rho_t.fill_(rho)
        sigma_t.fill_(sigma)
        kernels.badm_step(z, grads, duals, weights, rho_t, sigma_t, block_size=BIG_BLOCK)
        parity.reference.fused_step_(z_ref, grads, d_ref, weights, rho, sigma)
        torch.testing.assert_close(z, z_ref, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(duals, d_ref, rtol=2e-6, atol=2e-6)


def test_residuals_accumulate(bt):
    # The kernel adds to the residuals tensor, it does not overwrite it.
    (z, grads, duals, weights, rho, sigma), _ = parity.make_inputs(2, 5000, torch.float64, seed=4)
    _, _, want = parity.oracle(z, grads, duals, weights, rho, sigma)
    res = torch.tensor([1.0, 2.0], dtype=torch.float64)
    kernels.badm_step(z, grads, duals, weights, rho, sigma, res, block_size=1024)
    torch.testing.assert_close(res, want + torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=1e-10, atol=0)


def test_hyperparameters_and_weights_are_runtime_arguments(bt):
    # Only switches and the launch shape are compile-time constants: changing rho, sigma, the
    # weights or S never compiles a new kernel.
    sig = inspect.signature(bt._badm_step_kernel.fn)
    constexprs = {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}
    assert constexprs == {
        "RHO_FROM_PTR",
        "SIGMA_FROM_PTR",
        "HAS_RESIDUALS",
        "HAS_FOUND_INF",
        "HAS_INV_SCALE",
        "BLOCK",
        "CONTIGUITY",
    }
    assert {"rho_hi", "rho_lo", "sigma_hi", "sigma_lo", "w_ptr", "found_ptr", "inv_scale_ptr", "S"} <= set(
        sig.parameters
    )


def test_split_double_keeps_fp64_hyperparameters(bt):
    gen = torch.Generator().manual_seed(0)
    for x in (torch.rand(200, generator=gen, dtype=torch.float64) * 1e3).tolist() + [1 / 3, 1e-30, 0.0, 7.0]:
        hi, lo = bt._split_double(x)
        assert bt._to_fp32(hi) == hi and bt._to_fp32(lo) == lo
        assert abs((hi + lo) - x) <= 2.0**-47 * abs(x)


def _valid_inputs(S=2, P=10, dtype=torch.float32):
    (z, grads, duals, weights, rho, sigma), _ = parity.make_inputs(S, P, dtype, seed=1)
    return dict(z=z, grads=grads, duals=duals, weights=weights, rho=rho, sigma=sigma)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(sigma=0.0), "Invalid sigma value: 0.0"),
        (lambda a: a.update(rho=-0.5), "Invalid rho value: -0.5"),
        (lambda a: a.update(rho=float("nan")), "Invalid rho value: nan"),
        (lambda a: a.update(sigma=float("inf")), "Invalid sigma value: inf"),
        (lambda a: a.update(rho=torch.zeros(2)), "rho as a tensor must hold one floating-point value"),
        (lambda a: a.update(sigma=torch.ones(1, dtype=torch.int64)), "sigma as a tensor must hold one floating"),
        (lambda a: a.update(duals=a["duals"].double()), "duals must be torch.float32 for torch.float32"),
        (lambda a: a.update(grads=a["grads"].half()), "grads dtype torch.float16 differs from z dtype"),
        (lambda a: a.update(grads=a["grads"][:, :9]), r"grads must have shape \(S, 10\)"),
        (lambda a: a.update(grads=a["grads"][:0]), r"grads must have shape \(S, 10\) with S >= 1"),
        (lambda a: a.update(duals=a["duals"][:1]), r"duals must have shape \(2, 10\)"),
        (lambda a: a.update(weights=a["weights"][:1]), r"weights must have shape \(2,\)"),
        (lambda a: a.update(weights=a["weights"].double()), "weights must be torch.float32"),
        (lambda a: a.update(z=a["z"].int()), "z has dtype torch.int32"),
        (lambda a: a.update(z=a["z"].view(2, 5)), "z must be a 1-D contiguous tensor"),
        (lambda a: a.update(grads=torch.zeros(10, 2).t()), r"grads rows must be contiguous \(stride\(1\) == 1\)"),
        (lambda a: a.update(duals=torch.zeros(15).as_strided((2, 10), (5, 1))), "duals row stride 5 is smaller"),
        (lambda a: a.update(residuals=torch.zeros(2)), r"residuals must be a \(2,\) float64 tensor"),
        (lambda a: a.update(residuals=torch.zeros(3, dtype=torch.float64)), r"residuals must be a \(2,\) float64"),
        (lambda a: a.update(block_size=1000), "block_size must be a power of two >= 16, got 1000"),
    ],
)
def test_invalid_arguments_raise_and_change_nothing(bt, change, match):
    args = _valid_inputs()
    change(args)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    block_size = args.pop("block_size", None)
    with pytest.raises(ValueError, match=match):
        kernels.badm_step(**args, block_size=block_size)
    for k, v in before.items():
        assert torch.equal(args[k].nan_to_num(7.0), v.nan_to_num(7.0)), f"{k} changed by a refused call"


def test_cpu_tensors_without_interpreter_raise(bt, monkeypatch):
    monkeypatch.setattr(bt, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        kernels.badm_step(**_valid_inputs())


def test_missing_triton_fails_at_first_use_only(monkeypatch):
    # Importing badm_fast.kernels never needs triton; using the kernel names triton in its error.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(kernels, "_UNAVAILABLE", [])
    assert kernels.TRITON_AVAILABLE is False
    assert "triton is not importable" in kernels.triton_unavailable_reason()
    with pytest.raises(ImportError, match="Triton back end of badm_fast is unavailable: triton is not importable"):
        kernels.badm_step(**_valid_inputs())
    with pytest.raises(ImportError, match="triton is not importable"):
        kernels.require_triton()


# Compiles the kernel for sm_90 with Triton's own tool chain (no GPU needed) and reports, per
# storage dtype, the 16-byte vector accesses and the shared memory the kernel uses.
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import inspect, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from badm_fast.kernels import badm_triton as bt

    assert not bt.INTERPRETED
    names = list(inspect.signature(bt._badm_step_kernel.fn).parameters)
    out = {}
    for dt, cdt in [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")]:
        # (residuals, hyperparameters from pointers, found_inf + inv_scale flags)
        for res, hyp, flags in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)]:
            sig = dict(z_ptr="*" + dt, g_ptr="*" + dt, d_ptr="*" + cdt, w_ptr="*" + cdt, res_ptr="*fp64",
                       rho_ptr="*fp64", sigma_ptr="*fp64", found_ptr="*fp32", inv_scale_ptr="*fp32",
                       rho_hi="fp32", rho_lo="fp32", sigma_hi="fp32", sigma_lo="fp32", P="i64", S="i32",
                       stride_g="i64", stride_d="i64")
            block = 1024 if dt == "fp64" else 2048
            consts = dict(RHO_FROM_PTR=bool(hyp), SIGMA_FROM_PTR=bool(hyp), HAS_RESIDUALS=bool(res),
                          HAS_FOUND_INF=bool(flags), HAS_INV_SCALE=bool(flags), BLOCK=block,
                          CONTIGUITY=bt._CONTIGUITY)
            sig.update({k: "constexpr" for k in consts})
            assert sorted(sig) == sorted(names), (sorted(sig), sorted(names))
            aligned = ["z_ptr", "g_ptr", "d_ptr", "w_ptr", "res_ptr", "P", "stride_g", "stride_d"]
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            src = ASTSource(fn=bt._badm_step_kernel, signature=sig, constexprs=consts, attrs=attrs)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=8, enable_fp_fusion=False))
            ptx = k.asm["ptx"]
            out[f"{dt}-{res}-{hyp}-{flags}"] = dict(
                ld_v4=len(re.findall(r"ld\\.global[^\\n]*\\.v4", ptx)),
                st_v4=len(re.findall(r"st\\.global[^\\n]*\\.v4", ptx)),
                ld_v2=len(re.findall(r"ld\\.global[^\\n]*\\.v2", ptx)),
                fma=ptx.count("fma.rn"), shared=k.metadata.shared, has_cubin=bool(k.asm.get("cubin")))
    # The non-finite scan: a pure read, in 16-byte vectors for 4-byte rows.
    check_names = list(inspect.signature(bt._badm_nonfinite_kernel.fn).parameters)
    for dt in ["fp32", "bf16", "fp16", "fp64"]:
        sig = dict(g_ptr="*" + dt, found_ptr="*fp32", P="i64", S="i32", stride_g="i64", BLOCK="constexpr")
        assert sorted(sig) == sorted(check_names), (sorted(sig), sorted(check_names))
        attrs = {(check_names.index(n),): [["tt.divisibility", 16]] for n in ["g_ptr", "P", "stride_g"]}
        src = ASTSource(fn=bt._badm_nonfinite_kernel, signature=sig, constexprs=dict(BLOCK=bt._CHECK_BLOCK),
                        attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
        ptx = k.asm["ptx"]
        out[f"check-{dt}"] = dict(ld_v4=len(re.findall(r"ld\\.global[^\\n]*\\.v4", ptx)),
                                  ld_v2=len(re.findall(r"ld\\.global[^\\n]*\\.v2", ptx)),
                                  st=len(re.findall(r"st\\.global", ptx)), has_cubin=bool(k.asm.get("cubin")))
    print("RESULT" + json.dumps(out))
    """
)


def test_compiles_for_sm90_with_vector_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if "RESULT" not in proc.stdout:
        err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        if "nvidia" in proc.stderr.lower() or "ptxas" in proc.stderr.lower() or "backend" in proc.stderr.lower():
            pytest.skip(f"Triton cannot compile for sm_90 here: {err[0]}")
        raise AssertionError(f"compile script failed:\n{proc.stderr[-3000:]}")
    import json

    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    checks = {k: out.pop(k) for k in list(out) if k.startswith("check-")}
    for key, r in checks.items():
        assert r["has_cubin"] and r["st"] == 1, (key, r)  # the only store: the flag
        # 16 elements per thread per row (4096 / 256 threads) in 16-byte loads: itemsize of them.
        itemsize = {"check-fp32": 4, "check-bf16": 2, "check-fp16": 2, "check-fp64": 8}[key]
        assert (r["ld_v2"] if key == "check-fp64" else r["ld_v4"]) == itemsize, (key, r)
    for key, r in out.items():
        dt, res, _, _ = key.split("-")
        assert r["has_cubin"], key
        assert r["fma"] == 0, f"{key}: contracted multiply-adds (fp fusion must be off)"
        # Per thread, 8 elements per row (fp64: 4): z, one grad row, one dual row loaded and the
        # dual row and z stored per iteration, in 16-byte accesses for every 4-byte array.
        if dt == "fp32":
            assert (r["ld_v4"], r["st_v4"]) == (6, 4), (key, r)
        elif dt in ("bf16", "fp16"):
            # fp32 duals in 16-byte accesses, 2-byte z and grads in 8-byte ones.
            assert (r["ld_v4"], r["st_v4"], r["ld_v2"]) == (2, 2, 4), (key, r)
        else:
            assert r["ld_v2"] == 6, (key, r)
        # No layout conversion through shared memory; only the residual reduction uses it.
        assert (r["shared"] == 0) == (res == "0"), (key, r)
