"""torch.compile of a training step that calls ``opt.step()``, on CPU.

Compiling is slow on two cores (inductor: about 25 s for the tiny model below), so each
configuration is compiled once (a module-scoped cache) and every assert reads its record:

- ``aot_eager`` (AOTAutograd over the eager ATen kernels, no code generation: seconds) with a
  recording backend that keeps the FX graphs Dynamo hands over, for the graph inspection:
  S = 1 (plain loop), S = 2 (``opt.sub_batch`` contexts), and ``capturable=True`` with the
  ``torch`` and ``triton`` (interpreter) back ends;
- ``inductor`` once, S = 1: forward, backward and step compiled, against eager.

What breaks the graph, on purpose (the rest of ``step()`` is traced): ``loss.backward()``
(Dynamo does not trace it); the functions marked ``_ops.not_traced``: ``BADM._plan`` (host
bookkeeping and the hyperparameter tensors, so no hyperparameter is a graph constant),
``BADM._decide`` (the host read of the refusal flag on CPU) and ``BADM._record_step`` (attribute
writes, which Dynamo would drop). With S = 2 the backward
passes run inside ``with opt.sub_batch(s):``; Dynamo cannot resume after a graph break inside a
user context manager, so that training-step frame runs eagerly and ``opt.step()`` is compiled
on its own.
"""

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if "badm_fast.kernels.badm_triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are first defined

import badm_fast  # noqa: E402
from badm_fast import _ops, kernels  # noqa: E402

# (rtol, atol) of the compiled run against the eager one: fp32 weights, duals and losses after
# STEPS steps.
TOLERANCES = {
    # The eager ATen kernels in the eager order (AOTAutograd only re-traces them): bitwise equal
    # with torch 2.13; a few ulps of slack for decompositions that reassociate.
    "aot_eager": (1e-6, 1e-7),
    # Inductor fuses the forward and the backward and reorders float sums (log-softmax, the
    # reductions of the bias gradients): each result differs from eager by a few fp32 ulps
    # (1.2e-7 relative), and three steps of size 1/sigma = 0.25 on O(1) weights keep the drift
    # under ~100 ulps. Measured with torch 2.13: 3e-8 on the weights, 1 ulp on the losses.
    "inductor": (1e-5, 1e-6),
}
STEPS = 3
CHANGE_AT = 2  # capturable runs change rho and the weights before this step


def _training_step(model, opt, S, weights):
    def train_step(x, y):
        opt.zero_grad()
        if S == 1:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            loss = 0.0
            for s, (xs, ys) in enumerate(zip(x.chunk(S), y.chunk(S))):
                with opt.sub_batch(s):
                    part = F.cross_entropy(model(xs), ys)
                    part.backward()
                loss = loss + part.detach() / S
        opt.step(weights=weights[0])
        return loss

    return train_step


def _run(backend, S, opt_backend, capturable):
    """Compiled and eager runs from the same start; returns the record the tests check."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    kw = dict(sub_batches=S, rho=1.0, sigma=4.0, backend=opt_backend, capturable=capturable)
    opt, opt_twin = badm_fast.BADM(model.parameters(), **kw), badm_fast.BADM(twin.parameters(), **kw)
    # Read at call time. Capturable runs pass a tensor (a Python list is a constant of the graph:
    # Dynamo guards on its values and a change recompiles) and change it in place below.
    weights = [(torch.tensor([1.0, 2.0]) if capturable else [1.0, 2.0]) if S == 2 else None]
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(_training_step(model, opt, S, weights), backend=recording_backend)
    eager = _training_step(twin, opt_twin, S, weights)
    rec = {"losses": [], "graphs": graphs, "n_graphs": [], "opt": opt, "twin": opt_twin}
    for step in range(STEPS):
        x = torch.randn(32, 8, generator=gen)
        y = torch.randint(0, 3, (32,), generator=gen)
        if capturable and step == CHANGE_AT:  # device tensors: neither change may recompile
            for o in (opt, opt_twin):
                o.param_groups[0]["rho"] = 2.5
            weights[0].copy_(torch.tensor([3.0, 1.0]))
        rec["losses"].append((compiled(x, y).item(), eager(x, y).item()))
        rec["n_graphs"].append(len(graphs))
    rec["params"] = [(p.detach().clone(), q.detach().clone()) for p, q in zip(model.parameters(), twin.parameters())]
    rec["duals"] = [
        (opt.state[p]["duals"].clone(), opt_twin.state[q]["duals"].clone())
        for p, q in zip(model.parameters(), twin.parameters())
    ]
    return rec


CONFIGS = {
    "aot_eager-S1": ("aot_eager", 1, "auto", False),
    "aot_eager-S2": ("aot_eager", 2, "auto", False),
    "aot_eager-S2-capturable-torch": ("aot_eager", 2, "torch", True),
    "aot_eager-S2-capturable-triton": ("aot_eager", 2, "triton", True),
    "inductor-S1": ("inductor", 1, "auto", False),
}
_RECORDS = {}


def record(name):
    if name.endswith("triton") and not kernels.triton_available():
        pytest.skip(f"{kernels.triton_unavailable_reason()}")
    if name not in _RECORDS:
        _RECORDS[name] = _run(*CONFIGS[name])
    return _RECORDS[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_training_step_matches_eager(name):
    rec = record(name)
    rtol, atol = TOLERANCES[CONFIGS[name][0]]
    losses = torch.tensor(rec["losses"], dtype=torch.float64)
    torch.testing.assert_close(losses[:, 0], losses[:, 1], rtol=rtol, atol=atol)
    for (p, q), (dp, dq) in zip(rec["params"], rec["duals"]):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        torch.testing.assert_close(dp, dq, rtol=rtol, atol=atol)
    assert rec["opt"]._step_count == rec["twin"]._step_count == STEPS
    # The run did train: the weights moved and the duals are non-zero.
    assert all(dp.abs().sum() > 0 for dp, _ in rec["duals"])


@pytest.mark.parametrize(
    "name, ops",
    [
        ("aot_eager-S1", ["badm_fast.fused_step.default", "badm_fast.nonfinite_check.default"]),
        ("inductor-S1", ["badm_fast.fused_step.default", "badm_fast.nonfinite_check.default"]),
        ("aot_eager-S2", ["badm_fast.fused_step.default"]),  # S > 1: checked in the copy at each sub-batch's end
        ("aot_eager-S2-capturable-torch", ["badm_fast.fused_step.default"]),
        ("aot_eager-S2-capturable-triton", ["badm_fast.fused_step.default"]),
    ],
)
def test_fused_step_is_one_custom_op_node_of_the_graph(name, ops):
    rec = record(name)
    flat = [t for g in rec["graphs"] for t in g]
    for op in ops:
        assert op in flat, f"{op} not in the captured graphs {rec['graphs']}"
    # The kernels themselves were not traced into: no extension op, no reference arithmetic
    # of the step next to the custom op.
    with_step = [g for g in rec["graphs"] if any(t.startswith("badm_fast.fused_step") for t in g)]
    assert with_step and all("badm_fast.fused_step_ext.default" not in g for g in rec["graphs"])
    for g in with_step:
        assert sum(t.startswith("badm_fast.fused_step") for t in g) == 1  # one buffer, one run
        assert not any("sub" in t or "truediv" in t for t in g), g


@pytest.mark.parametrize("name", ["aot_eager-S2-capturable-torch", "aot_eager-S2-capturable-triton"])
def test_capturable_hyperparameter_and_weight_changes_do_not_recompile(name):
    rec = record(name)
    # Graphs compiled up to each step: changing rho and the weights before step CHANGE_AT
    # rewrote device tensors outside the graph and compiled nothing new.
    assert rec["n_graphs"][CHANGE_AT] == rec["n_graphs"][CHANGE_AT - 1], rec["n_graphs"]
    # ... and the changes took effect: rho 2.5 (lr/momentum of the group), weights 3:1
    group = rec["opt"].param_groups[0]
    assert (group["lr"], group["momentum"]) == badm_fast.reference.lr_momentum(2.5, 4.0)
    torch.testing.assert_close(
        rec["opt"]._device_alpha, torch.tensor([0.75, 0.25], dtype=torch.float64), rtol=0, atol=0
    )


def test_eager_step_calls_the_kernel_directly(monkeypatch):
    # Outside tracing the optimizer never goes through the dispatcher.
    def refuse(*args):
        raise AssertionError("badm_fast::fused_step called in eager mode")

    monkeypatch.setattr(_ops, "fused_step", refuse)
    monkeypatch.setattr(_ops, "nonfinite_check", refuse)
    monkeypatch.setattr(_ops, "copy_check", refuse)
    for capturable in (False, True):
        p = torch.nn.Parameter(torch.randn(10))
        opt = badm_fast.BADM([p], capturable=capturable, backend="torch")
        p.grad = torch.randn(10)
        before = p.detach().clone()
        opt.step()
        assert not torch.equal(p, before)


def test_custom_ops_have_no_op_fake_implementations():
    # The fake kernels run on meta tensors and leave them alone (the ops mutate in place).
    m = torch.device("meta")
    z, g, d, w = torch.empty(5, device=m), torch.empty(5, device=m), torch.empty(5, device=m), torch.empty(1, device=m)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fz, fg, fd, fw = (mode.from_tensor(t) for t in (z, g, d, w))
        hyper = mode.from_tensor(torch.zeros(4, dtype=torch.float64, device=m))
        flag = mode.from_tensor(torch.zeros(1, device=m))
        assert torch.ops.badm_fast.fused_step([fz], [fg], [fd], fw, hyper, None, flag, None, "torch") is None
        assert torch.ops.badm_fast.nonfinite_check([fg, None], flag, "torch") is None
        assert torch.ops.badm_fast.copy_check([fd], [fg], flag, "torch") is None
