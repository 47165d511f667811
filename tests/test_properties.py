"""Property tests (hypothesis) of the kernel contract (badm_fast.reference) over random sub-batch
counts, hyperparameters, weights, tensor lists, shapes, memory layouts and dtypes.

(a) every kernel back end available here computes the reference's step
    (:func:`badm_fast.reference.fused_step_` over tensor lists, with the hyperparameter tensor,
    weight decay, maximize, found_inf, inv_scale and residuals drawn too) on poisoned inputs:
    bit for bit for fp32/fp64 parameters (what the contract promises), within the TOLERANCES
    table of tests/parity.py (taken relative to the magnitude of the sums the step forms, and
    the low-precision rule) for bf16/fp16 parameters; and its nonfinite_check / copy_check
    functions give the reference's flag and copies;
(b) the fused form, as computed by every CPU back end in fp64, equals a direct transcription
    of the paper form (explicit w_s, pi_s) over several steps of random gradients and weights;
(c) at the optimizer level, the exact fast path (mode="merged": one dual row, one backward
    pass of the weighted loss) equals the per-sub-batch form (mode="sub_batch") when the
    weights are constant.

tests/parity.py still describes the flat (S, P) contract of before the redesign; the
list-contract machinery (poisoned inputs, oracle, checks) lives here, and only its tolerance
table, low-precision factor and list of CPU back ends are used.

Runs are reproducible (derandomized, no example database) and bounded (max_examples per
property) so that the file takes about a minute on two cores.
"""

from __future__ import annotations

import math
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
from badm_fast import backends, reference  # noqa: E402


def _profile(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


CPU_BACKENDS = parity.cpu_backends()
WITH_TRITON = [*CPU_BACKENDS, "triton"]  # "triton": under the interpreter (skipped where it cannot run)
TOLERANCES = parity.TOLERANCES
LOWP_FACTOR = parity.LOWP_FACTOR
ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EXACT_DTYPES = (torch.float32, torch.float64)  # the contract promises the reference's bits
POISON = 16  # NaN elements before and after every tensor the kernels get
NAN = float("nan")

# ---------------------------------------------------------------- strategies

sub_batches = st.integers(1, 8)
rhos = st.one_of(st.just(0.0), st.floats(0.0, 20.0, allow_nan=False, allow_infinity=False))
sigmas = st.floats(0.05, 50.0, allow_nan=False, allow_infinity=False)
lrs = st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False))
momenta = st.one_of(st.sampled_from([0.0, 0.5, 0.9]), st.floats(0.0, 0.999, allow_nan=False, allow_infinity=False))
weight_decays = st.one_of(st.just(0.0), st.floats(0.0, 0.1, allow_nan=False, allow_infinity=False))
dtypes = st.sampled_from(ALL_DTYPES)
# 1-D sizes up to ~5000, with the block/vector boundaries (multiples of 16 and neighbours), and the
# C++ kernel's chunk boundaries (16384 elements per chunk: several chunks, several threads).
sizes = st.one_of(
    st.integers(0, 5000),
    st.sampled_from([0, 1, 15, 16, 17, 31, 33, 255, 257, 4095, 4097]),
    st.sampled_from([16383, 16385, 2 * 16384 + 7]),
)
small_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


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
def items(draw, max_size=None):
    """One parameter: its shape and the memory order of its dims (dense, not always contiguous)."""
    if max_size is None:
        shape = draw(st.one_of(small_shapes, sizes.map(lambda n: (n,))))
    else:
        shape = (draw(st.integers(0, max_size)),)
    order = draw(st.permutations(range(len(shape))))
    return tuple(shape), tuple(order)


@st.composite
def step_cases(draw, max_size=None, max_items=4):
    S = draw(sub_batches)
    its = draw(st.lists(items(max_size), min_size=1, max_size=max_items))
    return dict(
        S=S,
        items=its,
        skipped=draw(st.lists(st.booleans(), min_size=len(its), max_size=len(its))),
        dtype=draw(dtypes),
        seed=draw(st.integers(0, 2**31 - 1)),
        weights=draw(weight_lists(S)),
        lr=draw(lrs),
        momentum=draw(momenta),
        weight_decay=draw(weight_decays),
        maximize=draw(st.booleans()),
        residuals=draw(st.booleans()),
        found_inf=draw(st.sampled_from([None, None, 0.0, 1.0])),
        inv_scale=draw(st.one_of(st.none(), st.sampled_from([2.0**-10, 0.5, 1.0]), st.floats(1e-3, 4.0))),
    )


# ---------------------------------------------------------------- poisoned inputs (list contract)


class Poisoned:
    """A dense tensor of ``shape`` whose dims lie in memory in ``order`` (outermost first),
    inside a buffer with POISON NaN elements before and after it."""

    def __init__(self, shape, order, dtype, values: torch.Tensor | None):
        n = math.prod(shape)
        self.full = torch.full((n + 2 * POISON,), NAN, dtype=dtype)
        stored = self.full[POISON : POISON + n].view([shape[d] for d in order])
        inverse = sorted(range(len(order)), key=lambda j: order[j])
        self.t = stored.permute(inverse) if shape else stored
        assert tuple(self.t.shape) == tuple(shape)
        if values is not None:
            self.t.copy_(values.to(dtype))

    def poison_intact(self) -> bool:
        return bool(torch.isnan(self.full[:POISON]).all() and torch.isnan(self.full[-POISON:]).all())


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1).clone()
    return t.view(torch.uint8) if t.numel() else t


def make_step_inputs(case):
    """The contract's arguments for ``case`` as poisoned views: params (N), grads (R*N; None at
    item i for a skipped item, whose other rows are NaN), duals (R*N, compute dtype)."""
    S, dtype = case["S"], case["dtype"]
    cdt = reference.compute_dtype(dtype)
    gen = torch.Generator().manual_seed(case["seed"])
    params, grads, duals = [], [None] * (S * len(case["items"])), [None] * (S * len(case["items"]))
    n = len(case["items"])
    for i, (shape, order) in enumerate(case["items"]):
        params.append(Poisoned(shape, order, dtype, torch.randn(shape, generator=gen, dtype=torch.float64)))
        for r in range(S):
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0
            if case["skipped"][i]:
                g = None if r == 0 else torch.full(shape, NAN, dtype=torch.float64)
            grads[r * n + i] = None if g is None else Poisoned(shape, order, dtype, g)
            duals[r * n + i] = Poisoned(shape, order, cdt, torch.randn(shape, generator=gen, dtype=torch.float64))
    weights = normalised(case["weights"], cdt)
    hyper = reference.hyper_tensor(case["lr"], case["momentum"], case["weight_decay"], case["maximize"])
    return params, grads, duals, weights, hyper


def _views(poisoned):
    return [None if p is None else p.t for p in poisoned]


def _extras(case):
    res = torch.tensor([0.25, 0.5], dtype=torch.float64) if case["residuals"] else None  # added to
    found = None if case["found_inf"] is None else torch.tensor([case["found_inf"]], dtype=torch.float32)
    inv = None if case["inv_scale"] is None else torch.tensor([case["inv_scale"]], dtype=torch.float32)
    return res, found, inv


def _run_reference(params, grads, duals, weights, hyper, case, dtype=None):
    """The reference on copies (in ``dtype``, the parameters' own by default); returns them."""
    def cp(t, dt):
        return None if t is None else t.detach().clone().to(dt)

    pdt = dtype or params[0].dtype
    ddt = dtype or duals[0].dtype
    p2 = [cp(p, pdt) for p in params]
    g2 = [cp(g, pdt) for g in grads]
    d2 = [cp(d, ddt) for d in duals]
    res, found, inv = _extras(case)
    reference.fused_step_(p2, g2, d2, weights.to(ddt), hyper, res, found, inv)
    return p2, d2, res


def _magnitudes(params, grads, duals, weights, case):
    """fp64 magnitudes of the sums that form z' and pi_s' (|z'| and |pi_s'| never exceed them):
    |z| + sum_s alpha_s (2 lr |g_s| + |lr (2mu-1)/(1-mu)| |pi_s|) and mu |pi_s| + (1-mu) |g_s|,
    with |g_s| <= |G_s| inv_scale + wd |z|."""
    lr, mu, wd = case["lr"], case["momentum"], case["weight_decay"]
    inv = 1.0 if case["inv_scale"] is None else float(torch.tensor(case["inv_scale"], dtype=torch.float32))
    n, S = len(params), case["S"]
    d_coef = abs(lr * (2 * mu - 1) / (1 - mu))
    z_scale, d_scale = [], [None] * (S * n)
    for i, z in enumerate(params):
        z64 = z.detach().double().abs()
        acc = z64.clone()
        for r in range(S):
            g = grads[r * n + i]
            g64 = (g.detach().double().abs() * inv if g is not None else torch.zeros_like(z64)) + wd * z64
            p64 = duals[r * n + i].detach().double().abs()
            acc = acc + float(weights[r]) * (2 * lr * g64 + d_coef * p64)
            d_scale[r * n + i] = mu * p64 + (1 - mu) * g64
        z_scale.append(acc)
    return z_scale, d_scale


def _within(name, actual, expected, scale, dtype, low=None):
    """TOLERANCES[dtype] relative to the magnitude of the computation (and, for bf16/fp16, the
    low-precision rule of tests/parity.py: at most LOWP_FACTOR times the same-precision
    reference's error)."""
    rtol, atol = TOLERANCES[dtype]
    actual = actual.detach().double()
    assert not torch.isnan(actual).any(), f"{name}: NaN in output (unwritten or poisoned element)"
    err = (actual - expected).abs()
    bound = atol + rtol * torch.maximum(scale, expected.abs())
    if low is not None:
        bound = torch.maximum(bound, LOWP_FACTOR * (low.double() - expected).abs() + atol)
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0][-1])
        raise AssertionError(f"{name} [{dtype}]: {int(bad.sum())} of {bad.numel()} elements off; first at {i}: "
                             f"got {actual.flatten()[i].item()}, want {expected.flatten()[i].item()}")


def check_step(step, case):
    """Run the back end's ``step`` on the case's poisoned inputs and compare with the reference."""
    dtype, S = case["dtype"], case["S"]
    cdt = reference.compute_dtype(dtype)
    P, G, D, weights, hyper = make_step_inputs(case)
    params, grads, duals = _views(P), _views(G), _views(D)
    n = len(params)
    g_before = [None if g is None else _bits(g.full) for g in G]
    p_before = [_bits(p) for p in params]
    d_before = [_bits(d) for d in duals]
    same_p, same_d, same_res = _run_reference(params, grads, duals, weights, hyper, case)
    want_p, want_d, want_res = _run_reference(params, grads, duals, weights, hyper, case, torch.float64)
    z_scale, d_scale = _magnitudes(params, grads, duals, weights, case)

    res, found, inv = _extras(case)
    res0 = None if res is None else res.clone()
    step(params, grads, duals, weights, hyper, res, found, inv)

    for g, b in zip(G, g_before):
        assert g is None or torch.equal(_bits(g.full), b), "grads were modified"
    assert all(p.poison_intact() for p in P), "the kernel wrote outside a parameter"
    assert all(d.poison_intact() for d in D), "the kernel wrote outside a dual"
    refused = case["found_inf"] == 1.0
    for i in range(n):
        rows = range(S)
        if refused or case["skipped"][i]:  # nothing may change, bit for bit
            assert torch.equal(_bits(params[i]), p_before[i]), f"param {i} changed"
            assert all(torch.equal(_bits(duals[r * n + i]), d_before[r * n + i]) for r in rows), f"duals {i} changed"
            continue
        if dtype in EXACT_DTYPES:
            assert torch.equal(_bits(params[i]), _bits(same_p[i])), f"param {i}: not the reference's bits"
            for r in rows:
                assert torch.equal(_bits(duals[r * n + i]), _bits(same_d[r * n + i])), f"duals {i} row {r}: not bits"
        else:
            _within(f"param {i}", params[i], want_p[i], z_scale[i], dtype, low=same_p[i])
            for r in rows:
                k = r * n + i
                _within(f"duals {i} row {r}", duals[k], want_d[k], d_scale[k], cdt)
    if res is not None:
        if refused or all(case["skipped"]):
            assert torch.equal(res, res0), "residuals changed by a refused or empty call"
        else:
            rtol = 1e-10 if cdt == torch.float64 else 1e-4
            torch.testing.assert_close(res, want_res, rtol=rtol, atol=1e-9)


# ---------------------------------------------------------------- (a) kernels equal the reference


def _contract(backend: str):
    """``(step, nonfinite, copy_check)`` of ``backend``; "triton" runs under the interpreter only."""
    if backend == "triton":
        ok, reason, _ = backends.availability("triton", "cpu")
        if not ok:
            pytest.skip(reason)
        from badm_fast.kernels import badm_triton

        if not badm_triton.INTERPRETED:
            pytest.skip("badm_fast.kernels.badm_triton was imported before TRITON_INTERPRET=1 was set")
    try:
        return backends.get(backend)
    except (AttributeError, ImportError) as exc:  # a back end not yet on the list contract
        pytest.skip(f"backend {backend!r} does not provide the list contract here: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@_profile(max_examples=40)
@given(case=step_cases())
def test_kernel_equals_the_reference_on_random_tensor_lists(backend, case):
    check_step(_contract(backend)[0], case)


@st.composite
def check_cases(draw):
    its = draw(st.lists(items(), min_size=1, max_size=4))
    return dict(
        items=its,
        dtype=draw(dtypes),
        none=draw(st.lists(st.booleans(), min_size=len(its), max_size=len(its))),
        bad=draw(st.one_of(st.none(), st.tuples(st.integers(0, len(its) - 1), st.floats(0, 1),
                                                st.sampled_from([NAN, math.inf, -math.inf])))),
        flag=draw(st.sampled_from([0.0, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _check_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    src = []
    for k, (shape, order) in enumerate(case["items"]):
        p = Poisoned(shape, order, case["dtype"], torch.randn(shape, generator=gen, dtype=torch.float64))
        if case["bad"] is not None and case["bad"][0] == k and p.t.numel():
            flat_index = int(case["bad"][1] * (p.t.numel() - 1))
            idx = torch.unravel_index(torch.tensor(flat_index), p.t.shape) if p.t.dim() else ()
            p.t[tuple(int(i) for i in idx)] = case["bad"][2]
        src.append(None if case["none"][k] else p)
    return src


@pytest.mark.parametrize("backend", WITH_TRITON)
@_profile(max_examples=30)
@given(case=check_cases())
def test_nonfinite_and_copy_checks_equal_the_reference(backend, case):
    _, nonfinite, copy_check = _contract(backend)
    src = _check_inputs(case)
    tensors = _views(src)
    want = torch.tensor([case["flag"]], dtype=torch.float32)
    reference.nonfinite_check_(tensors, want)
    got = torch.tensor([case["flag"]], dtype=torch.float32)
    nonfinite(tensors, got)
    assert torch.equal(got, want)

    dst = [Poisoned(shape, order, case["dtype"], None) for shape, order in case["items"]]
    for d in dst:
        d.t.fill_(-3.0)
    before = [None if s is None else _bits(s.full) for s in src]
    got = torch.tensor([case["flag"]], dtype=torch.float32)
    copy_check(_views(dst), tensors, got)
    assert torch.equal(got, want)  # the same flag from the copied values
    for d, s, b in zip(dst, src, before):
        assert d.poison_intact(), "copy_check wrote outside its destination"
        if s is None:
            assert (d.t == -3.0).all(), "a None source changed its destination"
        else:
            assert torch.equal(_bits(s.full), b), "copy_check changed its source"
            assert torch.equal(_bits(d.t), _bits(s.t)), "not a bit-exact copy"


@_profile(max_examples=25)
@given(case=step_cases(max_size=5000))
def test_triton_kernel_equals_the_reference(case):
    """The Triton back end under TRITON_INTERPRET=1 (1-D tensors up to 5000 elements: the
    interpreter's cost grows with the number of programs)."""
    check_step(_contract("triton")[0], case)


# ---------------------------------------------------------------- (b) fused form == paper form


@pytest.mark.parametrize("backend", WITH_TRITON)
@_profile(max_examples=40)
@given(data=st.data(), S=sub_batches, P=st.integers(0, 300), rho=rhos, sigma=sigmas,
       steps=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_fused_form_equals_paper_form(backend, data, S, P, rho, sigma, steps, seed):
    """Over several steps with random gradients and weights that change every step; the P
    weights split into up to three tensors of one kernel call."""
    step = _contract(backend)[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, P), max_size=2), label="tensor boundaries"))
    bounds = list(zip([0, *cuts], [*cuts, P]))
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(P, generator=gen, dtype=torch.float64)
    paper = reference.PaperState.init(w0, S)
    z = w0.clone()
    duals = torch.zeros(S, P, dtype=torch.float64)
    hyper = reference.hyper_tensor(*reference.lr_momentum(rho, sigma))
    params = [z[a:b] for a, b in bounds]
    dual_views = [duals[r, a:b] for r in range(S) for a, b in bounds]
    for t in range(steps):
        grads = torch.randn(S, P, generator=gen, dtype=torch.float64) * 3.0
        alpha = normalised(data.draw(weight_lists(S), label=f"weights of step {t}"))
        want = reference.paper_step(paper, grads, alpha, rho, sigma)
        step(params, [grads[r, a:b] for r in range(S) for a, b in bounds], dual_views, alpha, hyper,
             None, None, None)
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
@given(data=st.data(), S=sub_batches, shapes=shape_lists, rho=rhos, sigma=sigmas, weight_decay=weight_decays,
       maximize=st.booleans(), steps=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_merged_mode_equals_per_sub_batch_mode_for_constant_weights(backend, data, S, shapes, rho, sigma,
                                                                    weight_decay, maximize, steps, seed):
    ws = data.draw(weight_lists(S), label="constant weights")
    alpha = normalised(ws)
    loss = _losses(shapes, S, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    init = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(sub_batches=S, rho=rho, sigma=sigma, weight_decay=weight_decay, maximize=maximize, backend=backend)
    opt_a = badm_fast.BADM(a, **kw)
    opt_b = badm_fast.BADM(b, mode="merged", **kw)
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
        assert opt_a.state[p]["duals"].shape == (S, *p.shape)
        mean = (alpha.view(-1, *([1] * p.dim())) * opt_a.state[p]["duals"]).sum(0, keepdim=True)
        scale = max(1.0, float(mean.abs().max())) if p.numel() else 1.0
        torch.testing.assert_close(opt_b.state[q]["duals"], mean, rtol=1e-9, atol=1e-10 * scale)
