"""The fused form against a direct transcription of the paper form, and the QHM identity."""

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


@pytest.mark.parametrize("S", [1, 2, 3, 8])
@pytest.mark.parametrize("rho,sigma", [(0.0, 8.0), (3.0, 2.0), (2.0, 2.0), (18.0, 2.0)])
def test_fused_form_matches_paper_form_over_many_steps(S, rho, sigma):
    P, steps = 13, 60
    grad = _quadratic_problem(S, P, seed=S)
    gen = torch.Generator().manual_seed(100 + S)
    w0 = torch.randn(P, dtype=torch.float64, generator=gen)

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
        reference.fused_step_(z, g, duals, alpha, rho, sigma)
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
        reference.fused_step_(z, g, duals, alpha, rho, sigma)
    torch.testing.assert_close(duals, paper.pi, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rho,sigma", [(9.0, 10.0), (30.0, 5.0), (1.0, 4.0)])
def test_qhm_identity(rho, sigma):
    """BADM with S sub-batches and constant weights is QHM on the weighted mean gradient
    (docs/algorithm.md): lr = 1/sigma, beta = rho/(rho+sigma), nu = 1 - sigma/rho."""
    S, P, steps = 4, 11, 80
    grad = _quadratic_problem(S, P, seed=3)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    z = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta = z.clone()
    duals = torch.zeros(S, P, dtype=torch.float64)
    lr, beta, nu = 1.0 / sigma, rho / (rho + sigma), 1.0 - sigma / rho
    buf = torch.zeros(P, dtype=torch.float64)
    for t in range(steps):
        reference.fused_step_(z, grad(z), duals, alpha, rho, sigma)
        g = (alpha.view(-1, 1) * grad(theta)).sum(0)  # a hand-written QHM step
        buf = beta * buf + (1 - beta) * g
        theta = theta - lr * ((1 - nu) * g + nu * buf)
        torch.testing.assert_close(z, theta, rtol=1e-9, atol=1e-11, msg=f"step {t}")


def test_rho_equal_sigma_is_plain_sgd():
    S, P, sigma = 2, 6, 4.0
    grad = _quadratic_problem(S, P, seed=5)
    alpha = torch.tensor([0.5, 0.5], dtype=torch.float64)
    z = torch.ones(P, dtype=torch.float64)
    theta = z.clone()
    duals = torch.zeros(S, P, dtype=torch.float64)
    for _ in range(30):
        reference.fused_step_(z, grad(z), duals, alpha, sigma, sigma)
        theta = theta - (alpha.view(-1, 1) * grad(theta)).sum(0) / sigma
    torch.testing.assert_close(z, theta, rtol=1e-10, atol=1e-12)


def test_residuals_match_their_definitions():
    S, P, rho, sigma = 3, 9, 2.0, 3.0
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(P, generator=gen, dtype=torch.float64)
    g = torch.randn(S, P, generator=gen, dtype=torch.float64)
    pi = torch.randn(S, P, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    w_local = z - (g + pi) / (rho + sigma)  # paper step 3
    res = torch.zeros(2, dtype=torch.float64)
    z_new = z.clone()
    reference.fused_step_(z_new, g, pi.clone(), alpha, rho, sigma, res)
    want_primal = (alpha.view(-1, 1) * (w_local - z).square()).sum()
    torch.testing.assert_close(res[0], want_primal)
    torch.testing.assert_close(res[1], (z_new - z).square().sum())
