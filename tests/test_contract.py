"""One kernel contract, every back end: the same parity cases run through cpp, triton (the
interpreter) and torch (the reference itself), compared bit for bit with badm_fast.reference.

The CUDA back end implements the same contract; it is compile-checked here
(tests/test_cuda_compile.py) and run by bench/gpu_check.py on a GPU.
"""

import os
import sys

import pytest
import torch

if "badm_fast.kernels.badm_triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first defined

import parity  # noqa: E402

from badm_fast import backends, reference  # noqa: E402


def _backends():
    out = []
    for name in ("cpp", "triton", "torch"):
        ok, reason, _ = backends.availability(name, "cpu")
        if not ok and name == "cpp" and os.environ.get("BADM_FAST_REQUIRE_EXTENSION") == "1":
            raise RuntimeError(f"the C++ extension must be built here: {reason}")
        out.append(name if ok else pytest.param(name, marks=pytest.mark.skip(reason=reason)))
    return out


BACKENDS = _backends()


def _step(name):
    return backends.get(name)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", parity.ROWS)
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("sizes", list(parity.SIZE_MIXES.values()), ids=list(parity.SIZE_MIXES))
def test_step_gives_the_reference_bits(backend, rows, dtype, sizes):
    skip = (1,) if len(sizes) > 1 else ()
    case = parity.make_case(sizes, rows, dtype, seed=len(sizes) * 10 + rows, weight_decay=0.03, skip=skip)
    want, want_res = parity.run(reference.fused_step_, case, residuals=True)
    got, got_res = parity.run(_step(backend), case, residuals=True)
    parity.assert_same_bits(got, want)
    torch.testing.assert_close(got_res, want_res, rtol=parity.RESIDUAL_RTOL, atol=0)
    for i in skip:  # a skipped item is untouched
        assert torch.equal(got.params[i], case.params[i])
        assert all(torch.equal(got.duals[r * len(sizes) + i], case.duals[r * len(sizes) + i]) for r in range(rows))


# (weight_decay, maximize): the optional operations of a row on and off (reference.step_switches).
# -0.0 is no weight decay; 1e-50 is some (it compares unequal to 0 in float64 and rounds to 0 in
# fp32, so the term added is 0*z).
SWITCHES = [(0.0, False), (0.0, True), (0.03, False), (0.03, True), (-0.0, False), (1e-50, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("wd,maximize", SWITCHES)
def test_every_switch_combination_gives_the_reference_bits(backend, dtype, wd, maximize):
    case = parity.make_case([4097, 33, 1], 3, dtype, seed=17, weight_decay=wd, maximize=maximize, skip=(2,))
    want, want_res = parity.run(reference.fused_step_, case, residuals=True)
    got, got_res = parity.run(_step(backend), case, residuals=True)
    parity.assert_same_bits(got, want)
    torch.testing.assert_close(got_res, want_res, rtol=parity.RESIDUAL_RTOL, atol=0)


def _signed_zeros_and_nonfinite_weights(case, n_rows):
    """Edits ``case`` in place: every item's first three weights +inf, -inf, NaN; the next four
    weights +0.0 with -0.0 gradients in every row and -0.0 duals. Returns the two index ranges."""
    n = len(case.params)
    for i, z in enumerate(case.params):
        flat = z.view(-1)
        flat[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")]).to(z.dtype)
        flat[3:7] = 0.0
        for r in range(n_rows):
            case.grads[r * n + i].view(-1)[3:7] = -0.0
            case.duals[r * n + i].view(-1)[3:7] = -0.0
    return slice(0, 3), slice(3, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("wd", [0.0, -0.0, 1e-50, 0.03])
def test_weight_decay_is_skipped_only_when_zero(backend, dtype, wd):
    # Skipping g + 0*z differs from computing it only where torch.optim's skip is right: with wd = 0
    # a -0.0 gradient stays -0.0 (new dual a*(-0) - b*(-0) = +0.0) and an infinite or NaN weight
    # leaves the duals finite; with wd != 0 the term is added (new dual -0.0, non-finite duals),
    # also for 1e-50, which is 0 in fp32 (the switch compares the float64 value).
    rows = 2
    case = parity.make_case([4097, 33], rows, dtype, seed=23, weight_decay=wd)
    bad, zeros = _signed_zeros_and_nonfinite_weights(case, rows)
    want, _ = parity.run(reference.fused_step_, case)
    got, _ = parity.run(_step(backend), case)
    parity.assert_same_bits(got, want)
    for d in got.duals:
        d = d.view(-1)
        assert torch.isfinite(d[bad]).all() == (wd == 0.0), d[bad]
        assert torch.signbit(d[zeros]).all() == (wd != 0.0), d[zeros]
        assert torch.isfinite(d[7:]).all()
    for z in got.params:
        assert z.view(-1)[0] == float("inf") if wd == 0.0 else not torch.isfinite(z.view(-1)[0])
        assert z.view(-1)[2].isnan()
    if wd == 0.0:  # the duals do not depend on the weights at all
        finite = case.clone()
        for z in finite.params:
            z.view(-1)[:3] = 1.0
        other, _ = parity.run(_step(backend), finite)
        for a, b in zip(got.duals, other.duals):
            assert parity.same_bits(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("wd,maximize", SWITCHES[:4])
def test_maximize_weight_decay_and_unscale(backend, dtype, wd, maximize):
    case = parity.make_case([4097, 7], 3, dtype, seed=7, weight_decay=wd, maximize=maximize)
    inv = torch.tensor([2.0**-7])
    scaled = case.clone()
    for g in scaled.grads:
        g.mul_(2.0**7)  # exact: a power of two
    want, _ = parity.run(reference.fused_step_, case)
    got, _ = parity.run(_step(backend), scaled, inv_scale=inv)
    for a, b in zip(got.params + got.duals, want.params + want.duals):
        assert torch.equal(a, b) and parity.same_bits(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flag", [1.0, float("inf"), float("nan")])
def test_a_raised_flag_changes_nothing(backend, flag):
    case = parity.make_case([100, 4097], 2, torch.float32, seed=3)
    res = torch.tensor([0.25, 0.5], dtype=torch.float64)
    out = case.clone()
    _step(backend)(out.params, out.grads, out.duals, out.weights, out.hyper, res, torch.tensor([flag]), None)
    parity.assert_same_bits(out, case)
    assert res.tolist() == [0.25, 0.5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_residuals_are_deterministic(backend):
    case = parity.make_case([100003, 5, 4097], 4, torch.float32, seed=11)
    bits = {parity.run(_step(backend), case, residuals=True)[1].numpy().tobytes() for _ in range(3)}
    assert len(bits) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_check_and_checked_copy(backend, dtype, bad):
    _, check, copy_check = backends.get(backend)
    case = parity.make_case([33, 4097], 2, dtype, seed=5)
    tensors = [g for g in case.grads]
    flag = torch.zeros(1)
    check(tensors + [None], flag)
    assert flag.item() == 0.0
    dst = [torch.full_like(t, 3.0) for t in tensors]
    copy_check(dst, tensors, flag)
    assert flag.item() == 0.0 and all(torch.equal(d, t) for d, t in zip(dst, tensors))
    tensors[3][4096] = bad  # the last element of the last tensor
    check(tensors, flag)
    assert flag.item() == 1.0
    flag.zero_()
    copy_check(dst, tensors, flag)
    assert flag.item() == 1.0
    check([t for t in tensors[:3]], flag)  # clean tensors never clear the flag
    assert flag.item() == 1.0
