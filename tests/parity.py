"""Shared parity machinery: every kernel back end is compared with badm_fast.reference.

Inputs are fresh random data per case; outputs are poisoned (NaN) outside the region the
kernel must write and the in-place outputs are compared with an fp64 evaluation of the
reference. Tolerances come from TOLERANCES, one row per storage dtype.
"""

from __future__ import annotations

import pytest
import torch

from badm_fast import backends, reference

# (rtol, atol) for values stored in each dtype, comparing a kernel to the fp64 oracle.
# fp32/fp64: a few ulps of the storage dtype (summation order over S differs between
# kernels). bf16/fp16: two ulps of the storage dtype (the fp32 result is rounded once, and
# an fp32 result within an ulp of a rounding boundary may round either way).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.bfloat16: (2 * 2.0**-8, 2 * 2.0**-8),
    torch.float16: (2 * 2.0**-11, 2 * 2.0**-11),
}

# Low-precision rule (see STYLE.md): the kernel's error against the fp64 oracle may be at
# most LOWP_FACTOR times the error of the reference run in the same storage dtype, plus the
# absolute floor of the table.
LOWP_FACTOR = 2.0

ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 4097, 100003]
SUB_BATCHES = [1, 2, 3, 8]
POISON = 16  # poisoned elements after z


def make_inputs(S, P, dtype, device="cpu", seed=0, row_pad=0):
    """Random z, grads (S, P), duals (S, P), normalised weights, rho, sigma.

    z, grads and duals are views into larger buffers whose extra elements are NaN (the
    poison): ``row_pad`` > 0 widens the rows of grads/duals (a row stride larger than P, as
    the optimizer produces when it skips parameters) and z is followed by 16 poisoned
    elements. A kernel that reads past its P columns yields NaN; one that writes there
    removes the poison. Returns the views and the full buffers.
    """
    gen = torch.Generator().manual_seed(seed)
    cdt = reference.compute_dtype(dtype)
    nan = float("nan")
    z_full = torch.full((P + POISON,), nan, dtype=dtype)
    z_full[:P] = torch.randn(P, generator=gen, dtype=torch.float64).to(dtype)
    g_full = torch.full((S, P + row_pad), nan, dtype=dtype)
    g_full[:, :P] = torch.randn(S, P, generator=gen, dtype=torch.float64).to(dtype)
    d_full = torch.full((S, P + row_pad), nan, dtype=cdt)
    d_full[:, :P] = torch.randn(S, P, generator=gen, dtype=torch.float64).to(cdt)
    w = torch.rand(S, generator=gen, dtype=torch.float64) + 0.1
    weights = (w / w.sum()).to(cdt).to(device)
    rho = float(torch.rand((), generator=gen) * 2.0)
    sigma = float(torch.rand((), generator=gen) * 4.0 + 0.5)
    z_full, g_full, d_full = z_full.to(device), g_full.to(device), d_full.to(device)
    views = (z_full[:P], g_full[:, :P], d_full[:, :P], weights, rho, sigma)
    return views, (z_full, g_full, d_full)


def oracle(z, grads, duals, weights, rho, sigma):
    """The reference evaluated in fp64; returns (z', duals', residuals)."""
    z64 = z.detach().cpu().double().clone()
    d64 = duals.detach().cpu().double().clone()
    res = torch.zeros(2, dtype=torch.float64)
    reference.fused_step_(z64, grads.detach().cpu().double(), d64, weights.cpu().double(), rho, sigma, res)
    return z64, d64, res


def _tol_check(name, actual, expected, low_baseline, dtype):
    rtol, atol = TOLERANCES[dtype]
    actual = actual.detach().cpu().double()
    assert not torch.isnan(actual).any(), f"{name}: NaN in output (unwritten or poisoned element)"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if low_baseline is not None:
        bound = torch.maximum(bound, LOWP_FACTOR * (low_baseline.detach().cpu().double() - expected).abs() + atol)
    bad = err > bound
    if bad.any():
        i = int(bad.nonzero()[0][-1])
        raise AssertionError(
            f"{name} [{dtype}]: {int(bad.sum())} of {bad.numel()} elements off; "
            f"first at {i}: got {actual.flatten()[i].item()}, want {expected.flatten()[i].item()}"
        )


def check_kernel(fn, S, P, dtype, device="cpu", seed=0, row_pad=0, residuals=False):
    """Run ``fn(z, grads, duals, weights, rho, sigma[, residuals])`` and compare with the oracle.

    ``fn`` mutates z and duals in place, like reference.fused_step_. Checks every written
    element against the fp64 oracle with the TOLERANCES row of the dtype, that the poison
    around the views is intact, and that grads are unchanged.
    """
    (z, grads, duals, weights, rho, sigma), (z_full, g_full, d_full) = make_inputs(
        S, P, dtype, device, seed, row_pad
    )
    g_before = g_full.clone()
    want_z, want_d, want_res = oracle(z, grads, duals, weights, rho, sigma)

    # Same-precision run of the reference: the baseline of the low-precision rule.
    low = None
    if dtype in (torch.bfloat16, torch.float16):
        zl, dl = z.detach().cpu().clone(), duals.detach().cpu().clone()
        reference.fused_step_(zl, grads.cpu(), dl, weights.cpu(), rho, sigma)
        low = zl

    res = torch.zeros(2, dtype=torch.float64, device=device) if residuals else None
    if residuals:
        fn(z, grads, duals, weights, rho, sigma, res)
    else:
        fn(z, grads, duals, weights, rho, sigma)

    _tol_check("z", z, want_z, low, dtype)
    _tol_check("duals", duals, want_d, None, reference.compute_dtype(dtype))
    assert torch.equal(g_full.cpu().nan_to_num(7.0), g_before.cpu().nan_to_num(7.0)), "grads were modified"
    assert torch.isnan(z_full[P:]).all(), "kernel wrote past the end of z"
    assert torch.isnan(d_full[:, P:]).all(), "kernel wrote past the P columns of duals"
    if residuals:
        torch.testing.assert_close(res.cpu(), want_res, rtol=1e-4, atol=1e-9)
    return z, duals


def cpu_backends():
    """The back ends that run on CPU tensors here, as pytest parameters; ``cpp`` is skipped
    (with the reason) when the extension is not built."""
    ok, reason, _ = backends.availability("cpp", "cpu")
    return ["torch", "cpp" if ok else pytest.param("cpp", marks=pytest.mark.skip(reason=reason))]
