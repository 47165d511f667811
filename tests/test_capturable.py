"""The capture-safe path on CPU: the Triton kernel's skip flag and fused unscale (interpreter),
the non-finite scan, and ``BADM(capturable=True)``.

``capturable=True`` is supported on CPU tensors (back ends ``torch`` and ``triton`` under
TRITON_INTERPRET=1): a CUDA graph cannot be captured here, but everything the capture relies
on can be checked — the step's values live in tensors on the parameters' device, decisions
(skip, weights validity) are taken on the device, and ``step()`` never reads a tensor on the
host (``Tensor.item``/``tolist``/``cpu``/``__bool__``... patched to raise). The capture itself
and its replay are checked on a GPU by bench/gpu_check.py.
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

import parity  # noqa: E402

import badm_fast  # noqa: E402
from badm_fast import capture, kernels, reference  # noqa: E402

HAS_TRITON = kernels.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"{kernels.triton_unavailable_reason()}")
BACKENDS = [pytest.param("triton", marks=needs_triton), "torch"]
BIG_BLOCK = 65536  # one interpreter program for every size below


def _flagged(backend):
    """The capture-safe step of ``backend`` with the contract's signature plus flags."""
    if backend == "triton":

        def fn(z, grads, duals, weights, rho, sigma, residuals=None, found_inf=None, inv_scale=None):
            kernels.badm_step(
                z,
                grads,
                duals,
                weights,
                rho,
                sigma,
                residuals,
                found_inf=found_inf,
                inv_scale=inv_scale,
                block_size=BIG_BLOCK,
            )

        return fn
    return capture.reference_step_flagged_


def _hyper(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- kernels: unscale, skip, scan


@pytest.mark.parametrize("S, P", [(1, 7), (3, 4097)])
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inv_scale_unscales_in_the_fused_pass(backend, dtype, S, P):
    # Gradients scaled by 2**k (exact in every dtype for these magnitudes) and inv_scale = 2**-k
    # give the reference step on the unscaled gradients; a clear flag changes nothing.
    k = 10
    step = _flagged(backend)

    def fn(z, grads, duals, weights, rho, sigma, residuals=None):
        step(
            z,
            grads * 2.0**k,
            duals,
            weights,
            _hyper(rho),
            _hyper(sigma),
            residuals,
            torch.zeros(1),
            torch.tensor([2.0**-k]),
        )

    parity.check_kernel(fn, S, P, dtype, seed=S + P, row_pad=3, residuals=True)


@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_without_touching_anything(backend, dtype):
    (z, grads, duals, weights, rho, sigma), (z_full, g_full, d_full) = parity.make_inputs(
        3, 4097, dtype, seed=2, row_pad=3
    )
    grads[1, 100] = float("inf")  # what the flag reports
    before = [t.clone() for t in (z_full, g_full, d_full)]
    res = torch.tensor([0.25, 0.5], dtype=torch.float64)
    flag = torch.ones(1)
    _flagged(backend)(z, grads, duals, weights, _hyper(rho), _hyper(sigma), res, flag, torch.tensor([0.5]))
    for t, b in zip((z_full, g_full, d_full), before):
        assert torch.equal(t.nan_to_num(7.0), b.nan_to_num(7.0))
    assert res.tolist() == [0.25, 0.5] and flag.item() == 1.0


@needs_triton
def test_flag_and_scale_are_read_at_each_call():
    # The values behind the pointers, not the values at the first launch: what a replayed CUDA
    # graph relies on.
    (z, grads, duals, weights, rho, sigma), _ = parity.make_inputs(2, 1000, torch.float32, seed=3)
    flag, inv = torch.ones(1), torch.tensor([1.0])
    z0, d0 = z.clone(), duals.clone()
    _flagged("triton")(z, grads, duals, weights, _hyper(rho), _hyper(sigma), None, flag, inv)
    assert torch.equal(z, z0) and torch.equal(duals, d0)
    flag.zero_()
    inv.fill_(0.25)
    _flagged("triton")(z, grads * 4.0, duals, weights, _hyper(rho), _hyper(sigma), None, flag, inv)
    reference.fused_step_(z0, grads, d0, weights, rho, sigma)
    torch.testing.assert_close(z, z0, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(duals, d0, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_scan_raises_the_flag(backend, dtype, bad):
    gen = torch.Generator().manual_seed(5)
    S, P = 3, 10007
    full = torch.full((S, P + 5), float("nan"), dtype=dtype)  # NaN poison beyond P: never read
    full[:, :P] = torch.randn(S, P, generator=gen).to(dtype)
    grads = full[:, :P]
    flag = torch.zeros(1)
    capture.nonfinite_check_(grads, flag, backend)
    assert flag.item() == 0.0
    for r, i in [(2, P - 1), (0, 0), (1, 4099)]:  # the last element, the first, one in a middle block
        g = grads.clone()
        g[r, i] = bad
        flag.zero_()
        capture.nonfinite_check_(g, flag, backend)
        assert flag.item() == 1.0, (r, i)
        capture.nonfinite_check_(grads, flag, backend)  # a clean buffer never clears the flag
        assert flag.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_scan_keeps_large_finite_values(backend):
    # fp64 values beyond the fp32 range and the largest fp16/bf16 values are finite.
    for dtype, big in [(torch.float64, 1e300), (torch.float16, 65504.0), (torch.bfloat16, 3.38e38)]:
        g = torch.full((2, 33), big, dtype=dtype)
        g[1] = -big
        flag = torch.zeros(1)
        capture.nonfinite_check_(g, flag, backend)
        assert flag.item() == 0.0, dtype


@needs_triton
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(found_inf=torch.zeros(1, dtype=torch.float64)), "found_inf must be a one-element float32 tensor"),
        (dict(found_inf=torch.zeros(2)), "found_inf must be a one-element float32 tensor"),
        (dict(inv_scale=torch.ones(1, dtype=torch.float16)), "inv_scale must be a one-element float32 tensor"),
        (dict(inv_scale=1.0), "inv_scale must be a one-element float32 tensor on cpu, got float"),
    ],
)
def test_invalid_flags_are_refused(kwargs, match):
    (z, grads, duals, weights, rho, sigma), _ = parity.make_inputs(2, 10, torch.float32, seed=1)
    with pytest.raises(ValueError, match=match):
        kernels.badm_step(z, grads, duals, weights, rho, sigma, **kwargs)
    with pytest.raises(ValueError, match="found_inf must be a one-element float32 tensor"):
        kernels.badm_nonfinite_check(grads, torch.zeros(1, dtype=torch.int32))


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
    tol = 2e-6 if backend == "triton" else 0.0  # the torch back end is the host path's own kernel
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


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
    opt_a = badm_fast.BADM(a.parameters(), sub_batches=3, backend="torch")
    opt_b = badm_fast.BADM(b.parameters(), sub_batches=3, backend=backend, capturable=True)
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
        assert opt_b.device_state.rho[0].item() == rho and opt_b.device_state.sigma[0].item() == sigma
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
    opt._buffers[0][0].grads[0, 5] = float("nan")  # sub-batch 0, not the row p.grad points at
    before = _state(model, opt)
    opt.step(residuals=True)
    _assert_equal_state(before, _state(model, opt))
    assert int(opt.skipped_steps_tensor) == 1 and opt.skipped_steps == 0
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
    alpha = opt.device_state.alpha.clone()
    _backward(model, opt, 1)
    before = _state(model, opt)
    opt.step(weights=torch.tensor(weights))
    _assert_equal_state(before, _state(model, opt))
    assert int(opt.skipped_steps_tensor) == 1
    assert torch.equal(opt.device_state.alpha, alpha)
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
            opt._buffers[0][0].grads[2, 0] = float("inf")
        opt.param_groups[0]["rho"] = 0.5 * step
        with _NoHostReads(monkeypatch):
            opt.step(weights=w, residuals=True)
    assert int(opt.skipped_steps_tensor) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_unscales_all_rows_and_skips_on_the_device(backend, monkeypatch):
    # GradScaler with a capturable optimizer: the triton back end unscales in the fused pass,
    # the torch one in a separate pass; both without a host synchronisation, and a forced inf
    # skips the step with the state untouched.
    a, b = _model(), _model()
    opt_a = badm_fast.BADM(a.parameters(), sub_batches=3, rho=2.0, sigma=4.0, backend="torch")
    opt_b = badm_fast.BADM(b.parameters(), sub_batches=3, rho=2.0, sigma=4.0, backend=backend, capturable=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step in range(4):
        _backward(a, opt_a, step)
        opt_a.step()
        _backward(b, opt_b, step, scale=scaler.scale)
        if step == 2:
            opt_b._buffers[0][0].grads[2, 1] = float("inf")  # row 2: the .grad GradScaler checks
            before = _state(b, opt_b)
        with _NoHostReads(monkeypatch):
            scaler.step(opt_b)
        scaler.update()
        if step == 2:
            _assert_equal_state(before, _state(b, opt_b))
            assert scaler.get_scale() == 2.0**9 and int(opt_b.skipped_steps_tensor) == 1
            _backward(b, opt_b, step, scale=scaler.scale)  # redo the step
            scaler.step(opt_b)
            scaler.update()
        _assert_close_state(_state(a, opt_a), _state(b, opt_b), backend)  # power-of-two scales: exact


@needs_triton
def test_fused_amp_path_without_capturable_mode(monkeypatch):
    # On one CUDA device with the Triton back end, GradScaler's unscale and skip run through the
    # capture-safe path even without capturable=True. Forced here on CPU tensors: the same
    # trajectory as the host-checked path; the skip is counted on the device.
    a, b = _model(), _model()
    opt_a = badm_fast.BADM(a.parameters(), sub_batches=3, rho=2.0, sigma=4.0, backend="torch")
    opt_b = badm_fast.BADM(b.parameters(), sub_batches=3, rho=2.0, sigma=4.0, backend="triton")
    monkeypatch.setattr(
        capture, "uses_fused_amp", lambda opt: opt is opt_b and getattr(opt, "grad_scale", None) is not None
    )
    scaler_a = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(3):
        _backward(a, opt_a, step, scale=scaler_a.scale)
        _backward(b, opt_b, step, scale=scaler_b.scale)
        if step == 1:
            for opt in (opt_a, opt_b):
                opt._buffers[0][0].grads[2, 3] = float("nan")
        scaler_a.step(opt_a)
        scaler_b.step(opt_b)
        scaler_a.update()
        scaler_b.update()
        _assert_close_state(_state(a, opt_a), _state(b, opt_b), "triton")
    assert opt_a.skipped_steps == 1 and int(opt_b.skipped_steps_tensor) == 1 and opt_b.skipped_steps == 0
    assert scaler_a.get_scale() == scaler_b.get_scale() == 2.0**7


def test_writes_that_a_capture_would_replay_are_refused(monkeypatch):
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, backend="torch", capturable=True)
    _backward(model, opt, 0)
    opt.step(weights=[1.0, 2.0, 1.0])
    before = _state(model, opt)
    monkeypatch.setattr(capture, "_capturing", lambda device: True)  # as inside torch.cuda.graph
    with pytest.raises(RuntimeError, match="got host weights while a CUDA graph is being captured"):
        opt.step(weights=[1.0, 2.0, 1.0])
    with pytest.raises(RuntimeError, match="the device weights hold other values|different from the device"):
        opt.step()  # equal weights, but the device holds [1, 2, 1] / 4
    opt.param_groups[0]["rho"] = 3.0
    with pytest.raises(RuntimeError, match="rho/sigma of param group 0 changed to"):
        opt.step(weights=torch.tensor([1.0, 1.0, 1.0]))
    _assert_equal_state(before, _state(model, opt))
    # Values written before the capture are fine: the capture reads them from the device.
    monkeypatch.setattr(capture, "_capturing", lambda device: False)
    with pytest.raises(ValueError, match="Invalid sigma: 0.0"):
        opt.device_state.load_hyperparameters([{"rho": 3.0, "sigma": 0.0}])
    opt.device_state.load_hyperparameters(opt.param_groups)
    monkeypatch.setattr(capture, "_capturing", lambda device: True)
    opt.step(weights=torch.tensor([1.0, 1.0, 1.0]))
    assert opt.device_state.rho[0].item() == 3.0


def test_capturable_configuration_errors():
    model = _model()
    with pytest.raises(badm_fast.BackendUnavailable, match="capturable=True needs a kernel that reads rho, sigma"):
        badm_fast.BADM(model.parameters(), backend="cpp", capturable=True)
    with pytest.raises(ValueError, match="Invalid capturable: 1"):
        badm_fast.BADM(model.parameters(), capturable=1)
    cpu = nn.Parameter(torch.zeros(3))
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"capturable=True needs every parameter on one device, got \['cpu', 'meta'\]"):
        badm_fast.BADM([cpu, meta], capturable=True)
    assert badm_fast.BADM(model.parameters(), capturable=True).backend == "torch"  # "auto" on CPU
    merged = badm_fast.BADM(_model().parameters(), sub_batches=2, mode="merged", capturable=True)
    with pytest.raises(ValueError, match="mode='merged' checks on the host that the weights stay constant"):
        merged.step(weights=torch.tensor([1.0, 1.0]))


def test_state_dict_and_copies_keep_the_mode():
    model = _model()
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, backend="torch", capturable=True)
    for step in range(2):
        _backward(model, opt, step)
        opt.step(weights=[1.0, 2.0, 3.0])
    sd = opt.state_dict()
    assert sd["badm"]["step"] == 2 and sd["badm"]["alpha"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.capturable and twin.state_dict()["badm"]["step"] == 2
    # A capturable state loads into a host-checked optimizer and continues identically.
    twin_model = copy.deepcopy(model)
    host = badm_fast.BADM(twin_model.parameters(), sub_batches=3, backend="torch")
    host.load_state_dict(sd)
    _backward(model, opt, 5)
    _backward(twin_model, host, 5)
    opt.step()
    host.step()
    _assert_equal_state(_state(model, opt), _state(twin_model, host))
