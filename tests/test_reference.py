"""The reference (badm_fast.reference): the fused form of the kernel contract against a direct
transcription of the paper form, the hyperparameter bijection, the QHM and SGD identities, the
residual definitions, and the contract's own rules (weight decay, maximize, found_inf,
inv_scale, skipped items, several tensors per call)."""

import math

import pytest
import torch

from badm_fast import reference


def _quadratic_problem(S, P, seed):
    """Sub-batch losses F_s(z) = 0.5 z^T A_s z - b_s^T z with gradient A_s z - b_s."""
    gen = torch.Generator().manual_seed(seed)
    A = []
    for _ in range(S):
        M = torch.randn(P, P, generator=gen, dtype=torch.float64) / P**0.5
        A.append(M @ M.T + 0.1 * torch.eye(P, dtype=torch.float64))
    A = torch.stack(A)
    b = torch.randn(S, P, generator=gen, dtype=torch.float64)
    return lambda z: torch.einsum("spq,q->sp", A, z) - b


def _hyper(rho, sigma, weight_decay=0.0, maximize=False):
    return reference.hyper_tensor(*reference.lr_momentum(rho, sigma), weight_decay, maximize)


def fused(z, grads, duals, alpha, hyper, residuals=None, found_inf=None, inv_scale=None):
    """One tensor ``z`` (N = 1) through the list contract: ``grads``/``duals`` are (S, *z.shape),
    their rows passed as views (so ``duals`` is updated in place)."""
    reference.fused_step_([z], list(grads.unbind(0)), list(duals.unbind(0)), alpha, hyper, residuals,
                          found_inf, inv_scale)


# ---------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("rho,sigma", [(0.0, 8.0), (3.0, 2.0), (2.0, 2.0), (18.0, 2.0), (9.0, 10.0), (1e-3, 1e3)])
def test_lr_momentum_is_the_exact_bijection(rho, sigma):
    lr, mu = reference.lr_momentum(rho, sigma)
    assert lr == 1.0 / (rho + sigma) and mu == rho / (rho + sigma)
    assert 0 <= mu < 1
    r, s = reference.rho_sigma(lr, mu)
    assert r == pytest.approx(rho, rel=1e-14, abs=1e-300) and s == pytest.approx(sigma, rel=1e-14)
    assert reference.rho_sigma(0.0, 0.5) == (math.inf, math.inf)


def test_hyper_tensor_layout():
    h = reference.hyper_tensor(0.25, 0.75, 1e-4, True)
    assert h.dtype == torch.float64 and h.shape == (4,)
    assert reference.HYPER == ("lr", "momentum", "weight_decay", "maximize")
    assert h.tolist() == [0.25, 0.75, 1e-4, 1.0]
    assert reference.hyper_tensor(0.1, 0.0).tolist() == [0.1, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_constants_are_derived_in_float64_and_rounded_once(dtype):
    lr, mu, wd = 0.1, 0.7, 3e-4
    k = reference.step_constants(reference.hyper_tensor(lr, mu, wd, True), dtype)
    want = {"a": mu, "b": 1.0 - mu, "c": -2.0 * lr, "d": (lr * (2.0 * mu - 1.0)) / (1.0 - mu), "e": lr, "wd": wd,
            "sign": -1.0}
    assert k.keys() == want.keys()
    for name, v in want.items():
        assert k[name].dtype == dtype and k[name].dim() == 0
        assert torch.equal(k[name], torch.tensor(v, dtype=torch.float64).to(dtype)), name


def test_compute_dtype():
    assert reference.compute_dtype(torch.float64) == torch.float64
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert reference.compute_dtype(dt) == torch.float32


# ---------------------------------------------------------------- fused form == paper form


@pytest.mark.parametrize("S", [1, 2, 3, 8])
@pytest.mark.parametrize("rho,sigma", [(0.0, 8.0), (3.0, 2.0), (2.0, 2.0), (18.0, 2.0)])
def test_fused_form_matches_paper_form_over_many_steps(S, rho, sigma):
    P, steps = 13, 60
    grad = _quadratic_problem(S, P, seed=S)
    gen = torch.Generator().manual_seed(100 + S)
    w0 = torch.randn(P, dtype=torch.float64, generator=gen)
    hyper = _hyper(rho, sigma)

    paper = reference.PaperState.init(w0, S)
    z = w0.clone()
    duals = torch.zeros(S, P, dtype=torch.float64)
    for t in range(steps):
        # weights change every step (ragged batches, weighted sampling)
        w = torch.rand(S, generator=gen, dtype=torch.float64) + 0.05
        alpha = w / w.sum()
        z_paper_before = paper.aggregate(sigma)
        torch.testing.assert_close(z, z_paper_before, rtol=1e-10, atol=1e-10, msg=f"step {t}")
        g = grad(z)
        z_paper = reference.paper_step(paper, g, alpha, rho, sigma)
        fused(z, g, duals, alpha, hyper)
        torch.testing.assert_close(z, z_paper, rtol=1e-10, atol=1e-10, msg=f"step {t}")
    assert z.abs().max() < 1e6  # the trajectory stayed bounded, so the comparison was meaningful


def test_paper_form_duals_match_fused_duals():
    S, P, rho, sigma = 3, 5, 1.5, 2.5
    grad = _quadratic_problem(S, P, seed=7)
    w0 = torch.linspace(-1, 1, P, dtype=torch.float64)
    paper = reference.PaperState.init(w0, S)
    z, duals = w0.clone(), torch.zeros(S, P, dtype=torch.float64)
    alpha = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    for _ in range(20):
        g = grad(z)
        reference.paper_step(paper, g, alpha, rho, sigma)
        fused(z, g, duals, alpha, _hyper(rho, sigma))
    torch.testing.assert_close(duals, paper.pi, rtol=1e-10, atol=1e-12)


def test_fused_form_is_the_documented_lr_momentum_update():
    """pi_s' = mu pi_s - (1 - mu) g_s;  z' = z + sum_s alpha_s [-2 lr g_s + lr (2mu - 1)/(1 - mu) pi_s]."""
    S, P, lr, mu = 3, 10, 0.05, 0.8
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(P, generator=gen, dtype=torch.float64)
    g = torch.randn(S, P, generator=gen, dtype=torch.float64)
    pi = torch.randn(S, P, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    want_pi = mu * pi - (1 - mu) * g
    want_z = z + (alpha.view(-1, 1) * (-2 * lr * g + lr * (2 * mu - 1) / (1 - mu) * pi)).sum(0)
    z_new, d = z.clone(), pi.clone()
    fused(z_new, g, d, alpha, reference.hyper_tensor(lr, mu))
    torch.testing.assert_close(z_new, want_z, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(d, want_pi, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("rho,sigma", [(9.0, 10.0), (30.0, 5.0), (1.0, 4.0)])
def test_qhm_identity(rho, sigma):
    """BADM with S sub-batches and constant weights is QHM on the weighted mean gradient
    (docs/algorithm.md): lr = 1/sigma, beta = rho/(rho+sigma) (= momentum), nu = 1 - sigma/rho."""
    S, P, steps = 4, 11, 80
    grad = _quadratic_problem(S, P, seed=3)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    z = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta = z.clone()
    duals = torch.zeros(S, P, dtype=torch.float64)
    lr, beta, nu = 1.0 / sigma, rho / (rho + sigma), 1.0 - sigma / rho
    assert beta == pytest.approx(reference.lr_momentum(rho, sigma)[1], rel=1e-15)
    buf = torch.zeros(P, dtype=torch.float64)
    for t in range(steps):
        fused(z, grad(z), duals, alpha, _hyper(rho, sigma))
        g = (alpha.view(-1, 1) * grad(theta)).sum(0)  # a hand-written QHM step
        buf = beta * buf + (1 - beta) * g
        theta = theta - lr * ((1 - nu) * g + nu * buf)
        torch.testing.assert_close(z, theta, rtol=1e-9, atol=1e-11, msg=f"step {t}")


def test_rho_equal_sigma_is_plain_sgd():
    """rho == sigma (momentum 0.5) is SGD with learning rate 1/sigma = 2 lr."""
    S, P, sigma = 2, 6, 4.0
    grad = _quadratic_problem(S, P, seed=5)
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    z = torch.ones(P, dtype=torch.float64)
    theta = z.clone()
    duals = torch.zeros(S, P, dtype=torch.float64)
    lr, mu = reference.lr_momentum(sigma, sigma)
    assert mu == 0.5 and lr == 1.0 / (2 * sigma)
    for _ in range(30):
        fused(z, grad(z), duals, alpha, _hyper(sigma, sigma))
        theta = theta - (alpha.view(-1, 1) * grad(theta)).sum(0) / sigma
    torch.testing.assert_close(z, theta, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_constant_gradient_steady_state_is_sgd_with_momentum(momentum):
    """Under a constant gradient the step tends to torch.optim.SGD(lr, momentum)'s steady step
    -lr g / (1 - momentum) (no dampening)."""
    lr, P = 0.01, 7
    g = torch.linspace(-1, 1, P, dtype=torch.float64)
    z = torch.zeros(P, dtype=torch.float64)
    duals = torch.zeros(1, P, dtype=torch.float64)
    hyper = reference.hyper_tensor(lr, momentum)
    one = torch.ones(1, dtype=torch.float64)
    for _ in range(4000):
        before = z.clone()
        fused(z, g.unsqueeze(0), duals, one, hyper)
    torch.testing.assert_close(z - before, -lr * g / (1 - momentum), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(duals[0], -g, rtol=1e-9, atol=1e-15)  # the dual's fixed point


def test_lr_zero_keeps_the_weights_and_moves_the_duals():
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(9, generator=gen, dtype=torch.float64)
    g, pi = torch.randn(2, 9, generator=gen, dtype=torch.float64), torch.randn(2, 9, generator=gen, dtype=torch.float64)
    z_new, d = z.clone(), pi.clone()
    fused(z_new, g, d, torch.tensor([0.5, 0.5], dtype=torch.float64), reference.hyper_tensor(0.0, 0.6))
    assert torch.equal(z_new, z)
    assert torch.equal(d, 0.6 * pi - (1.0 - 0.6) * g)


# ---------------------------------------------------------------- the contract's rules


def _random_step_inputs(S=3, shape=(4, 5), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cdt = reference.compute_dtype(dtype)
    z = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(S, *shape, generator=gen, dtype=torch.float64).to(dtype)
    pi = torch.randn(S, *shape, generator=gen, dtype=torch.float64).to(cdt)
    w = torch.rand(S, generator=gen, dtype=torch.float64) + 0.1
    return z, g, pi, (w / w.sum()).to(cdt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_decay_adds_wd_z_to_every_gradient(dtype):
    wd = 0.125  # a power of two: wd * z is exact, so both sides compute the same bits
    z, g, pi, alpha = _random_step_inputs(dtype=dtype)
    a, da = z.clone(), pi.clone()
    fused(a, g, da, alpha, reference.hyper_tensor(0.1, 0.7, wd))
    b, db = z.clone(), pi.clone()
    fused(b, g + wd * z, db, alpha, reference.hyper_tensor(0.1, 0.7))
    assert torch.equal(a, b) and torch.equal(da, db)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maximize_negates_every_gradient(dtype):
    z, g, pi, alpha = _random_step_inputs(dtype=dtype)
    a, da = z.clone(), pi.clone()
    fused(a, g, da, alpha, reference.hyper_tensor(0.1, 0.7, 0.0, True))
    b, db = z.clone(), pi.clone()
    fused(b, -g, db, alpha, reference.hyper_tensor(0.1, 0.7))
    assert torch.equal(a, b) and torch.equal(da, db)


@pytest.mark.parametrize("wd,mx,want", [(0.0, 0.0, (False, False)), (-0.0, 0.0, (False, False)),
                                         (1e-50, 1.0, (True, True)), (0.03, 0.0, (True, False)),
                                         (-0.5, 1.0, (True, True)), (0.0, 1.0, (False, True))])
def test_step_switches_compare_in_float64(wd, mx, want):
    # 1e-50 rounds to 0 in fp32 and still switches the weight decay on: the rule is torch.optim's
    # `weight_decay != 0` on the float64 value.
    decay, maximize = reference.step_switches(reference.hyper_tensor(0.1, 0.5, wd, mx))
    assert decay.dtype == maximize.dtype == torch.bool and decay.dim() == maximize.dim() == 0
    assert (bool(decay), bool(maximize)) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_weight_decay_adds_nothing(dtype):
    # wd = 0: the term is skipped as in torch.optim, not computed as 0*z: a -0.0 gradient stays
    # -0.0 (with a -0.0 dual the new dual is a*(-0) - b*(-0) = +0.0; adding +0.0 first would give
    # -0.0) and an infinite or NaN weight does not make the gradient NaN.
    z, g, pi, alpha = _random_step_inputs(shape=(20,), dtype=dtype)
    z[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype)
    z[3:8] = 0.0
    g[:, 3:8] = -0.0
    pi[:, 3:8] = -0.0
    k = reference.step_constants(reference.hyper_tensor(0.1, 0.7), reference.compute_dtype(dtype))
    a, da = z.clone(), pi.clone()
    fused(a, g, da, alpha, reference.hyper_tensor(0.1, 0.7, 0.0))
    assert torch.equal(da, k["a"] * pi - k["b"] * g)  # the gradient alone, no 0*z
    assert torch.isfinite(da).all()
    assert not torch.signbit(da[:, 3:8]).any()
    assert a[0] == float("inf") and a[1] == -float("inf") and a[2].isnan()
    # wd != 0: the term is added, and the same inputs give -0.0 duals and non-finite ones
    b, db = z.clone(), pi.clone()
    fused(b, g, db, alpha, reference.hyper_tensor(0.1, 0.7, 0.125))
    assert torch.signbit(db[:, 3:8]).all()
    assert not torch.isfinite(db[:, :3]).any() and torch.isfinite(db[:, 8:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_inv_scale_unscales_every_gradient(dtype):
    z, g, pi, alpha = _random_step_inputs(dtype=dtype)
    hyper = reference.hyper_tensor(0.1, 0.7)
    a, da = z.clone(), pi.clone()
    fused(a, g * 1024, da, alpha, hyper, inv_scale=torch.tensor([1 / 1024], dtype=torch.float32))
    b, db = z.clone(), pi.clone()
    fused(b, g, db, alpha, hyper)
    assert torch.equal(a, b) and torch.equal(da, db)  # power-of-two scales unscale exactly


def test_found_inf_refuses_the_whole_call():
    z, g, pi, alpha = _random_step_inputs()
    hyper = reference.hyper_tensor(0.1, 0.7)
    res0 = torch.tensor([1.5, 2.5], dtype=torch.float64)
    a, da, res = z.clone(), pi.clone(), res0.clone()
    fused(a, g, da, alpha, hyper, res, found_inf=torch.ones(1))
    assert torch.equal(a, z) and torch.equal(da, pi) and torch.equal(res, res0)
    b, db = z.clone(), pi.clone()
    fused(b, g, db, alpha, hyper, found_inf=torch.zeros(1))
    c, dc = z.clone(), pi.clone()
    fused(c, g, dc, alpha, hyper)
    assert torch.equal(b, c) and torch.equal(db, dc)


def test_several_tensors_per_call_are_independent_and_skipped_items_stay():
    """params N = 3 in one call equal three calls of one tensor each (bit for bit); an item whose
    grads[i] is None keeps its weights and duals (its other rows are not read); residuals sum."""
    S = 2
    shapes = [(3, 4), (5,), ()]
    items = [_random_step_inputs(S, shape, seed=k) for k, shape in enumerate(shapes)]
    alpha = items[0][3]
    hyper = reference.hyper_tensor(0.2, 0.6, 0.01)
    params = [z.clone() for z, _, _, _ in items]
    duals = [[pi[r].clone() for _, _, pi, _ in items] for r in range(S)]
    grads = [[g[r] for _, g, _, _ in items] for r in range(S)]
    grads[0][1] = None  # item 1 has no gradient in any row
    grads[1][1] = torch.full(shapes[1], float("nan"), dtype=torch.float64)  # never read
    res = torch.zeros(2, dtype=torch.float64)
    reference.fused_step_(params, grads[0] + grads[1], duals[0] + duals[1], alpha, hyper, res)
    want_res = torch.zeros(2, dtype=torch.float64)
    for i, (z, g, pi, _) in enumerate(items):
        if i == 1:
            assert torch.equal(params[i], z)
            assert all(torch.equal(duals[r][i], pi[r]) for r in range(S))
            continue
        zi, di = z.clone(), pi.clone()
        fused(zi, g, di, alpha, hyper, want_res)
        assert torch.equal(params[i], zi)
        assert all(torch.equal(duals[r][i], di[r]) for r in range(S))
    torch.testing.assert_close(res, want_res, rtol=1e-15, atol=0)


def test_residuals_match_their_definitions():
    """residuals gets sum_s alpha_s ||w_s' - z||^2 (w_s' the paper's local copy) and ||z' - z||^2
    added to it."""
    S, P, rho, sigma = 3, 9, 2.0, 3.0
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(P, generator=gen, dtype=torch.float64)
    g = torch.randn(S, P, generator=gen, dtype=torch.float64)
    pi = torch.randn(S, P, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    w_local = z - (g + pi) / (rho + sigma)  # paper step 3
    res0 = torch.tensor([0.75, 1.25], dtype=torch.float64)
    res = res0.clone()
    z_new = z.clone()
    fused(z_new, g, pi.clone(), alpha, _hyper(rho, sigma), res)
    want_primal = (alpha.view(-1, 1) * (w_local - z).square()).sum()
    torch.testing.assert_close(res[0] - res0[0], want_primal)
    torch.testing.assert_close(res[1] - res0[1], (z_new - z).square().sum())
    res_none = torch.zeros(2, dtype=torch.float64)  # no item with a gradient: nothing added
    reference.fused_step_([z.clone()], [None] * S, list(pi.clone().unbind(0)), alpha, _hyper(rho, sigma), res_none)
    assert torch.equal(res_none, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_parameters_compute_in_float32(dtype):
    """bf16/fp16/fp32 weights: duals in fp32, the arithmetic in fp32, z' rounded once to the storage dtype."""
    z, g, pi, alpha = _random_step_inputs(dtype=dtype)
    assert pi.dtype == torch.float32
    hyper = reference.hyper_tensor(0.1, 0.7)
    a, da = z.clone(), pi.clone()
    fused(a, g, da, alpha, hyper)
    b, db = z.float(), pi.clone()
    fused(b, g.float(), db, alpha, hyper)
    assert a.dtype == dtype and torch.equal(a, b.to(dtype)) and torch.equal(da, db)


# ---------------------------------------------------------------- nonfinite_check_ and copy_check_


def test_nonfinite_check_raises_the_flag_and_never_clears_it():
    ok = [torch.ones(3), None, torch.zeros(0), torch.zeros(2, 2)]
    flag = torch.zeros(1)
    reference.nonfinite_check_(ok, flag)
    assert flag.item() == 0
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(5)
        t[3] = bad
        flag = torch.zeros(1)
        reference.nonfinite_check_(ok + [t], flag)
        assert flag.item() == 1
    flag = torch.ones(1)
    reference.nonfinite_check_(ok, flag)
    assert flag.item() == 1  # never cleared


def test_copy_check_copies_and_checks_what_it_copied():
    dst = [torch.zeros(3), torch.zeros(2), torch.zeros(4)]
    src = [torch.tensor([1.0, 2.0, 3.0]), None, torch.tensor([1.0, float("inf"), 0.0, 0.0])]
    flag = torch.zeros(1)
    reference.copy_check_(dst, src, flag)
    assert torch.equal(dst[0], src[0]) and torch.equal(dst[1], torch.zeros(2)) and torch.equal(dst[2], src[2])
    assert flag.item() == 1
    dst2, flag2 = [torch.full((2,), float("nan"))], torch.zeros(1)
    reference.copy_check_(dst2, [None], flag2)  # a skipped entry is neither copied nor checked
    assert flag2.item() == 0 and torch.isnan(dst2[0]).all()
    reference.copy_check_([torch.zeros(1)], [torch.tensor([float("nan")])])  # no flag: no check
