"""badm_fast.BADM: faithfulness to the paper form, the exact fast path, and torch.optim conventions."""

import copy
import io
import os
import pickle

import parity
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import badm_fast
from badm_fast import backends, reference

CPU_BACKENDS = parity.cpu_backends()


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _data(n=40, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen, dtype=dtype)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # a learnable labelling


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], [
        opt.state[p]["duals"].clone() for p in model.parameters() if p in opt.state
    ]


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert torch.equal(u, v)


# ---------------------------------------------------------------- faithfulness


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("S", [1, 2, 3, 8])
def test_optimizer_follows_the_paper_form(backend, S):
    """The optimizer's weights after each step equal a direct transcription of the paper
    form (explicit w_s, pi_s) fed with the same sub-batch gradients; weights change each step."""
    rho, sigma = 3.0, 5.0
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    paper = {n: reference.PaperState.init(p.detach(), S) for n, p in model.named_parameters()}
    opt = badm_fast.BADM(model.parameters(), sub_batches=S, rho=rho, sigma=sigma, backend=backend)
    gen = torch.Generator().manual_seed(5)
    for step in range(12):
        x, y = _data(n=int(torch.randint(S, 4 * S + 9, (), generator=gen)), seed=step)
        parts = badm_fast.split_batch(x, y, S)
        # sub-batch gradients at the current z, computed independently of the optimizer
        grads = {n: [] for n in names}
        for xs, ys in parts:
            m = copy.deepcopy(model)
            if ys.shape[0]:
                F.cross_entropy(m(*xs), ys).backward()
            for n, p in m.named_parameters():
                grads[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        sizes = torch.tensor([float(ys.shape[0]) for _, ys in parts], dtype=torch.float64)
        alpha = sizes / sizes.sum()
        want = {n: reference.paper_step(paper[n], torch.stack(grads[n]), alpha, rho, sigma) for n in names}
        badm_fast.split_step(model, opt, F.cross_entropy, x, y)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), want[n], rtol=1e-10, atol=1e-12, msg=f"{n} step {step}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_qhm_oracle_tracks_the_optimizer(backend):
    """BADM(S=4, constant equal weights) is QHM on the full-batch gradient (docs/algorithm.md)."""
    rho, sigma, S = 9.0, 10.0, 4
    model, oracle = _model(), _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=S, rho=rho, sigma=sigma, backend=backend)
    lr, beta, nu = 1 / sigma, rho / (rho + sigma), 1 - sigma / rho
    bufs = [torch.zeros_like(p) for p in oracle.parameters()]
    x, y = _data(n=48)
    for step in range(40):
        badm_fast.split_step(model, opt, F.cross_entropy, x, y)
        oracle.zero_grad()
        F.cross_entropy(oracle(x), y).backward()
        with torch.no_grad():
            for p, b in zip(oracle.parameters(), bufs):
                b.mul_(beta).add_(p.grad, alpha=1 - beta)
                p.sub_(lr * ((1 - nu) * p.grad + nu * b))
        for p, q in zip(model.parameters(), oracle.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=f"step {step}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merged_mode_gives_the_per_sub_batch_trajectory(backend):
    S = 4
    a, b = _model(), _model()
    opt_a = badm_fast.BADM(a.parameters(), sub_batches=S, rho=4.0, sigma=8.0, backend=backend)
    opt_b = badm_fast.BADM(b.parameters(), sub_batches=S, rho=4.0, sigma=8.0, backend=backend, mode="merged")
    x, y = _data(n=32)
    for _ in range(25):
        badm_fast.split_step(a, opt_a, F.cross_entropy, x, y)
        badm_fast.split_step(b, opt_b, F.cross_entropy, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # S times less state
    p0 = next(b.parameters())
    assert opt_b.state[p0]["duals"].shape[0] == 1 and opt_a.state[next(a.parameters())]["duals"].shape[0] == S


def test_merged_mode_refuses_changing_weights_without_changing_state():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, mode="merged")
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    opt.step(weights=[1, 1])
    F.cross_entropy(model(x), y).backward()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="same sub-batch weights"):
        opt.step(weights=[3, 1])
    _assert_same(before, _snapshot(model, opt))
    with pytest.raises(ValueError, match="one backward pass over the whole batch"):
        with opt.sub_batch(0):
            pass


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_step_equals_split_step(backend):
    a, b = _model(), _model()
    opt_a = badm_fast.BADM(a.parameters(), sub_batches=4, rho=2.0, sigma=6.0, backend=backend)
    opt_b = badm_fast.BADM(b.parameters(), sub_batches=4, rho=2.0, sigma=6.0, backend=backend)
    x, y = _data(n=24)
    for _ in range(5):
        la = badm_fast.split_step(a, opt_a, F.cross_entropy, x, y)
        lb = badm_fast.vmap_step(b, opt_b, F.cross_entropy, x, y)
        torch.testing.assert_close(la, lb)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of sub_batches=4"):
        badm_fast.vmap_step(b, opt_b, F.cross_entropy, x[:10], y[:10])


def test_loss_goes_down():
    model = _model(dtype=torch.float32)
    opt = badm_fast.BADM(model.parameters(), sub_batches=4, rho=9.0, sigma=10.0)
    x, y = _data(n=64, dtype=torch.float32)
    first = badm_fast.split_step(model, opt, F.cross_entropy, x, y).item()
    for _ in range(100):
        last = badm_fast.split_step(model, opt, F.cross_entropy, x, y).item()
    assert last < 0.7 * first


# ---------------------------------------------------------------- flat buffers and gradients


def test_parameters_stay_the_users_tensors_and_gradients_land_in_rows():
    model = _model(dtype=torch.float32)
    before = [(p.detach().clone(), p.data_ptr()) for p in model.parameters()]
    opt = badm_fast.BADM(model.parameters(), sub_batches=3)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 4  # each parameter keeps its own storage
    for p, (b, ptr) in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.data_ptr() == ptr
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    x, y = _data(n=9, dtype=torch.float32)
    for s in range(3):
        with opt.sub_batch(s):
            assert all(p.grad is None for p in model.parameters())  # autograd hands over a fresh gradient
            F.cross_entropy(model(x[3 * s : 3 * s + 3]), y[3 * s : 3 * s + 3]).backward()
    # row s holds exactly sub-batch s's gradient
    for s in range(3):
        ref = _model(dtype=torch.float32)
        ref.load_state_dict(model.state_dict())
        F.cross_entropy(ref(x[3 * s : 3 * s + 3]), y[3 * s : 3 * s + 3]).backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(opt.sub_batch_grad(p, s), q.grad)
    opt.step()
    for p, (_, ptr) in zip(model.parameters(), before):
        assert p.data_ptr() == ptr  # updated in place


def test_plain_backward_outside_sub_batch_is_refused_for_several_sub_batches():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()  # no hook runs during backward: refused at the next call
    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"outside `with opt.sub_batch\(s\):`"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))
    opt.zero_grad()  # the optimizer is still usable
    with opt.sub_batch(0):
        F.cross_entropy(model(x), y).backward()
    # a stray backward after a sub-batch accumulates into .grad, not into any row: refused too
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="outside `with opt.sub_batch"):
        with opt.sub_batch(1):
            pass


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_drop_in_loop_with_one_sub_batch_matches_momentum_sgd(backend):
    """S=1, rho=sigma*mu/(1-mu), plain loop zero_grad/backward/step: QHM with nu = 1-(1-mu)/mu."""
    model, ref = _model(), _model()
    opt = badm_fast.BADM(model.parameters(), rho=10.0, sigma=10.0, backend=backend)  # rho == sigma: SGD lr 0.1
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = _data()
    for _ in range(10):
        for m, o in ((model, opt), (ref, sgd)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_closure():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=1.0, sigma=5.0)
    x, y = _data()
    calls = []

    def closure():
        opt.zero_grad()
        total = 0.0
        for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, 2)):
            with opt.sub_batch(s):
                loss = F.cross_entropy(model(*xs), ys)
                loss.backward()
            total += loss.item() / 2
        calls.append(total)
        return total

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert loss == calls[0] and len(calls) == 1
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_parameter_without_gradient_is_skipped_and_partial_gradients_count_as_zero():
    torch.manual_seed(0)
    used, unused, half = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2)
    params = list(used.parameters()) + list(unused.parameters()) + list(half.parameters())
    opt = badm_fast.BADM(params, sub_batches=2, rho=2.0, sigma=3.0)
    x = torch.randn(8, 4)
    # seed non-zero duals everywhere, so a skipped parameter would visibly move
    for p in params:
        opt.state[p]["duals"].normal_()
    before_unused = [p.detach().clone() for p in unused.parameters()]
    duals_unused = [opt.state[p]["duals"].clone() for p in unused.parameters()]
    half_before = [(p.detach().clone(), opt.state[p]["duals"].clone()) for p in half.parameters()]
    for s in range(2):
        with opt.sub_batch(s):
            out = used(x[4 * s : 4 * s + 4]).sum()
            if s == 0:
                out = out + half(x[:4]).sum()
            out.backward()
    g_half = [opt.sub_batch_grad(p, 1).clone() for p in half.parameters()]  # row 1 of 'half': zero
    opt.step()
    for p, b, d in zip(unused.parameters(), before_unused, duals_unused):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["duals"], d)
    # 'half' got a gradient in sub-batch 0 only: sub-batch 1's gradient is zero
    for (z0, d0), p, g1 in zip(half_before, half.parameters(), g_half):
        assert torch.count_nonzero(g1) == 0
        g0 = torch.ones_like(z0) * 4.0 if p.dim() == 1 else x[:4].sum(0).expand_as(z0)
        z, duals = z0.clone(), [d0[0].clone(), d0[1].clone()]
        lr, mu = reference.lr_momentum(2.0, 3.0)
        reference.fused_step_([z], [g0, torch.zeros_like(z)], duals, torch.tensor([0.5, 0.5]),
                              reference.hyper_tensor(lr, mu))
        assert torch.equal(p.detach(), z)
        assert torch.equal(opt.state[p]["duals"], torch.stack(duals))


def test_frozen_parameters_are_never_touched():
    model = _model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    ptr, value = frozen.data_ptr(), frozen.detach().clone()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2)
    x, y = _data()
    for _ in range(3):
        badm_fast.split_step(model, opt, F.cross_entropy, x, y)
    assert frozen.data_ptr() == ptr and torch.equal(frozen, value) and frozen not in opt.state


def test_param_groups_with_their_own_rho_sigma():
    model = _model()
    opt = badm_fast.BADM(
        [{"params": model[0].parameters(), "rho": 1.0, "sigma": 4.0}, {"params": model[2].parameters()}],
        sub_batches=2, rho=5.0, sigma=7.0,
    )
    rho_sigma = [reference.rho_sigma(g["lr"], g["momentum"]) for g in opt.param_groups]
    torch.testing.assert_close(torch.tensor(rho_sigma), torch.tensor([[1.0, 4.0], [5.0, 7.0]]), rtol=1e-15, atol=0)
    refs = {p: (reference.PaperState.init(p.detach(), 2), *rs)
            for g, rs in zip(opt.param_groups, rho_sigma) for p in g["params"]}
    x, y = _data(n=20)
    for step in range(5):
        grads = {}
        for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, 2)):
            m = copy.deepcopy(model)
            F.cross_entropy(m(*xs), ys).backward()
            for p, q in zip(model.parameters(), m.parameters()):
                grads.setdefault(p, []).append(q.grad)
        want = {p: reference.paper_step(st, torch.stack(grads[p]), torch.tensor([0.5, 0.5]), r, sg)
                for p, (st, r, sg) in refs.items()}
        badm_fast.split_step(model, opt, F.cross_entropy, x, y)
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), want[p], rtol=1e-10, atol=1e-12)


def test_add_param_group():
    a, b = nn.Linear(3, 3).double(), nn.Linear(3, 1).double()
    opt = badm_fast.BADM(a.parameters(), sub_batches=2, rho=9.0, sigma=10.0)
    opt.add_param_group({"params": b.parameters(), "rho": 9.0, "sigma": 3.0})
    assert len(opt.param_groups) == 2
    assert (opt.param_groups[1]["lr"], opt.param_groups[1]["momentum"]) == reference.lr_momentum(9.0, 3.0)
    x = torch.randn(4, 3, dtype=torch.float64)
    before = b.weight.detach().clone()
    for s in range(2):
        with opt.sub_batch(s):
            b(a(x[2 * s : 2 * s + 2])).sum().backward()
    opt.step()
    assert not torch.equal(b.weight, before)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": b.parameters()})
    with pytest.raises(ValueError, match="Invalid sigma"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "sigma": 0.0})
    assert len(opt.param_groups) == 2


def test_zero_grad():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2)
    x, y = _data()
    with opt.sub_batch(1):
        F.cross_entropy(model(x), y).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None for p in model.parameters())  # as torch.optim: None stays None
    with opt.sub_batch(0):
        F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    for p in model.parameters():
        for s in range(2):
            assert torch.count_nonzero(opt.sub_batch_grad(p, s)) == 0
    model.zero_grad()  # the model's zero_grad clears every sub-batch too
    assert all(opt.sub_batch_grad(p, s) is None for p in model.parameters() for s in range(2))


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = badm_fast.BADM(emb.parameters(), backend="torch")
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_step_hooks_run():
    model = _model()
    opt = badm_fast.BADM(model.parameters())
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert seen == ["pre", "post"]


def test_repr_names_the_configuration():
    opt = badm_fast.BADM(_model().parameters(), sub_batches=3, rho=2.0, sigma=4.0, backend="torch")
    r = repr(opt)
    assert r.startswith("BADM (sub_batches=3") and "rho=2, sigma=4" in r and "backend='torch'" in r
    assert "lr=0.1666" in r and "momentum=0.333" in r


def test_residuals_are_reported():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=2.0, sigma=5.0)
    x, y = _data()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, 2)):
        with opt.sub_batch(s):
            F.cross_entropy(model(*xs), ys).backward()
    grads = [torch.cat([opt.sub_batch_grad(p, s).flatten() for p in model.parameters()]) for s in range(2)]
    opt.step(residuals=True)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(opt.residuals["dual"], 5.0 * (after - before).norm())
    # first step: duals were zero, w_s' - z = -g_s/(rho+sigma)
    want = (0.5 * sum((g / 7.0).square().sum() for g in grads)).sqrt()
    torch.testing.assert_close(opt.residuals["primal"], want)


# ---------------------------------------------------------------- state


def _train(model, opt, steps, seed=0):
    for t in range(steps):
        x, y = _data(n=20, seed=seed + t)
        badm_fast.split_step(model, opt, F.cross_entropy, x, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_dict_round_trip_resumes_bit_exactly(backend, tmp_path):
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, rho=2.0, sigma=6.0, backend=backend)
    _train(model, opt, 5)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    _train(model, opt, 5, seed=100)

    ckpt = torch.load(path, weights_only=True)
    model2 = _model(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = badm_fast.BADM(model2.parameters(), sub_batches=3, rho=0.5, sigma=1.0, backend=backend)
    opt2.load_state_dict(ckpt["opt"])
    assert (opt2.param_groups[0]["lr"], opt2.param_groups[0]["momentum"]) == reference.lr_momentum(2.0, 6.0)
    _train(model2, opt2, 5, seed=100)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["duals"], opt2.state[q]["duals"])
    assert ckpt["opt"]["badm"]["version"] == badm_fast.STATE_VERSION


def test_state_dict_holds_compact_copies():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2)
    sd = opt.state_dict()
    for idx, p in enumerate(model.parameters()):
        d = sd["state"][idx]["duals"]
        assert d.shape == (2, *p.shape)
        assert d.untyped_storage().nbytes() == d.numel() * d.element_size()  # no whole-buffer storage
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert buf.tell() < 4 * sum(p.numel() for p in model.parameters()) * 8 * 2


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: sd["badm"].update(sub_batches=5), "sub_batches=5"),
        (lambda sd: sd["badm"].update(version=99), "unsupported BADM state version 99"),
        (lambda sd: [g.pop("badm") for g in [sd, *sd["param_groups"]]], "not a BADM state_dict"),
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "2 parameter groups"),
        (lambda sd: sd["state"][0].update(duals=torch.zeros(2, 7)), r"expected \(2, 16, 6\)"),
        (lambda sd: sd["state"].pop(1), "no duals for parameter 1"),
        (lambda sd: sd["param_groups"][0].update(lr=-1.0), "Invalid lr"),
        (lambda sd: sd["param_groups"][0].update(momentum=1.0), "Invalid momentum"),
    ],
)
def test_load_state_dict_mismatch_raises_and_changes_nothing(mutate, match):
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=1.0, sigma=3.0)
    _train(model, opt, 2)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["duals"] = torch.full_like(entry["duals"], 42.0)
    sd["param_groups"][0]["lr"] = 7.0
    mutate(sd)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(model, opt))
    assert opt.param_groups[0]["lr"] == 0.25


def test_deepcopy_and_pickle():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=2.0, sigma=4.0, backend="torch")
    _train(model, opt, 3)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.sub_batches == 2 and clone.backend == "torch"
        for p, q in zip(opt.param_groups[0]["params"], clone.param_groups[0]["params"]):
            assert torch.equal(p, q) and p is not q
            assert torch.equal(opt.state[p]["duals"], clone.state[q]["duals"])
    # deepcopy of model and optimizer together keeps them linked
    m2, o2 = copy.deepcopy((model, opt))
    _train(model, opt, 2, seed=50)
    _train(m2, o2, 2, seed=50)
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_model_load_state_dict_and_replaced_data_are_stepped_in_place():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=1, rho=9.0, sigma=10.0)
    other = _model(seed=9)
    model.load_state_dict(other.state_dict())
    new = _model(seed=10)[0].weight.detach().clone()
    model[0].weight.data = new.clone()  # same shape/dtype/device, new storage
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    g = model[0].weight.grad.clone()
    ptr = model[0].weight.data_ptr()
    opt.step(weights=None)
    assert model[0].weight.data_ptr() == ptr  # the user's tensor, updated in place
    torch.testing.assert_close(model[0].weight.detach(), new - 2 * g / (9.0 + 10.0))  # stepped from the new data
    torch.testing.assert_close(model[2].bias.detach(), other[2].bias.detach() - 2 * model[2].bias.grad / 19.0)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rho": 1.0, "sigma": 0.0}, "Invalid sigma"),
        ({"rho": 1.0, "sigma": -1.0}, "Invalid sigma"),
        ({"rho": 1.0, "sigma": float("nan")}, "Invalid sigma"),
        ({"rho": -0.1, "sigma": 1.0}, "Invalid rho"),
        ({"rho": float("inf"), "sigma": 1.0}, "Invalid rho"),
        ({"rho": 1.0, "sigma": 2.0, "lr": 0.1}, "either lr/momentum or rho/sigma"),
        ({"lr": -0.1}, "Invalid lr"),
        ({"lr": float("nan")}, "Invalid lr"),
        ({"momentum": 1.0}, "Invalid momentum"),
        ({"momentum": -0.5}, "Invalid momentum"),
        ({"weight_decay": -1.0}, "Invalid weight_decay"),
        ({"maximize": 1}, "Invalid maximize"),
        ({"sub_batches": 0}, "Invalid sub_batches"),
        ({"sub_batches": 2.0}, "Invalid sub_batches"),
        ({"mode": "fast"}, "Invalid mode"),
        ({"backend": "tpu"}, "Invalid backend"),
        ({"overlap": True}, "give process_group"),
        ({"overlap": 1}, "Invalid overlap"),
        ({"bucket_cap_mb": 0.0}, "Invalid bucket_cap_mb"),
        ({"bucket_cap_mb": float("inf")}, "Invalid bucket_cap_mb"),
        ({"bucket_cap_mb": "25"}, "Invalid bucket_cap_mb"),
    ],
)
def test_constructor_errors(kwargs, match):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        badm_fast.BADM(model.parameters(), **kwargs)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_constructor_rejects_integer_parameters():
    with pytest.raises(ValueError, match="BADM supports"):
        badm_fast.BADM([nn.Parameter(torch.zeros(3, dtype=torch.int32), requires_grad=False)])


@pytest.mark.parametrize(
    "weights,match",
    [
        ([1.0, 2.0], "expected 3 weights"),
        ([1.0, -1.0, 2.0], "must be >= 0"),
        ([0.0, 0.0, 0.0], "must not all be zero"),
        ([1.0, float("nan"), 1.0], "must be finite"),
        ("abc", "sequence of 3 numbers"),
        (torch.ones(3, 1), "must be 1-D"),
    ],
)
def test_step_weight_errors_change_nothing(weights, match):
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, rho=1.0, sigma=2.0)
    _train(model, opt, 1)
    x, y = _data()
    for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, 3)):
        with opt.sub_batch(s):
            F.cross_entropy(model(*xs), ys).backward()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.step(weights=weights)
    _assert_same(before, _snapshot(model, opt))
    opt.step(weights=[1, 1, 1])  # still usable
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))


def test_sub_batch_index_errors():
    opt = badm_fast.BADM(_model().parameters(), sub_batches=2)
    for bad in (-1, 2, 1.0, True):
        with pytest.raises(ValueError, match="out of range"):
            with opt.sub_batch(bad):
                pass
    with pytest.raises(RuntimeError, match="do not nest"):
        with opt.sub_batch(0):
            with opt.sub_batch(1):
                pass


@pytest.mark.parametrize("S", [1, 3])
def test_sub_batch_weights_are_the_step_weights(S):
    """``sub_batch(s, weight=w)`` gives the next step's weights (1 for a sub-batch given none), bit for
    bit as ``step(weights=...)``; step(weights=...) overrides them; a step or zero_grad() clears them;
    a closure's contexts count."""
    x, y = _data(n=30)
    runs = {}
    for how in ("step", "context", "context, partly", "override", "closure"):
        model = _model()
        opt = badm_fast.BADM(model.parameters(), sub_batches=S, rho=1.5, sigma=4.0)
        for t in range(3):
            parts = badm_fast.split_batch(x[t:], y[t:], S)
            sizes = [float(len(ys)) for _, ys in parts]
            weights = sizes if how != "context, partly" else [1.0] + sizes[1:]

            def run(parts=parts, how=how, opt=opt, model=model):
                opt.zero_grad()
                for s, (xs, ys) in enumerate(parts):
                    w = None if how == "step" or (how == "context, partly" and s == 0) else float(len(ys))
                    with opt.sub_batch(s, weight=w if how != "override" else 7.0):
                        F.cross_entropy(model(*xs), ys).backward()

            if how == "closure":
                opt.step(run)
            else:
                run()
                opt.step(weights=sizes if how in ("step", "override") else None)
            assert opt._sub_weights == [None] * S
            assert opt.state_dict()["badm"]["alpha"] == badm_fast.optimizer.normalize_weights(weights, S)
        runs[how] = _snapshot(model, opt)
    for how in ("context", "override", "closure"):
        _assert_same(runs[how], runs["step"])
    if S > 1:
        assert not torch.equal(runs["context, partly"][0][0], runs["step"][0][0])
    opt = badm_fast.BADM(_model().parameters(), sub_batches=S)
    with opt.sub_batch(0, weight=3.0):
        pass
    opt.zero_grad()
    assert opt._sub_weights == [None] * S
    for bad in (float("nan"), -1.0, float("inf"), "2", True, [1.0]):
        with pytest.raises(ValueError, match="Invalid weight"):
            with opt.sub_batch(0, weight=bad):
                pass
    assert opt._sub_weights == [None] * S
    with pytest.raises(ZeroDivisionError):
        with opt.sub_batch(0, weight=5.0):
            1 / 0
    assert opt._sub_weights == [None] * S, "a failed context leaves the weights as they were"


def test_step_refuses_invalid_group_hyperparameters():
    model = _model()
    opt = badm_fast.BADM(model.parameters())
    opt.param_groups[0]["sigma"] = 0.0
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="Invalid sigma"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))


def test_cast_before_the_first_step_works_and_after_it_is_a_clear_error():
    model = _model(dtype=torch.float32)
    opt = badm_fast.BADM(model.parameters(), rho=2.0, sigma=3.0)
    ref = copy.deepcopy(model).double()
    model.double()  # as with torch.optim: casting before the first step is fine
    opt_ref = badm_fast.BADM(ref.parameters(), rho=2.0, sigma=3.0)
    x, y = _data()
    for m, o in ((model, opt), (ref, opt_ref)):
        for _ in range(2):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.dtype == torch.float64 and torch.equal(p, q)
        assert opt.state[p]["duals"].dtype == torch.float64
    model.float()
    opt.zero_grad()
    F.cross_entropy(model(x.float()), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="after the first step"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# ---------------------------------------------------------------- back ends


def test_explicit_unavailable_backend_raises_with_the_reason():
    with pytest.raises(badm_fast.BackendUnavailable, match="'cuda' is unavailable on cpu"):
        badm_fast.BADM(_model().parameters(), backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(badm_fast.BackendUnavailable, match="'triton' is unavailable on cpu"):
            badm_fast.BADM(_model().parameters(), backend="triton")


def test_auto_falls_back_to_torch_without_the_extension(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_load_extension", lambda: (None, ImportError("no _C here")))
    with caplog.at_level("INFO", logger="badm_fast"):
        opt = badm_fast.BADM(_model().parameters())
    assert opt.backend == "torch"
    assert "no _C here" in caplog.text
    with pytest.raises(badm_fast.BackendUnavailable, match="no _C here") as info:
        badm_fast.BADM(_model().parameters(), backend="cpp")
    assert isinstance(info.value.__cause__, ImportError)


def test_auto_picks_cpp_when_the_extension_is_built():
    ok, reason, _ = backends.availability("cpp", "cpu")
    if not ok:
        if os.environ.get("BADM_FAST_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"the C++ extension must be built here: {reason}")
        pytest.skip(reason)
    assert badm_fast.BADM(_model().parameters()).backend == "cpp"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("BADM_FAST_BACKEND", "torch")
    assert badm_fast.BADM(_model().parameters()).backend == "torch"
    monkeypatch.setenv("BADM_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="BADM_FAST_BACKEND='bogus'"):
        badm_fast.BADM(_model().parameters())


# ---------------------------------------------------------------- non-finite gradients and AMP


def _sub_batch_backward(model, opt, x, y, scale=None):
    opt.zero_grad()
    for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, opt.sub_batches)):
        with opt.sub_batch(s):
            loss = F.cross_entropy(model(*xs), ys)
            (loss if scale is None else scale(loss)).backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_raises_naming_parameter_and_sub_batch(bad):
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, rho=1.0, sigma=2.0)
    _train(model, opt, 2)
    x, y = _data()
    _sub_batch_backward(model, opt, x, y)
    opt.sub_batch_grad(model[2].bias, 1)[2] = bad  # parameter 3 (model[2].bias), sub-batch 1
    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"parameter 3 of param group 0 \(shape \(3,\)\), sub-batch 1"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))


def test_nonfinite_gradient_can_skip_the_step():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, on_nonfinite="skip")
    x, y = _data()
    _sub_batch_backward(model, opt, x, y)
    opt.sub_batch_grad(model[0].weight, 0)[0, 5] = float("nan")
    before = _snapshot(model, opt)
    opt.step()
    _assert_same(before, _snapshot(model, opt))
    assert opt.skipped_steps == 1
    _sub_batch_backward(model, opt, x, y)
    opt.step()
    assert opt.skipped_steps == 1
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))


def test_large_finite_gradients_are_not_mistaken_for_nonfinite():
    p = nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    opt = badm_fast.BADM([p], rho=0.0, sigma=1e6)
    p.grad = torch.full_like(p, 60000.0)  # their fp16 sum overflows; every value is finite
    opt.step()
    assert torch.isfinite(p).all() and (p < 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grad_scaler_unscales_every_row_and_skips_nonfinite_steps(dtype):
    a, b = _model(dtype=dtype), _model(dtype=dtype)
    opt_a = badm_fast.BADM(a.parameters(), sub_batches=2, rho=2.0, sigma=4.0)
    opt_b = badm_fast.BADM(b.parameters(), sub_batches=2, rho=2.0, sigma=4.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = _data(dtype=dtype)

    def scaled_backward(poison_row=None):
        opt_b.zero_grad()
        for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, 2)):
            with opt_b.sub_batch(s):
                scaler.scale(F.cross_entropy(b(*xs), ys)).backward()
                if s == poison_row:
                    b[0].weight.grad[0, 0] = float("inf")  # an overflow in this sub-batch's gradient

    for step in range(5):
        _sub_batch_backward(a, opt_a, x, y)
        opt_a.step()
        for poison, lowers in ((1, True), (0, False)) if step == 2 else ():
            # an overflow in the last sub-batch (the .grad GradScaler inspects) lowers the scale;
            # one in an earlier sub-batch refuses the step all the same
            scaled_backward(poison_row=poison)
            before, scale, skipped = _snapshot(b, opt_b), scaler.get_scale(), opt_b.skipped_steps
            scaler.step(opt_b)
            scaler.update()
            _assert_same(before, _snapshot(b, opt_b))
            assert opt_b.skipped_steps == skipped + 1
            assert scaler.get_scale() == (scale / 2 if lowers else scale)
        scaled_backward()
        scaler.step(opt_b)
        scaler.update()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)  # power-of-two scales unscale exactly


def test_grad_scaler_unscale_with_several_sub_batches_is_refused():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _data()
    _sub_batch_backward(model, opt, x, y, scale=scaler.scale)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscales only the .grad tensors"):
        scaler.step(opt)


# ---------------------------------------------------------------- state format versions and mode conversion


def test_version_1_state_still_loads():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=1.0, sigma=3.0)
    _train(model, opt, 3)
    sd = opt.state_dict()
    assert sd["badm"]["version"] == 3 and len(sd["badm"]["alpha"]) == 2
    v1 = copy.deepcopy(sd)
    v1["badm"]["version"] = 1
    del v1["badm"]["alpha"]  # what version 1 wrote: rho/sigma in the groups
    for g in v1["param_groups"]:
        for key in ("lr", "momentum", "weight_decay", "maximize"):
            del g[key]
    model2 = copy.deepcopy(model)
    opt2 = badm_fast.BADM(model2.parameters(), sub_batches=2)
    opt2.load_state_dict(v1)
    assert v1["badm"].keys() == {"version", "sub_batches", "mode", "step", "merged_alpha"}  # caller's dict untouched
    _train(model, opt, 2, seed=7)
    _train(model2, opt2, 2, seed=7)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="does not record the weights needed to merge"):
        badm_fast.BADM(copy.deepcopy(model).parameters(), sub_batches=2, mode="merged").load_state_dict(v1)


@pytest.mark.parametrize("direction", ["merged_to_sub_batch", "sub_batch_to_merged"])
def test_state_converts_between_modes_and_continues_the_trajectory(direction):
    S = 4
    x, y = _data(n=32)
    first, second = ("merged", "sub_batch") if direction == "merged_to_sub_batch" else ("sub_batch", "merged")
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=S, rho=3.0, sigma=6.0, mode=first)
    for _ in range(4):
        badm_fast.split_step(model, opt, F.cross_entropy, x, y)
    model2 = copy.deepcopy(model)
    opt2 = badm_fast.BADM(model2.parameters(), sub_batches=S, rho=3.0, sigma=6.0, mode=second)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[next(model2.parameters())]["duals"].shape[0] == (S if second == "sub_batch" else 1)
    for _ in range(4):
        badm_fast.split_step(model, opt, F.cross_entropy, x, y)
        badm_fast.split_step(model2, opt2, F.cross_entropy, x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_a_dropped_optimizer_is_freed():
    import gc
    import weakref

    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=2)
    x, y = _data()
    badm_fast.split_step(model, opt, F.cross_entropy, x, y)
    dead = weakref.ref(opt)
    duals = weakref.ref(opt.state[model[0].weight]["duals"])
    opt.zero_grad()
    del opt
    gc.collect()
    assert dead() is None and duals() is None
    # a new optimizer on the same model works
    opt2 = badm_fast.BADM(model.parameters(), sub_batches=2, rho=1.0, sigma=4.0)
    badm_fast.split_step(model, opt2, F.cross_entropy, x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- the parameters stay the user's tensors


def test_safetensors_save_and_load_of_a_model_optimised_by_badm(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model(dtype=torch.float32)
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=2.0, sigma=3.0)
    _train_float(model, opt)
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_model(model, path)
    twin = _model(seed=5, dtype=torch.float32)
    missing, unexpected = safetensors_torch.load_model(twin, path)
    assert not missing and not unexpected
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _train_float(model, opt, steps=2):
    for t in range(steps):
        x, y = _data(n=20, seed=t, dtype=torch.float32)
        badm_fast.split_step(model, opt, F.cross_entropy, x, y)


def test_a_submodule_state_dict_is_the_size_of_its_parameters():
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))
    opt = badm_fast.BADM(model.parameters(), sub_batches=2)
    x = torch.randn(8, 256)
    for s in range(2):
        with opt.sub_batch(s):
            model(x[4 * s : 4 * s + 4]).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(model[-1].state_dict(), buf)
    head_bytes = sum(p.numel() * p.element_size() for p in model[-1].parameters())
    assert head_bytes <= buf.tell() < head_bytes + 2048  # the head's 4 KB plus the file's framing, not the model


def test_a_parameter_frozen_at_construction_and_unfrozen_later_is_trained():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=2.0, sigma=3.0)
    assert model[0].weight not in opt.state  # no state for a frozen parameter
    x, y = _data()
    badm_fast.split_step(model, opt, F.cross_entropy, x, y)
    frozen = model[0].weight.detach().clone()
    model[0].weight.requires_grad_(True)  # gradual unfreezing
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()  # the full batch's gradient: the size-weighted sub-batch mean
    badm_fast.split_step(model, opt, F.cross_entropy, x, y)
    lr = opt.param_groups[0]["lr"]
    # its first step, from zero duals: z' = z - 2 lr g
    torch.testing.assert_close(model[0].weight.detach(), frozen - 2 * lr * ref[0].weight.grad, rtol=1e-12, atol=1e-14)
    assert opt.state[model[0].weight]["duals"].abs().sum() > 0
    badm_fast.split_step(model, opt, F.cross_entropy, x, y)
    assert not torch.equal(model[0].weight, frozen)


def test_set_grads_gives_state_to_a_parameter_unfrozen_after_construction():
    a = nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
    opt = badm_fast.BADM([a, b], sub_batches=2, rho=2.0, sigma=3.0)
    b.requires_grad_(True)
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    opt.set_grads(0, [a, b], [g, 2 * g])
    opt.set_grads(1, [a, b], [g, 2 * g])
    assert torch.equal(opt.sub_batch_grad(b, 0), 2 * g)
    opt.step()
    lr = opt.param_groups[0]["lr"]
    torch.testing.assert_close(b.detach(), torch.ones(3, dtype=torch.float64) - 2 * lr * 2 * g, rtol=1e-15, atol=0)
