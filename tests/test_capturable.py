"""``BADM(capturable=True)`` on CPU: every decision of ``step()`` taken on the device.

``capturable=True`` is supported on CPU tensors (back ends ``torch`` and ``triton`` under
TRITON_INTERPRET=1): a CUDA graph cannot be captured here, but everything the capture relies
on can be checked — the step's values live in tensors on the parameters' device, decisions
(skip, weights validity) are taken on the device, and ``step()`` never reads a tensor on the
host (``Tensor.item``/``tolist``/``cpu``/``__bool__``... patched to raise). The capture itself
and its replay are checked on a GPU by bench/gpu_check.py. The kernels' flags (found_inf,
inv_scale) are checked for every back end by tests/test_contract.py.
"""

import copy
import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if "badm_fast.kernels.badm_triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first defined

import badm_fast  # noqa: E402
from badm_fast import kernels, optimizer, reference  # noqa: E402

HAS_TRITON = kernels.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"{kernels.triton_unavailable_reason()}")
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]


# ---------------------------------------------------------------- the optimizer


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))


def _data(step, n=24):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 6, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _backward(model, opt, step, scale=None):
    opt.zero_grad()
    x, y = _data(step)
    for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, opt.sub_batches)):
        with opt.sub_batch(s):
            loss = F.cross_entropy(model(*xs), ys)
            (loss if scale is None else scale(loss)).backward()


def _state(model, opt):
    return [p.detach().clone() for p in model.parameters()] + [
        opt.state[p]["duals"].clone() for p in model.parameters()
    ]


def _assert_equal_state(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def _assert_close_state(a, b, backend):
    # every back end computes the reference's bits (tests/test_contract.py)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# Per step: (rho, sigma) of the group and the weights passed (a list, a tensor or None).
SCHEDULE = [
    ((1.0, 3.0), None),
    ((1.0, 3.0), [1.0, 2.0, 1.0]),
    ((2.5, 3.0), torch.tensor([4.0, 1.0, 1.0])),
    ((2.5, 5.0), torch.tensor([1.0, 1.0, 1.0])),
    ((0.0, 2.0), [2.0, 1.0, 1.0]),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_step_follows_the_host_checked_step(backend):
    # Changing rho, sigma and the weights (lists, device tensors) from step to step.
    a, b = _model(), _model()
    opt_a = badm_fast.BADM(a.parameters(), sub_batches=3, rho=1.0, sigma=3.0, backend="torch")
    opt_b = badm_fast.BADM(b.parameters(), sub_batches=3, rho=1.0, sigma=3.0, backend=backend, capturable=True)
    assert opt_b.backend == backend and opt_b.capturable
    for step, ((rho, sigma), weights) in enumerate(SCHEDULE):
        for opt in (opt_a, opt_b):
            opt.param_groups[0].update(rho=rho, sigma=sigma)
        _backward(a, opt_a, step)
        _backward(b, opt_b, step)
        opt_a.step(weights=weights, residuals=True)
        opt_b.step(weights=weights, residuals=True)
        _assert_close_state(_state(a, opt_a), _state(b, opt_b), backend)
        for k in ("primal", "dual"):
            torch.testing.assert_close(opt_b.residuals[k], opt_a.residuals[k], rtol=1e-5, atol=1e-12)
        lr, mu = reference.lr_momentum(rho, sigma)
        assert (opt_b.param_groups[0]["lr"], opt_b.param_groups[0]["momentum"]) == (lr, mu)
    assert int(opt_b.skipped_steps_tensor) == 0 and opt_b.state_dict()["badm"]["step"] == len(SCHEDULE)


@pytest.mark.parametrize("mode", ["merged", "sub_batch"])
def test_capturable_one_row_and_merged_modes(mode):
    a, b = _model(), _model()
    kw = dict(sub_batches=1 if mode == "sub_batch" else 3, mode=mode, rho=1.0, sigma=2.0, backend="torch")
    opt_a, opt_b = badm_fast.BADM(a.parameters(), **kw), badm_fast.BADM(b.parameters(), capturable=True, **kw)
    for step in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            x, y = _data(step)
            F.cross_entropy(model(x), y).backward()
            opt.step(weights=[1.0, 1.0, 1.0] if mode == "merged" else None)
    _assert_equal_state(_state(a, opt_a), _state(b, opt_b))


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradient_skips_on_the_device(backend, on_nonfinite):
    # "raise" cannot raise without a synchronisation: in capturable mode it skips and counts.
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, backend=backend, capturable=True, on_nonfinite=on_nonfinite)
    _backward(model, opt, 0)
    opt.step()
    _backward(model, opt, 1)
    opt.sub_batch_grad(model[0].weight, 0)[0, 5] = float("nan")  # sub-batch 0, not the .grad GradScaler sees
    before = _state(model, opt)
    opt.step(residuals=True)
    _assert_equal_state(before, _state(model, opt))
    assert int(opt.skipped_steps_tensor) == 1 and opt.skipped_steps == 1  # skipped_steps counts both kinds
    assert opt.residuals["primal"].item() == 0.0 and opt.residuals["dual"].item() == 0.0
    # The next clean step runs and the counter stays.
    _backward(model, opt, 2)
    opt.step()
    assert int(opt.skipped_steps_tensor) == 1
    assert any(not torch.equal(u, v) for u, v in zip(before, _state(model, opt)))


@pytest.mark.parametrize(
    "weights", [[-1.0, 2.0, 1.0], [float("nan"), 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("inf"), 1.0]]
)
def test_invalid_device_weights_skip_the_step(weights):
    # A device tensor cannot be validated on the host without a synchronisation: invalid
    # weights skip the step on the device and leave the device weights as they were.
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, backend="torch", capturable=True)
    _backward(model, opt, 0)
    opt.step(weights=torch.tensor([1.0, 2.0, 1.0]))
    alpha = opt._device_alpha.clone()
    _backward(model, opt, 1)
    before = _state(model, opt)
    opt.step(weights=torch.tensor(weights))
    _assert_equal_state(before, _state(model, opt))
    assert int(opt.skipped_steps_tensor) == 1
    assert torch.equal(opt._device_alpha, alpha)
    torch.testing.assert_close(alpha, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))


class _NoHostReads:
    """Makes every way of reading a tensor's value on the host raise inside the block."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        for name in self.NAMES:

            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"Tensor.{_name} called: a host synchronisation on CUDA")

            self.monkeypatch.setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        self.monkeypatch.undo()


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_step_never_reads_a_tensor_on_the_host(backend, monkeypatch):
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, backend=backend, capturable=True, on_nonfinite="raise")
    weights = torch.tensor([1.0, 2.0, 3.0])
    _backward(model, opt, 0)
    opt.step(weights=weights)  # warm-up (what a CUDA graph capture is preceded by)
    for step, w in [(1, weights), (2, [3.0, 2.0, 1.0]), (3, None)]:
        _backward(model, opt, step)
        if step == 3:
            opt.sub_batch_grad(model[0].weight, 2)[0, 0] = float("inf")
        opt.param_groups[0]["rho"] = 0.5 * step
        with _NoHostReads(monkeypatch):
            opt.step(weights=w, residuals=True)
    assert int(opt.skipped_steps_tensor) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_unscales_all_rows_and_skips_on_the_device(backend, monkeypatch):
    # GradScaler with a capturable optimizer: every back end unscales in the fused pass, without a
    # host synchronisation, and an overflow skips the step with the state untouched.
    a, b = _model(), _model()
    opt_a = badm_fast.BADM(a.parameters(), sub_batches=3, rho=2.0, sigma=4.0, backend="torch")
    opt_b = badm_fast.BADM(b.parameters(), sub_batches=3, rho=2.0, sigma=4.0, backend=backend, capturable=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step in range(4):
        _backward(a, opt_a, step)
        opt_a.step()
        if step == 2:  # an overflow in the last sub-batch's gradient, the .grad GradScaler checks
            opt_b.zero_grad()
            x, y = _data(step)
            for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, 3)):
                with opt_b.sub_batch(s):
                    scaler.scale(F.cross_entropy(b(*xs), ys)).backward()
                    if s == 2:
                        b[0].weight.grad[1, 1] = float("inf")
            before = _state(b, opt_b)
            with _NoHostReads(monkeypatch):
                scaler.step(opt_b)
            scaler.update()
            _assert_equal_state(before, _state(b, opt_b))
            assert scaler.get_scale() == 2.0**9 and int(opt_b.skipped_steps_tensor) == 1
        _backward(b, opt_b, step, scale=scaler.scale)
        with _NoHostReads(monkeypatch):
            scaler.step(opt_b)
        scaler.update()
        _assert_close_state(_state(a, opt_a), _state(b, opt_b), backend)  # power-of-two scales: exact


def test_writes_that_a_capture_would_replay_are_refused(monkeypatch):
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, rho=1.0, sigma=3.0, backend="torch", capturable=True)
    _backward(model, opt, 0)
    opt.step(weights=[1.0, 2.0, 1.0])
    before = _state(model, opt)
    monkeypatch.setattr(optimizer, "_capturing", lambda device: True)  # as inside torch.cuda.graph
    with pytest.raises(RuntimeError, match="host weights .* while a CUDA graph is being captured"):
        opt.step(weights=[3.0, 2.0, 1.0])
    opt.param_groups[0]["lr"] = 0.125
    with pytest.raises(RuntimeError, match="of param group 0 changed since the last step"):
        opt.step(weights=[1.0, 2.0, 1.0])
    _assert_equal_state(before, _state(model, opt))
    # Values written before the capture are fine: the capture reads them from the device.
    monkeypatch.setattr(optimizer, "_capturing", lambda device: False)
    opt.step(weights=torch.tensor([1.0, 1.0, 1.0]))
    monkeypatch.setattr(optimizer, "_capturing", lambda device: True)
    opt.step(weights=torch.tensor([1.0, 1.0, 1.0]))
    # A tensor lr is copied on the device at every step: a scheduler may change it in place.
    opt.param_groups[0]["lr"] = torch.tensor(0.125)
    opt.step(weights=torch.tensor([1.0, 1.0, 1.0]))


def test_capturable_configuration_errors():
    model = _model()
    with pytest.raises(ValueError, match="Invalid capturable: 1"):
        badm_fast.BADM(model.parameters(), capturable=1)
    cpu = nn.Parameter(torch.zeros(3))
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"capturable=True needs every parameter on one device, got \['cpu', 'meta'\]"):
        badm_fast.BADM([cpu, meta], capturable=True)
    assert badm_fast.BADM(model.parameters(), capturable=True).backend in ("cpp", "torch")  # "auto" on CPU
    merged = badm_fast.BADM(_model().parameters(), sub_batches=2, mode="merged", capturable=True)
    with pytest.raises(ValueError, match="mode='merged' checks on the host that the weights stay constant"):
        merged.step(weights=torch.tensor([1.0, 1.0]))


def test_state_dict_and_copies_keep_the_mode():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, rho=1.0, sigma=3.0, backend="torch", capturable=True)
    for step in range(2):
        _backward(model, opt, step)
        opt.step(weights=[1.0, 2.0, 3.0])
    sd = opt.state_dict()
    assert sd["badm"]["step"] == 2 and sd["badm"]["alpha"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.capturable and twin.state_dict()["badm"]["step"] == 2
    # A capturable state loads into a host-checked optimizer and continues identically.
    twin_model = copy.deepcopy(model)
    host = badm_fast.BADM(twin_model.parameters(), sub_batches=3, rho=1.0, sigma=3.0, backend="torch")
    host.load_state_dict(sd)
    _backward(model, opt, 5)
    _backward(twin_model, host, 5)
    opt.step()
    host.step()
    _assert_equal_state(_state(model, opt), _state(twin_model, host))
