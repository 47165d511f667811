"""Property tests (hypothesis) over random S, rho, sigma, weights, shapes and dtypes.

(a) every kernel back end available here equals the reference: through tests/parity.py's
    check_kernel (poisoned outputs, the TOLERANCES table) on random shapes, sub-batch
    counts, dtypes and row strides; and with rho, sigma and the weights drawn by hypothesis
    too, on the same poisoned inputs and fp64 oracle, with the TOLERANCES taken relative to
    the magnitude of the computed sums (see _check_hyperparameters);
(b) the fused form, as computed by every CPU back end in fp64, equals a direct transcription
    of the paper form (explicit w_s, pi_s) over several steps of random gradients and weights;
(c) at the optimizer level, the exact fast path (mode="merged": one dual buffer, one backward
    pass of the weighted loss) equals the per-sub-batch form (mode="sub_batch") when the
    weights are constant.

Runs are reproducible (derandomized, no example database) and bounded (max_examples per
property) so that the file takes well under a minute on two cores.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# The Triton interpreter mode is read when badm_fast.kernels.badm_triton is first imported.
if "badm_fast.kernels.badm_triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import parity  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import badm_fast  # noqa: E402
from badm_fast import backends, kernels, reference  # noqa: E402


def _profile(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


CPU_BACKENDS = parity.cpu_backends()

# ---------------------------------------------------------------- strategies

sub_batches = st.integers(1, 8)
rhos = st.one_of(st.just(0.0), st.floats(0.0, 20.0, allow_nan=False, allow_infinity=False))
sigmas = st.floats(0.05, 50.0, allow_nan=False, allow_infinity=False)
dtypes = st.sampled_from(parity.ALL_DTYPES)
# Sizes up to ~5000, with the block/vector boundaries (multiples of 16 and neighbours), and the
# C++ kernel's chunk boundaries (16384 elements per chunk: several chunks, several threads).
sizes = st.one_of(
    st.integers(0, 5000),
    st.sampled_from([0, 1, 15, 16, 17, 31, 33, 255, 257, 4095, 4097]),
    st.sampled_from([16383, 16385, 2 * 16384 + 7]),
)


def weight_lists(S: int):
    """S non-negative weights, not all zero (zeros included: a sub-batch may weigh nothing)."""
    w = st.one_of(st.just(0.0), st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False))

    def at_least_one_positive(drawn):
        ws, k, positive = drawn
        if sum(ws) <= 0.0:
            ws[k] = positive
        return ws

    return st.tuples(st.lists(w, min_size=S, max_size=S), st.integers(0, S - 1), st.floats(1e-3, 10.0)).map(
        at_least_one_positive
    )


def normalised(ws, dtype=torch.float64) -> torch.Tensor:
    w = torch.tensor(ws, dtype=torch.float64)
    return (w / w.sum()).to(dtype)


@st.composite
def kernel_cases(draw, max_size=None):
    S = draw(sub_batches)
    P = draw(sizes if max_size is None else st.integers(0, max_size))
    return dict(
        S=S,
        P=P,
        dtype=draw(dtypes),
        row_pad=draw(st.sampled_from([0, 0, 1, 5, 16])),
        seed=draw(st.integers(0, 2**31 - 1)),
        residuals=draw(st.booleans()),
        weights=draw(weight_lists(S)),
        rho=draw(rhos),
        sigma=draw(sigmas),
    )


# ---------------------------------------------------------------- (a) kernels equal the reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_profile(max_examples=40)
@given(case=kernel_cases())
def test_kernel_equals_the_reference_on_random_shapes(backend, case):
    """parity.check_kernel as it is (its seeded rho, sigma, weights) on hypothesis' shapes."""
    parity.check_kernel(backends.kernel_for(backend), case["S"], case["P"], case["dtype"], "cpu", case["seed"],
                        case["row_pad"], case["residuals"])


def _magnitudes(z, grads, duals, weights, rho, sigma):
    """fp64 magnitudes of the sums that form z' and pi_s': |z| + sum_s alpha_s |term_s| and
    (rho |pi_s| + sigma |g_s|) / (rho + sigma). |z'| and |pi_s'| never exceed them."""
    c = 1.0 / (rho + sigma)
    g, p = grads.detach().double(), duals.detach().double()
    terms = 2.0 * c * g.abs() + abs(rho - sigma) * (c / sigma) * p.abs()
    z_scale = z.detach().double().abs() + (weights.double().view(-1, 1) * terms).sum(0)
    return z_scale, (rho * p.abs() + sigma * g.abs()) * c


def _within(name, actual, expected, scale, dtype, low=None):
    """TOLERANCES[dtype] relative to the magnitude of the computation (and, for bf16/fp16, the
    low-precision rule of tests/parity.py: at most LOWP_FACTOR times the same-precision
    reference's error)."""
    rtol, atol = parity.TOLERANCES[dtype]
    actual = actual.detach().double()
    assert not torch.isnan(actual).any(), f"{name}: NaN in output (unwritten or poisoned element)"
    err = (actual - expected).abs()
    bound = atol + rtol * torch.maximum(scale, expected.abs())
    if low is not None:
        bound = torch.maximum(bound, parity.LOWP_FACTOR * (low.double() - expected).abs() + atol)
    bad = err > bound
    if bad.any():
        i = int(bad.nonzero()[0][-1])
        raise AssertionError(f"{name} [{dtype}]: {int(bad.sum())} of {bad.numel()} elements off; first at {i}: "
                             f"got {actual.flatten()[i].item()}, want {expected.flatten()[i].item()}")


def _check_hyperparameters(fn, case):
    """Like parity.check_kernel (same poisoned inputs, fp64 oracle and TOLERANCES rows) with the
    case's weights, rho and sigma. The tolerance is taken relative to the magnitude of the sums
    the kernel forms rather than to the result: for small sigma the terms 2 g/(rho+sigma) and
    pi/sigma are far larger than z' and no fp32 evaluation, the reference's included, is within
    a few ulps of a result that cancels (sigma=0.055, rho=0: the fp32 reference is 8e-6 off)."""
    S, P, dtype = case["S"], case["P"], case["dtype"]
    rho, sigma = case["rho"], case["sigma"]
    (z, grads, duals, _, _, _), (z_full, g_full, d_full) = parity.make_inputs(S, P, dtype, "cpu", case["seed"],
                                                                              case["row_pad"])
    weights = normalised(case["weights"], reference.compute_dtype(dtype))
    g_before = g_full.clone()
    want_z, want_d, want_res = parity.oracle(z, grads, duals, weights, rho, sigma)
    z_scale, d_scale = _magnitudes(z, grads, duals, weights, rho, sigma)
    low = None
    if dtype in (torch.bfloat16, torch.float16):
        low, dl = z.clone(), duals.clone()
        reference.fused_step_(low, grads, dl, weights, rho, sigma)
    res = torch.zeros(2, dtype=torch.float64) if case["residuals"] else None
    fn(z, grads, duals, weights, rho, sigma, res)

    _within("z", z, want_z, z_scale, dtype, low)
    _within("duals", duals, want_d, d_scale, reference.compute_dtype(dtype))
    assert torch.equal(g_full.nan_to_num(7.0), g_before.nan_to_num(7.0)), "grads were modified"
    assert torch.isnan(z_full[P:]).all(), "kernel wrote past the end of z"
    assert torch.isnan(d_full[:, P:]).all(), "kernel wrote past the P columns of duals"
    if res is not None:
        torch.testing.assert_close(res, want_res, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_profile(max_examples=40)
@given(case=kernel_cases())
def test_kernel_equals_the_reference_for_random_hyperparameters(backend, case):
    _check_hyperparameters(backends.kernel_for(backend), case)


def _interpreted_triton():
    if not kernels.triton_available():
        pytest.skip(kernels.triton_unavailable_reason())
    from badm_fast.kernels import badm_triton

    if not badm_triton.INTERPRETED:
        pytest.skip("badm_fast.kernels.badm_triton was imported before TRITON_INTERPRET=1 was set")


def _triton_big_block(z, grads, duals, weights, rho, sigma, residuals=None):
    # One program per 65536 elements: the interpreter's cost grows with the number of programs.
    return kernels.badm_step(z, grads, duals, weights, rho, sigma, residuals, block_size=65536)


@_profile(max_examples=10)
@given(case=kernel_cases(max_size=5000))
def test_triton_kernel_equals_the_reference(case):
    _interpreted_triton()
    _check_hyperparameters(_triton_big_block, case)


# ---------------------------------------------------------------- (b) fused form == paper form


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_profile(max_examples=40)
@given(data=st.data(), S=sub_batches, P=st.integers(0, 300), rho=rhos, sigma=sigmas,
       steps=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_fused_form_equals_paper_form(backend, data, S, P, rho, sigma, steps, seed):
    """Over several steps with random gradients and weights that change every step."""
    fn = backends.kernel_for(backend)
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(P, generator=gen, dtype=torch.float64)
    paper = reference.PaperState.init(w0, S)
    z = w0.clone()
    duals = torch.zeros(S, P, dtype=torch.float64)
    for t in range(steps):
        grads = torch.randn(S, P, generator=gen, dtype=torch.float64) * 3.0
        alpha = normalised(data.draw(weight_lists(S), label=f"weights of step {t}"))
        want = reference.paper_step(paper, grads, alpha, rho, sigma)
        fn(z, grads, duals, alpha, rho, sigma)
        scale = max(1.0, float(want.abs().max())) if P else 1.0
        torch.testing.assert_close(z, want, rtol=1e-9, atol=1e-10 * scale, msg=f"z after step {t}")
        torch.testing.assert_close(duals, paper.pi, rtol=1e-9, atol=1e-10 * max(1.0, sigma) * scale,
                                   msg=f"duals after step {t}")


# ---------------------------------------------------------------- (c) merged == per-sub-batch


shape_lists = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


def _losses(shapes, S, seed):
    """S smooth, non-quadratic sub-batch losses of the parameters (their gradients depend on z)."""
    gen = torch.Generator().manual_seed(seed)
    coeffs = [
        [tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)) for shape in shapes]
        for _ in range(S)
    ]

    def loss(s, params):
        total = torch.zeros((), dtype=torch.float64)
        for p, (a, b, c) in zip(params, coeffs[s]):
            total = total + 0.5 * ((a * p - b) ** 2).sum() + (c * torch.sin(p)).sum()
        return total

    return loss


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_profile(max_examples=30)
@given(data=st.data(), S=sub_batches, shapes=shape_lists, rho=rhos, sigma=sigmas, steps=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_merged_mode_equals_per_sub_batch_mode_for_constant_weights(backend, data, S, shapes, rho, sigma, steps, seed):
    ws = data.draw(weight_lists(S), label="constant weights")
    alpha = normalised(ws)
    loss = _losses(shapes, S, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    init = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a = badm_fast.BADM(a, sub_batches=S, rho=rho, sigma=sigma, backend=backend)
    opt_b = badm_fast.BADM(b, sub_batches=S, rho=rho, sigma=sigma, backend=backend, mode="merged")
    for t in range(steps):
        opt_a.zero_grad()
        for s in range(S):
            with opt_a.sub_batch(s):
                loss(s, a).backward()
        opt_a.step(weights=ws)
        opt_b.zero_grad()
        sum(float(alpha[s]) * loss(s, b) for s in range(S)).backward()  # one backward, the weighted loss
        opt_b.step(weights=ws)
        for p, q in zip(a, b):
            scale = max(1.0, float(p.detach().abs().max())) if p.numel() else 1.0
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-9, atol=1e-10 * scale,
                                       msg=f"step {t}, shape {tuple(p.shape)}")
    # the merged optimizer carries one dual row, the weighted mean of the per-sub-batch duals
    for p, q in zip(a, b):
        assert opt_b.state[q]["duals"].shape == (1, *q.shape)
        mean = (alpha.view(-1, *([1] * p.dim())) * opt_a.state[p]["duals"]).sum(0, keepdim=True)
        scale = max(1.0, float(mean.abs().max())) if p.numel() else 1.0
        torch.testing.assert_close(opt_b.state[q]["duals"], mean, rtol=1e-9, atol=1e-10 * scale)
