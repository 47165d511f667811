"""BADM against the torch.optim contract: schedulers, SGD at steady state, lr = 0, weight decay,
maximize, scalar types, complex and named parameters, state_dict hooks and the sub-batch idioms.

Every expectation is independent of the optimizer under test: a closed-form schedule, a
hand-written fused step (``_Manual``), torch.optim.SGD, or a twin BADM fed hand-made gradients
(``opt.set_grads``). Everything runs in float64 on the CPU with tiny tensors.

Tolerances: a twin doing the same floating-point operations on the same values is compared with
``torch.equal``. The hand-written step (``_Manual``) factors ``lr`` out of the sum and so rounds
differently from the kernel: over <= 12 float64 steps with coefficients |(2mu-1)/(1-mu)| <= 19 the
difference stays below ~1e-13 relative, so ``rtol=1e-10`` cannot hide a wrong learning rate or
momentum at any single step (that moves the weights by ~1e-3 relative).
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as sched
from torch.optim.swa_utils import SWALR

import badm_fast

F64 = torch.float64
S = 2  # sub-batches of the scheduler harness
LR0, LR1, MU = 0.1, 0.05, 0.9  # the two param groups' base learning rates, base momentum
RTOL, ATOL = 1e-10, 1e-12  # hand-written step vs the kernel (see the module docstring)


# ---------------------------------------------------------------- shared helpers


def _tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=F64) for shape in ((3,), (2, 2), (4,))]


def _leaves(values):
    return [v.clone().requires_grad_() for v in values]


def _groups(ps):
    """Two param groups; the second with its own learning rate."""
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": LR1}]


def _grads(zs, t, rows=S):
    """Deterministic gradients of step ``t``, row ``s``: a pull towards 0.3 plus a varying term."""
    out = []
    for s in range(rows):
        out.append([
            0.5 * (z.detach() - 0.3)
            + 0.2 * torch.sin(torch.arange(z.numel(), dtype=F64).reshape(z.shape) + 1.7 * t + 0.9 * s + k)
            for k, z in enumerate(zs)
        ])
    return out


def _feed(opt, ps, t, rows=S):
    opt.zero_grad()
    for s, gs in enumerate(_grads(ps, t, rows)):
        opt.set_grads(s, ps, gs)


class _Manual:
    """The fused step written out by hand (the brief's lr form), float64, no optimizer involved."""

    def __init__(self, values, rows):
        self.z = [v.clone() for v in values]
        self.pi = [torch.zeros(rows, *v.shape, dtype=F64) for v in values]

    def step(self, grads, lrs, mus, wd=0.0, maximize=False, alpha=None):
        """``grads[s][i]``; ``lrs[i]``/``mus[i]`` per tensor."""
        rows = len(grads)
        alpha = alpha or [1.0 / rows] * rows
        for i, (z, pi) in enumerate(zip(self.z, self.pi)):
            lr, mu = lrs[i], mus[i]
            g = torch.stack([grads[s][i] for s in range(rows)])
            g = -g if maximize else g
            g = g + wd * z
            delta = sum(alpha[s] * (-2.0 * g[s] + (2.0 * mu - 1.0) / (1.0 - mu) * pi[s]) for s in range(rows))
            pi.copy_(mu * pi - (1.0 - mu) * g)
            z.add_(lr * delta)


def _snap(opt):
    ps = [p for g in opt.param_groups for p in g["params"]]
    return [p.detach().clone() for p in ps], [opt.state[p]["duals"].clone() for p in ps if p in opt.state]


def _assert_equal(a, b):
    for xs, ys in zip(a, b):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


def _run_schedule(make, steps, lr_fn, mu_fn=None, tick=None, expect_zero=False):
    """Step a scheduled BADM ``steps`` times and check, at every step:

    * the lr (per group) and momentum in the param groups follow the closed form ``lr_fn(t, base)``
      / ``mu_fn(t)`` (momentum stays MU without ``mu_fn``);
    * a twin BADM whose lr/momentum are set by hand to those values gives the same bits;
    * the hand-written step driven by the closed form (not by the optimizer) gives the weights;
    * a group at lr = 0 keeps its weights while its duals move, a group at lr > 0 moves.
    """
    init = _tensors()
    ps, tw = _leaves(init), _leaves(init)
    opt = badm_fast.BADM(_groups(ps), lr=LR0, momentum=MU, sub_batches=S, backend="torch")
    twin = badm_fast.BADM(_groups(tw), lr=LR0, momentum=MU, sub_batches=S, backend="torch")
    scheduler = make(opt)
    man = _Manual(init, S)
    bases = [LR0, LR1]
    group_of = [0, 0, 1]
    zero_seen = False
    for t in range(steps):
        lrs, mus = [], []
        for gi, group in enumerate(opt.param_groups):
            want_lr = lr_fn(t, bases[gi])
            want_mu = MU if mu_fn is None else mu_fn(t)
            assert float(group["lr"]) == pytest.approx(want_lr, rel=1e-12, abs=1e-15), (t, gi)
            if mu_fn is None:
                assert group["momentum"] == MU, (t, gi)
            else:
                assert float(group["momentum"]) == pytest.approx(want_mu, rel=1e-12, abs=1e-15), (t, gi)
            twin.param_groups[gi]["lr"] = float(group["lr"])
            twin.param_groups[gi]["momentum"] = float(group["momentum"])
            lrs.append(want_lr)
            mus.append(want_mu)
        before = [p.detach().clone() for p in ps]
        duals_before = [opt.state[p]["duals"].clone() for p in ps]
        man.step(_grads(man.z, t), [lrs[g] for g in group_of], [mus[g] for g in group_of])
        _feed(opt, ps, t)
        opt.step()
        _feed(twin, tw, t)
        twin.step()
        (tick or (lambda sch, _t: sch.step()))(scheduler, t)
        _assert_equal(_snap(opt), _snap(twin))
        for p, z in zip(ps, man.z):
            torch.testing.assert_close(p.detach(), z, rtol=RTOL, atol=ATOL)
        for i, p in enumerate(ps):
            moved = not torch.equal(p.detach(), before[i])
            if lrs[group_of[i]] == 0:
                zero_seen = True
                assert not moved, f"step {t}: lr is 0 but parameter {i} moved"
            else:
                assert moved, f"step {t}: lr > 0 but parameter {i} did not move"
            assert not torch.equal(opt.state[p]["duals"], duals_before[i])
    assert zero_seen == expect_zero


# ---------------------------------------------------------------- 1. schedulers


def test_step_lr():
    _run_schedule(lambda o: sched.StepLR(o, step_size=3, gamma=0.5), 12, lambda t, b: b * 0.5 ** (t // 3))


def test_step_lr_gamma_zero_stops_the_weights():
    _run_schedule(
        lambda o: sched.StepLR(o, step_size=3, gamma=0.0), 8, lambda t, b: b if t < 3 else 0.0, expect_zero=True
    )


def test_multi_step_lr():
    _run_schedule(
        lambda o: sched.MultiStepLR(o, milestones=[2, 5], gamma=0.1),
        10,
        lambda t, b: b * 0.1 ** sum(t >= m for m in (2, 5)),
    )


def test_exponential_lr():
    _run_schedule(lambda o: sched.ExponentialLR(o, gamma=0.7), 10, lambda t, b: b * 0.7**t)


def test_cosine_annealing_lr():
    # eta_min = 0: lr reaches exactly 0 at T_max (the weights stop) and rises again after it
    _run_schedule(
        lambda o: sched.CosineAnnealingLR(o, T_max=5, eta_min=0.0),
        12,
        lambda t, b: b * (1 + math.cos(math.pi * t / 5)) / 2,
        expect_zero=True,
    )


def test_cosine_annealing_warm_restarts():
    eta_min = 0.001

    def lr(t, b):
        t_i, t_cur = 3, t
        while t_cur >= t_i:
            t_cur -= t_i
            t_i *= 2
        return eta_min + (b - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2

    _run_schedule(lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=eta_min), 12, lr)


def test_linear_lr_in_sequential_lr():
    # warm up 0.25 -> 1 over 2 steps, then (milestone 3) decay 1 -> 0 over 4 steps: the weights stop
    def make(o):
        warm = sched.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=2)
        decay = sched.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=4)
        return sched.SequentialLR(o, [warm, decay], milestones=[3])

    def lr(t, b):
        if t < 3:
            return b * (0.25 + 0.75 * min(t, 2) / 2)
        return b * (1.0 - min(t - 3, 4) / 4)

    _run_schedule(make, 10, lr, expect_zero=True)


def test_constant_lr_in_chained_scheduler():
    def make(o):
        parts = [sched.ConstantLR(o, factor=0.5, total_iters=2), sched.ExponentialLR(o, gamma=0.8)]
        return sched.ChainedScheduler(parts)

    _run_schedule(make, 8, lambda t, b: b * 0.8**t * (0.5 if t < 2 else 1.0))


def test_lambda_lr():
    # starts at 0 (a warm-up step: weights stay, duals move), peaks, back to 0 for good
    def f(t):
        return min(t / 2, max(0.0, (6 - t) / 4))

    _run_schedule(lambda o: sched.LambdaLR(o, f), 9, lambda t, b: b * f(t), expect_zero=True)


def test_polynomial_lr():
    _run_schedule(
        lambda o: sched.PolynomialLR(o, total_iters=4, power=2.0),
        7,
        lambda t, b: b * (1 - min(t, 4) / 4) ** 2,
        expect_zero=True,
    )


def test_one_cycle_lr_drives_lr_and_momentum():
    total, max_lr, div, final_div = 10, 0.1, 25.0, 1e4
    m_lo, m_hi = 0.85, 0.95
    end1, end2 = 0.3 * total - 1, total - 1

    def cos(start, end, pct):
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    def lr(t, _b):
        if t <= end1:
            return cos(max_lr / div, max_lr, t / end1)
        return cos(max_lr, max_lr / div / final_div, (t - end1) / (end2 - end1))

    def mu(t):
        if t <= end1:
            return cos(m_hi, m_lo, t / end1)
        return cos(m_lo, m_hi, (t - end1) / (end2 - end1))

    _run_schedule(lambda o: sched.OneCycleLR(o, max_lr=max_lr, total_steps=total), total, lr, mu)


def test_cyclic_lr_drives_lr_and_momentum():
    # triangular, base_lr 0: the first step (and every 4th) is taken at lr 0
    factor = [0.0, 0.5, 1.0, 0.5]

    def make(o):
        return sched.CyclicLR(
            o, base_lr=0.0, max_lr=0.1, step_size_up=2, cycle_momentum=True, base_momentum=0.8, max_momentum=0.9
        )

    _run_schedule(make, 10, lambda t, _b: 0.1 * factor[t % 4], lambda t: 0.9 - 0.1 * factor[t % 4], expect_zero=True)


def test_reduce_lr_on_plateau():
    # a constant metric: patience 1 -> halve after the 3rd, 5th, 7th, ... scheduler step
    _run_schedule(
        lambda o: sched.ReduceLROnPlateau(o, factor=0.5, patience=1),
        10,
        lambda t, b: b * 0.5 ** max(0, (t - 1) // 2),
        tick=lambda sch, _t: sch.step(1.0),
    )


def test_swalr():
    # linear anneal to swa_lr = 0 over 4 epochs: then the weights stop
    _run_schedule(
        lambda o: SWALR(o, swa_lr=0.0, anneal_epochs=4, anneal_strategy="linear"),
        7,
        lambda t, b: b * (1 - min(t, 4) / 4),
        expect_zero=True,
    )


def test_a_scheduler_at_lr_zero_stops_the_weights_while_an_unscheduled_twin_moves():
    init = _tensors()
    ps, tw = _leaves(init), _leaves(init)
    opt = badm_fast.BADM(ps, lr=0.1, momentum=MU, sub_batches=S, backend="torch")
    free = badm_fast.BADM(tw, lr=0.1, momentum=MU, sub_batches=S, backend="torch")
    scheduler = sched.LambdaLR(opt, lambda t: 1.0 if t < 2 else 0.0)
    stopped = None
    for t in range(6):
        _feed(opt, ps, t)
        opt.step()
        _feed(free, tw, t)
        free.step()
        scheduler.step()
        if t == 1:
            assert all(torch.equal(p, q) for p, q in zip(ps, tw))
            stopped = [p.detach().clone() for p in ps]
    assert all(torch.equal(p, q) for p, q in zip(ps, stopped))
    assert not any(torch.equal(p, q) for p, q in zip(tw, stopped))


# ---------------------------------------------------------------- 2. SGD at steady state, rho/sigma


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.8, 0.9])
def test_constant_gradient_steady_state_equals_sgd(mu):
    """Both move lr*g/(1-mu) per step once the transients (BADM: (2mu-1) mu^t, SGD: mu^(t+1),
    relative) have died out: after 200 steps they are below 2*mu^200 (7e-10 for 0.9, < 1e-14 for
    0.8), plus float64 rounding of the step (1e-12 relative)."""
    lr = 0.01
    g = torch.tensor([0.5, -1.25, 2.0, 3.0], dtype=F64)
    z0 = torch.tensor([0.1, 0.2, -0.3, 0.4], dtype=F64)
    a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    badm = badm_fast.BADM([a], lr=lr, momentum=mu, backend="torch")
    sgd = torch.optim.SGD([b], lr=lr, momentum=mu)
    moves = []
    for opt, p in ((badm, a), (sgd, b)):
        for _ in range(201):
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
        moves.append(p.detach() - before)
    tol = 2 * mu**200 + 1e-12
    torch.testing.assert_close(moves[0], moves[1], rtol=tol, atol=0)
    torch.testing.assert_close(moves[0], -lr * g / (1 - mu), rtol=tol, atol=0)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def _batch(t, n=16):
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(n, 5, generator=gen, dtype=F64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _train(model, opt, steps, start=0, loss_fn=F.cross_entropy, n=16):
    for t in range(start, start + steps):
        x, y = _batch(t, n)
        badm_fast.split_step(model, opt, loss_fn, x, y)


def _state(model, opt):
    return [p.detach().clone() for p in model.parameters()], [
        opt.state[p]["duals"].clone() for p in model.parameters()
    ]


@pytest.mark.parametrize("rho,sigma", [(9.0, 10.0), (3.0, 5.0), (0.3, 0.7), (2.5, 0.1)])
def test_rho_sigma_and_lr_momentum_construct_the_same_optimizer(rho, sigma):
    lr, mu = 1.0 / (rho + sigma), rho / (rho + sigma)  # the bijection, by hand
    runs = []
    for kwargs in (dict(rho=rho, sigma=sigma), dict(lr=lr, momentum=mu)):
        model = _model()
        opt = badm_fast.BADM(model.parameters(), sub_batches=2, backend="torch", **kwargs)
        assert opt.param_groups[0]["lr"] == lr and opt.param_groups[0]["momentum"] == mu
        _train(model, opt, 4)
        runs.append(_state(model, opt))
        sd = opt.state_dict()["param_groups"][0]
        assert sd["rho"] == pytest.approx(rho, rel=1e-12) and sd["sigma"] == pytest.approx(sigma, rel=1e-12)
    _assert_equal(runs[0], runs[1])


def test_rho_sigma_defaults_and_param_groups_in_the_paper_form():
    def run(make):
        model = _model()
        opt = make(model)
        _train(model, opt, 3)
        return _state(model, opt)

    plain = run(lambda m: badm_fast.BADM(m.parameters(), lr=0.01, momentum=0.9, sub_batches=2))
    _assert_equal(plain, run(lambda m: badm_fast.BADM(m.parameters(), sub_batches=2)))
    paper = run(lambda m: badm_fast.BADM(m.parameters(), rho=9.0, sigma=10.0, sub_batches=2))
    _assert_equal(paper, run(lambda m: badm_fast.BADM(m.parameters(), rho=9.0, sub_batches=2)))
    _assert_equal(paper, run(lambda m: badm_fast.BADM(m.parameters(), sigma=10.0, sub_batches=2)))
    by_lr = run(lambda m: badm_fast.BADM(
        [{"params": m[0].parameters(), "lr": 1.0 / 8.0, "momentum": 3.0 / 8.0}, {"params": m[2].parameters()}],
        lr=0.05, momentum=0.5, sub_batches=2,
    ))
    by_rho = run(lambda m: badm_fast.BADM(
        [{"params": m[0].parameters(), "rho": 3.0, "sigma": 5.0}, {"params": m[2].parameters()}],
        lr=0.05, momentum=0.5, sub_batches=2,
    ))
    _assert_equal(by_lr, by_rho)


# ---------------------------------------------------------------- 3. lr = 0 (warm-up)


def test_lr_zero_first_step_keeps_the_weights_and_moves_the_duals():
    mu, rows = 0.9, 3
    init = _tensors()
    ps = _leaves(init)
    opt = badm_fast.BADM(ps, lr=0.0, momentum=mu, sub_batches=rows, backend="torch")
    pi = [torch.zeros(rows, *v.shape, dtype=F64) for v in init]
    for t in range(2):  # the second lr = 0 step starts from non-zero duals
        grads = _grads(ps, t, rows)
        _feed(opt, ps, t, rows)
        opt.step()
        for i, (p, v) in enumerate(zip(ps, init)):
            assert torch.equal(p.detach(), v)
            g = torch.stack([grads[s][i] for s in range(rows)])
            pi[i] = mu * pi[i] - (1.0 - mu) * g
            assert torch.equal(opt.state[p]["duals"], pi[i])
            assert opt.state[p]["duals"].abs().min() > 0
    # then lr > 0: the duals of the warm-up steps take part (the hand-written step from them)
    man = _Manual(init, rows)
    man.pi = [d.clone() for d in pi]
    opt.param_groups[0]["lr"] = 0.05
    for t in range(2, 5):
        man.step(_grads(man.z, t, rows), [0.05] * 3, [mu] * 3)
        _feed(opt, ps, t, rows)
        opt.step()
    for p, z, d in zip(ps, man.z, man.pi):
        torch.testing.assert_close(p.detach(), z, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(opt.state[p]["duals"], d, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- 4. weight decay, maximize


def test_weight_decay_equals_hand_added_decay_in_every_sub_batch():
    """BADM(weight_decay=wd) on g equals BADM(wd=0) on g + wd*z in every row. The kernel computes
    the same wd*z and sum in float64; 1e-12 relative only allows for a reordered rounding."""
    wd, rows = 0.3, 4
    init = _tensors()
    a, b = _leaves(init), _leaves(init)
    with_wd = badm_fast.BADM(a, lr=0.05, momentum=0.8, weight_decay=wd, sub_batches=rows, backend="torch")
    by_hand = badm_fast.BADM(b, lr=0.05, momentum=0.8, sub_batches=rows, backend="torch")
    man = _Manual(init, rows)
    for t in range(6):
        _feed(with_wd, a, t, rows)
        with_wd.step()
        by_hand.zero_grad()
        for s, gs in enumerate(_grads(b, t, rows)):
            by_hand.set_grads(s, b, [g + wd * z.detach() for g, z in zip(gs, b)])
        by_hand.step()
        man.step(_grads(man.z, t, rows), [0.05] * 3, [0.8] * 3, wd=wd)
        for p, q, z in zip(a, b, man.z):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(with_wd.state[p]["duals"], by_hand.state[q]["duals"], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(p.detach(), z, rtol=RTOL, atol=ATOL)
    assert not torch.equal(a[0].detach(), init[0])


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_maximize_equals_minimizing_the_negated_loss(wd):
    runs = []
    for maximize, loss_fn in ((True, lambda o, y: -F.cross_entropy(o, y)), (False, F.cross_entropy)):
        model = _model()
        opt = badm_fast.BADM(model.parameters(), lr=0.05, weight_decay=wd, maximize=maximize, sub_batches=4)
        _train(model, opt, 4, loss_fn=loss_fn)
        runs.append(_state(model, opt))
    _assert_equal(runs[0], runs[1])  # negation is exact, so every rounding is mirrored


# ---------------------------------------------------------------- 5. scalar types


_BASE = dict(lr=0.125, momentum=0.75, weight_decay=0.0625)
_SCALARS = [
    dict(lr=torch.tensor(0.125)),
    dict(lr=torch.tensor(0.125, dtype=F64)),
    dict(lr=np.float32(0.125)),
    dict(lr=np.float64(0.125)),
    dict(lr=np.float32(0.1)),  # not 0.1: the float32 value, as float(np.float32(0.1))
    dict(lr=np.int64(1)),
    dict(lr=1),
    dict(momentum=torch.tensor(0.75)),
    dict(momentum=np.float32(0.75)),
    dict(momentum=np.float64(0.75)),
    dict(momentum=np.int64(0)),
    dict(momentum=0),
    dict(weight_decay=torch.tensor(0.0625)),
    dict(weight_decay=np.float32(0.0625)),
    dict(weight_decay=np.float64(0.0625)),
    dict(weight_decay=np.int64(1)),
    dict(weight_decay=1),
    dict(rho=np.int64(3), sigma=np.int64(5)),
    dict(rho=3, sigma=5),
    dict(rho=torch.tensor(3.0), sigma=np.float32(5.0)),
    dict(rho=np.float64(3.0), sigma=torch.tensor(5)),
]


def _py(v):
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


_WHERE = [(c, "constructor") for c in _SCALARS] + [(_SCALARS[i], "group") for i in (0, 2, 5, 8, 12, 16, 17, 19)]


@pytest.mark.parametrize(
    "case,where", _WHERE, ids=[",".join(f"{k}={type(v).__name__}" for k, v in c.items()) + "-" + w for c, w in _WHERE]
)
def test_tensor_numpy_and_python_scalars_give_the_python_float_trajectory(case, where):
    def run(hyper):
        model = _model()
        if where == "constructor":
            opt = badm_fast.BADM(model.parameters(), sub_batches=2, backend="torch", **hyper)
        else:
            opt = badm_fast.BADM([{"params": model.parameters(), **hyper}], sub_batches=2, backend="torch")
        _train(model, opt, 3)
        return _state(model, opt)

    def merged(c):
        out = {k: v for k, v in _BASE.items() if not ("rho" in c and k in ("lr", "momentum"))}
        out.update(c)
        return out

    got = run(merged(case))
    want = run(merged({k: _py(v) for k, v in case.items()}))
    _assert_equal(got, want)


# ---------------------------------------------------------------- 6. complex parameters


def test_complex_parameter_equals_its_real_view():
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(3, generator=gen, dtype=torch.complex128)
    c128 = torch.complex128
    data = [(torch.randn(6, 3, generator=gen, dtype=c128), torch.randn(6, generator=gen, dtype=c128)) for _ in range(8)]
    pc = p0.clone().requires_grad_()
    pr = torch.view_as_real(p0).clone().requires_grad_()
    kw = dict(lr=0.05, momentum=0.8, weight_decay=0.01, sub_batches=2, backend="torch")
    oc, orr = badm_fast.BADM([pc], **kw), badm_fast.BADM([pr], **kw)

    def loss(z, s, t):
        x, y = data[(2 * t + s) % len(data)]
        return ((x @ z - y).abs() ** 2).mean()

    for t in range(5):
        for opt, p, as_complex in ((oc, pc, lambda z: z), (orr, pr, torch.view_as_complex)):
            opt.zero_grad()
            for s in range(2):
                with opt.sub_batch(s):
                    loss(as_complex(p), s, t).backward()
            opt.step()
    assert not torch.equal(pc.detach(), p0)
    assert oc.state[pc]["duals"].shape == (2, 3, 2)
    assert torch.equal(torch.view_as_real(pc.detach()), pr.detach())
    assert torch.equal(oc.state[pc]["duals"], orr.state[pr]["duals"])


# ---------------------------------------------------------------- 7. named parameters


def test_named_parameters_state_dict_resume_and_deepcopy():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    opt = badm_fast.BADM(model.named_parameters(), lr=0.05, momentum=0.8, sub_batches=2, backend="torch")
    assert opt.param_groups[0]["param_names"] == names
    _train(model, opt, 3)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == names
    assert sorted(sd["state"]) == list(range(len(names)))

    # a fresh optimizer over a copy of the model resumes bit-exactly
    model2 = copy.deepcopy(model)
    opt2 = badm_fast.BADM(model2.named_parameters(), lr=0.5, momentum=0.1, sub_batches=2, backend="torch")
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.param_groups[0]["lr"] == 0.05 and opt2.param_groups[0]["momentum"] == 0.8
    assert opt2.param_groups[0]["param_names"] == names
    # a deepcopy of model and optimizer together keeps the names and the link
    model3, opt3 = copy.deepcopy((model, opt))
    assert opt3.param_groups[0]["param_names"] == names
    assert opt3.state_dict()["param_groups"][0]["param_names"] == names
    assert copy.deepcopy(opt).param_groups[0]["param_names"] == names
    for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
        _train(m, o, 3, start=3)
    ref = _state(model, opt)
    _assert_equal(ref, _state(model2, opt2))
    _assert_equal(ref, _state(model3, opt3))


def test_groups_of_name_parameter_pairs():
    model = _model()
    opt = badm_fast.BADM(
        [{"params": list(model[0].named_parameters()), "lr": 0.02}, {"params": list(model[2].named_parameters())}],
        lr=0.05, sub_batches=2, backend="torch",
    )
    twin_model = _model()
    twin = badm_fast.BADM(
        [{"params": list(twin_model[0].parameters()), "lr": 0.02}, {"params": list(twin_model[2].parameters())}],
        lr=0.05, sub_batches=2, backend="torch",
    )
    assert [g["param_names"] for g in opt.param_groups] == [["weight", "bias"], ["weight", "bias"]]
    assert all(isinstance(p, torch.Tensor) for g in opt.param_groups for p in g["params"])
    _train(model, opt, 3)
    _train(twin_model, twin, 3)
    _assert_equal(_state(model, opt), _state(twin_model, twin))
    sd = opt.state_dict()
    assert [g["param_names"] for g in sd["param_groups"]] == [["weight", "bias"], ["weight", "bias"]]
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    fresh_model = copy.deepcopy(model)
    fresh = badm_fast.BADM(
        [{"params": list(fresh_model[0].named_parameters())}, {"params": list(fresh_model[2].named_parameters())}],
        sub_batches=2, backend="torch",
    )
    fresh.load_state_dict(sd)
    assert [g["lr"] for g in fresh.param_groups] == [0.02, 0.05]
    _train(model, opt, 2, start=3)
    _train(fresh_model, fresh, 2, start=3)
    _assert_equal(_state(model, opt), _state(fresh_model, fresh))


# ---------------------------------------------------------------- 8. hooks


def _hook_log(make_opt, step):
    """Register the same state_dict hooks on an optimizer; return its event log."""
    model = _model()
    opt = make_opt(model)
    step(model, opt)
    log = []
    opt.register_state_dict_pre_hook(lambda o: log.append("sd_pre_a"))
    opt.register_state_dict_pre_hook(lambda o: log.append("sd_pre_first"), prepend=True)

    def sd_post(o, sd):
        log.append("sd_post")
        return {**sd, "extra": 1}

    opt.register_state_dict_post_hook(sd_post)
    opt.register_state_dict_post_hook(lambda o, sd: log.append("sd_post_last:" + str(sd.get("extra"))))
    sd = opt.state_dict()
    assert sd["extra"] == 1

    def load_pre(o, sd):
        log.append("load_pre")
        new = copy.deepcopy(sd)
        new["param_groups"][0]["lr"] = 0.125  # the returned dict is what gets loaded
        return new

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: log.append(f"load_post:{o.param_groups[0]['lr']}"))
    original = copy.deepcopy(sd)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.125
    assert sd["param_groups"][0]["lr"] == original["param_groups"][0]["lr"]  # the caller's dict is untouched
    return log


def test_state_dict_hooks_run_in_torchs_order():
    def sgd_step(model, opt):
        x, y = _batch(0)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    want = _hook_log(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), sgd_step)
    got = _hook_log(
        lambda m: badm_fast.BADM(m.parameters(), lr=0.05, sub_batches=2, backend="torch"), lambda m, o: _train(m, o, 1)
    )
    assert want == ["sd_pre_first", "sd_pre_a", "sd_post", "sd_post_last:1", "load_pre", "load_post:0.125"]
    assert got == want


def test_state_dict_pre_hook_runs_before_and_post_hook_sees_the_dict():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), lr=0.05, sub_batches=2, backend="torch")
    _train(model, opt, 1)
    seen = {}

    def pre(o):
        o.param_groups[0]["lr"] = 0.25  # made before the dict is built: shows in it

    def post(o, sd):
        seen["lr"] = sd["param_groups"][0]["lr"]
        seen["duals"] = sd["state"][0]["duals"]

    handle = opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == 0.25 and seen["lr"] == 0.25
    p0 = next(model.parameters())
    assert torch.equal(seen["duals"], opt.state[p0]["duals"])
    handle.remove()
    opt.param_groups[0]["lr"] = 0.5
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.5
    load_seen = []
    opt.register_load_state_dict_post_hook(lambda o: load_seen.append(o.state[p0]["duals"].clone()))
    target = copy.deepcopy(sd)
    target["state"][0]["duals"] = torch.full_like(sd["state"][0]["duals"], 0.5)
    opt.load_state_dict(target)
    assert torch.equal(load_seen[0], torch.full_like(p0, 0.5).expand(2, *p0.shape))  # after the load


def test_step_hooks_run_around_the_step_and_a_pre_hook_can_change_its_arguments():
    rows, mu = 4, 0.8
    init = _tensors()
    ps, tw = _leaves(init), _leaves(init)
    opt = badm_fast.BADM(ps, lr=0.05, momentum=mu, sub_batches=rows, backend="torch")
    twin = badm_fast.BADM(tw, lr=0.05, momentum=mu, sub_batches=rows, backend="torch")
    log = []

    def pre(o, args, kwargs):
        log.append(("pre", torch.equal(ps[0].detach(), init[0])))
        return args, {**kwargs, "weights": [1.0, 0.0, 3.0, 0.0]}

    def post(o, args, kwargs):
        log.append(("post", torch.equal(ps[0].detach(), init[0]), kwargs.get("weights")))

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    grads = _grads(ps, 0, rows)
    _feed(opt, ps, 0, rows)
    opt.step()
    _feed(twin, tw, 0, rows)
    twin.step(weights=[1.0, 0.0, 3.0, 0.0])
    assert log == [("pre", True), ("post", False, [1.0, 0.0, 3.0, 0.0])]
    _assert_equal(_snap(opt), _snap(twin))
    # opt.state[p]["duals"] is the (R, *p.shape) dual tensor, after one step -(1 - mu) * g_s
    for i, p in enumerate(ps):
        d = opt.state[p]["duals"]
        assert d.shape == (rows, *p.shape) and d.dtype == F64
        assert torch.equal(d, -((1.0 - mu) * torch.stack([grads[s][i] for s in range(rows)])))


# ---------------------------------------------------------------- 9. sub-batch idioms (S = 4)


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _sub_grads(model, x, y, rows=4):
    """Each sub-batch's gradient at the model's current weights, without touching .grad."""
    params = list(model.parameters())
    return [
        list(torch.autograd.grad(_loss(model, xs, ys), params))
        for xs, ys in zip(x.tensor_split(rows), y.tensor_split(rows))
    ]


def _clip(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_ by hand: scale by min(1, max_norm / (norm + 1e-6))."""
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * coef for g in grads], float(norm)


def _manual_loop(model, opt, x, y, zero="opt", clip=None, rows=4):
    if zero == "opt":
        opt.zero_grad()
    elif zero == "model":
        model.zero_grad()
    elif zero == "model_in_place":
        model.zero_grad(set_to_none=False)
    for s, (xs, ys) in enumerate(zip(x.tensor_split(rows), y.tensor_split(rows))):
        with opt.sub_batch(s):
            _loss(model, xs, ys).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step(weights=[len(ys) for ys in y.tensor_split(rows)])


def _pair(**kw):
    kw = dict(lr=0.05, momentum=0.8, sub_batches=4, backend="torch", **kw)
    a, b = _model(), _model()
    return a, badm_fast.BADM(a.parameters(), **kw), b, badm_fast.BADM(b.parameters(), **kw)


@pytest.mark.parametrize("zero", ["model", "model_in_place"])
def test_model_zero_grad_between_iterations_equals_opt_zero_grad(zero):
    a, oa, b, ob = _pair()
    for t in range(4):
        x, y = _batch(t, n=18)
        _manual_loop(a, oa, x, y, zero=zero)
        _manual_loop(b, ob, x, y, zero="opt")
    _assert_equal(_state(a, oa), _state(b, ob))
    assert not torch.equal(a[0].weight, _model()[0].weight)


def test_forgetting_zero_grad_accumulates_like_torch_optim():
    a, oa, b, ob = _pair()
    x1, y1 = _batch(0)
    x2, y2 = _batch(1)
    _manual_loop(a, oa, x1, y1, zero="opt")
    g1 = _sub_grads(b, x1, y1)
    ob.zero_grad()
    for s, gs in enumerate(g1):
        ob.set_grads(s, list(b.parameters()), gs)
    ob.step(weights=[4, 4, 4, 4])
    _assert_equal(_state(a, oa), _state(b, ob))
    _manual_loop(a, oa, x2, y2, zero=None)  # forgot zero_grad: row s holds g1_s + g2_s
    g2 = _sub_grads(b, x2, y2)
    ob.zero_grad()
    for s in range(4):
        ob.set_grads(s, list(b.parameters()), [u + v for u, v in zip(g1[s], g2[s])])
    ob.step(weights=[4, 4, 4, 4])
    _assert_equal(_state(a, oa), _state(b, ob))
    # and it is not the trajectory with zero_grad (the accumulation did happen)
    c, oc, _, _ = _pair()
    _manual_loop(c, oc, x1, y1)
    _manual_loop(c, oc, x2, y2)
    assert not torch.equal(c[0].weight, a[0].weight)


def test_clip_grad_norm_inside_a_sub_batch_clips_that_sub_batch_only():
    """The hand clip computes the norm in another order than torch's foreach norms: 1e-12 relative."""
    a, oa, b, ob = _pair()
    x, y = _batch(0)
    norms = [_clip(gs, 1.0)[1] for gs in _sub_grads(b, x, y)]
    max_norm = sorted(norms)[1] + 1e-3  # clips some sub-batches and leaves others
    assert min(norms) < max_norm < max(norms)
    _manual_loop(a, oa, x, y, clip=max_norm)
    clipped = [_clip(gs, max_norm)[0] for gs in _sub_grads(b, x, y)]
    for s in range(4):
        for p, g in zip(a.parameters(), clipped[s]):
            torch.testing.assert_close(oa.sub_batch_grad(p, s), g, rtol=1e-12, atol=1e-15)
    ob.zero_grad()
    for s, gs in enumerate(clipped):
        ob.set_grads(s, list(b.parameters()), gs)
    ob.step(weights=[4, 4, 4, 4])
    for u, v in zip(_state(a, oa), _state(b, ob)):
        for p, q in zip(u, v):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("then", ["step", "sub_batch"])
def test_clip_grad_norm_on_the_model_after_the_last_sub_batch_is_refused(then):
    a, oa, b, ob = _pair()
    x, y = _batch(0)
    _manual_loop(a, oa, x, y)
    _manual_loop(b, ob, x, y)
    before = _state(a, oa)
    step_before = oa.state_dict()["badm"]["step"]
    oa.zero_grad()
    for s, (xs, ys) in enumerate(zip(x.tensor_split(4), y.tensor_split(4))):
        with oa.sub_batch(s):
            _loss(a, xs, ys).backward()
    torch.nn.utils.clip_grad_norm_(a.parameters(), 1e-3)  # reaches the last sub-batch's .grad only
    with pytest.raises(RuntimeError, match=r"outside `with opt.sub_batch\(s\):`") as err:
        if then == "step":
            oa.step()
        else:
            with oa.sub_batch(0):
                pass
    assert "clip_grad_norm_" in str(err.value)
    _assert_equal(before, _state(a, oa))
    assert oa.state_dict()["badm"]["step"] == step_before
    # after opt.zero_grad() the loop goes on as if the bad iteration had not happened
    x2, y2 = _batch(1)
    _manual_loop(a, oa, x2, y2)
    _manual_loop(b, ob, x2, y2)
    _assert_equal(_state(a, oa), _state(b, ob))


_CLIP_BUG = (
    "BUG: BADM.clip_grad_norm_ passes the gradient tensors (rows / p.grad) to "
    "torch.nn.utils.clip_grads_with_norm_, which takes *parameters* and scales their .grad (None for a "
    "gradient tensor): the norms are returned but nothing is clipped"
)


def test_opt_clip_grad_norm_with_one_row_clips_the_grad():
    p = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = badm_fast.BADM([p], backend="torch")
    p.grad = torch.tensor([3.0, 4.0, 0.0], dtype=F64)
    norms = opt.clip_grad_norm_(1.0)
    assert norms.shape == (1,) and float(norms[0]) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0, 0.0], dtype=F64) / (5.0 + 1e-6), rtol=1e-15, atol=0)


def test_opt_clip_grad_norm_clips_every_row_and_returns_their_norms():
    a, oa, b, ob = _pair()
    x, y = _batch(0)
    oa.zero_grad()
    for s, (xs, ys) in enumerate(zip(x.tensor_split(4), y.tensor_split(4))):
        with oa.sub_batch(s):
            _loss(a, xs, ys).backward()
    raw = _sub_grads(b, x, y)
    want_norms = [_clip(gs, 1.0)[1] for gs in raw]
    max_norm = sorted(want_norms)[1] + 1e-3
    norms = oa.clip_grad_norm_(max_norm)
    assert norms.shape == (4,)
    torch.testing.assert_close(norms.double(), torch.tensor(want_norms, dtype=F64), rtol=1e-12, atol=0)
    clipped = [_clip(gs, max_norm)[0] for gs in raw]
    for s in range(4):
        for p, g in zip(a.parameters(), clipped[s]):
            torch.testing.assert_close(oa.sub_batch_grad(p, s), g, rtol=1e-12, atol=1e-15)
    oa.step()
    ob.zero_grad()
    for s, gs in enumerate(clipped):
        ob.set_grads(s, list(b.parameters()), gs)
    ob.step()
    for u, v in zip(_state(a, oa), _state(b, ob)):
        for p, q in zip(u, v):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_split_step_with_max_grad_norm_equals_the_manual_loop():
    a, oa, b, ob = _pair()
    for t in range(3):
        x, y = _batch(t, n=18)  # ragged: sub-batches of 5, 5, 4, 4
        loss = badm_fast.split_step(a, oa, F.cross_entropy, x, y, max_grad_norm=0.3)
        with torch.no_grad():
            want = F.cross_entropy(b(x), y)
        _manual_loop(b, ob, x, y, clip=0.3)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    _assert_equal(_state(a, oa), _state(b, ob))
    # the clipping did something: without it the trajectory differs
    c, oc, _, _ = _pair()
    for t in range(3):
        badm_fast.split_step(c, oc, F.cross_entropy, *_batch(t, n=18))
    assert not torch.equal(c[0].weight, a[0].weight)


@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
def test_split_step_over_two_optimizers_equals_one_with_two_groups(max_grad_norm):
    kw = dict(lr=0.05, momentum=0.8, weight_decay=0.01, sub_batches=4, backend="torch")
    a, b = _model(), _model()
    opt_a = badm_fast.BADM(a[0].parameters(), **kw)
    opt_b = badm_fast.BADM(a[2].parameters(), **kw)
    one = badm_fast.BADM([{"params": b[0].parameters()}, {"params": b[2].parameters()}], **kw)
    for t in range(3):
        x, y = _batch(t, n=18)
        la = badm_fast.split_step(a, [opt_a, opt_b], F.cross_entropy, x, y, max_grad_norm=max_grad_norm)
        lb = badm_fast.split_step(b, one, F.cross_entropy, x, y, max_grad_norm=max_grad_norm)
        assert torch.equal(la, lb)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        st = opt_a.state.get(p) or opt_b.state[p]
        assert torch.equal(st["duals"], one.state[q]["duals"])
    assert not torch.equal(a[0].weight, _model()[0].weight)
