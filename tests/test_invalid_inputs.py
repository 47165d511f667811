"""Every invalid input BADM can receive, in one table: the error it raises, and that it changes nothing.

Each case builds a small model (and, for step-time cases, a BADM optimizer that has taken a
step and holds fresh gradients in every sub-batch row), snapshots all state through the
public interface — parameter values and storage, ``.grad`` tensors, post-accumulate hooks
(BADM registers none), ``opt.state[p]["duals"]``, every gradient row
(``opt.sub_batch_grad(p, s)``), the param groups' hyperparameters, ``skipped_steps``, the
state_dict metadata (step count, weights) and the active sub-batch — performs the invalid
call, checks the exception type and message, and checks that the snapshot is bit-identical.
Then the same training steps run on this context and on an identical twin that never saw the
invalid call: the weights must move, and the two must stay bit-identical (nothing hidden was
left behind either).

Cases whose setup leaves a ``.grad`` the optimizer refuses (a stray backward or assignment
outside ``with opt.sub_batch(s):``) make every gradient-row read refuse too; those that can
undo it exactly (put the original ``.grad`` tensors back) take the first snapshot before the
setup and the second after the undo, so the rows are compared as well.

The file also holds the checks of "loading only through torch.load(weights_only=True)": a
scan of the source tree, and checkpoint round trips through weights-only loading.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import badm_fast
from badm_fast import reference
from badm_fast.optimizer import normalize_weights

ROOT = Path(__file__).resolve().parents[1]
RHO, SIGMA = 2.0, 5.0
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- the context a case runs in


def _data(seed: int, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


class Ctx:
    """A small model and, unless ``opt=False``, a BADM optimizer over it that has taken one
    step (non-zero duals) and holds the gradients of the next batch in every row."""

    def __init__(self, S=2, mode="sub_batch", opt=True, groups=False):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        self.S, self.mode, self.groups = S, mode, groups
        self.stack = contextlib.ExitStack()
        self.sd: dict[str, Any] | None = None
        self.kept: list[torch.Tensor | None] | None = None  # .grad tensors a setup took away
        self.opt: badm_fast.BADM | None = None
        if opt:
            self.opt = self.make_opt()
            self.train(1, seed=0)
            self.backward(seed=1)

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def make_opt(self) -> badm_fast.BADM:
        m = self.model
        params = (
            [{"params": m[0].parameters(), "rho": 1.0, "sigma": 4.0}, {"params": m[2].parameters()}]
            if self.groups
            else m.parameters()
        )
        return badm_fast.BADM(params, sub_batches=self.S, rho=RHO, sigma=SIGMA, mode=self.mode)

    def backward(self, seed: int) -> None:
        x, y = _data(seed)
        self.opt.zero_grad()
        if self.mode == "merged":
            F.cross_entropy(self.model(x), y).backward()
            return
        for s, (xs, ys) in enumerate(badm_fast.split_batch(x, y, self.S)):
            with self.opt.sub_batch(s):
                F.cross_entropy(self.model(*xs), ys).backward()

    def train(self, steps: int, seed: int) -> None:
        for t in range(steps):
            self.backward(seed + t)
            self.opt.step()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of the raw bytes of a tensor (NaN == NaN, -0.0 != 0.0)."""
    t = t.detach().contiguous().reshape(-1).clone()
    return t.view(torch.uint8) if t.numel() else t


def _tensor(t: torch.Tensor | None) -> Any:
    return None if t is None else (_bits(t), t.dtype, tuple(t.shape), t.stride())


def _rows(opt: badm_fast.BADM, p: torch.Tensor) -> list[Any]:
    """Every gradient row of ``p`` as the next step would use it (R rows, R = the duals' rows)."""
    return [_tensor(opt.sub_batch_grad(p, s)) for s in range(opt.state[p]["duals"].shape[0])]


def _snapshot(ctx: Ctx) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for k, p in enumerate(ctx.params):
        hooks = getattr(p, "_post_accumulate_grad_hooks", None)
        snap[f"param {k}"] = (_bits(p), p.dtype, tuple(p.shape), p.data_ptr(), len(hooks or {}))
        g = p.grad
        snap[f"param {k} .grad"] = None if g is None else (_tensor(g), g.data_ptr())
    opt = ctx.opt
    if opt is None:
        return snap
    snap["params with state"] = [k for k, p in enumerate(ctx.params) if p in opt.state]
    for k, p in enumerate(ctx.params):
        if p in opt.state:
            snap[f"duals {k}"] = _tensor(opt.state[p]["duals"])
    try:
        snap["gradient rows"] = {k: _rows(opt, p) for k, p in enumerate(ctx.params) if p in opt.state}
    except RuntimeError as exc:  # a .grad changed outside any sub-batch: the rows are refused until it is undone
        snap["gradient rows"] = f"sub_batch_grad() raised {exc}"
    snap["param_groups"] = [
        (repr({key: v for key, v in g.items() if key != "params"}), [id(p) for p in g["params"]])
        for g in opt.param_groups
    ]
    snap["skipped_steps"] = (opt.skipped_steps, int(opt.skipped_steps_tensor))
    try:
        snap["metadata"] = repr(opt.state_dict()["badm"])  # version, sub-batches, mode, step count, weights
    except (RuntimeError, ValueError) as exc:
        snap["metadata"] = f"state_dict() raised {exc}"
    snap["active sub-batch"] = opt._active_row  # no public accessor; entering sub_batch() would change it
    return snap


def _assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        same = _deep_equal(a, b)
        assert same, f"{key} changed"


def _deep_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    return a == b


def _resume(ctx: Ctx) -> None:
    """Ordinary training after the refused call: the weights move."""
    if ctx.opt is None:
        ctx.opt = ctx.make_opt()
    before = [p.detach().clone() for p in ctx.params]
    ctx.train(2, seed=10)
    assert any(not torch.equal(p, b) for p, b in zip(ctx.params, before)), "a normal step did not change the weights"


# ---------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    call: Callable[[Ctx], Any]  # performs the invalid call
    exc: type[BaseException]
    match: str
    ctx: dict[str, Any] = field(default_factory=dict)  # Ctx(**ctx)
    setup: Callable[[Ctx], Any] | None = None  # run (on the twin too) before the snapshot
    recover: Callable[[Ctx], Any] | None = None  # undo the setup (on the twin too) before resuming
    bug: str | None = None  # xfail(strict=True) reason while a suspected bug is open
    # Undo the setup exactly after the call (on the twin too); the first snapshot is then taken
    # before the setup, for setups that make the state unreadable (a refused .grad).
    undo: Callable[[Ctx], Any] | None = None


INIT = {"opt": False}  # construction cases: a model no optimizer manages yet
MERGED = {"mode": "merged"}
GROUPS = {"groups": True}


def _new(**kw):
    return lambda c: badm_fast.BADM(c.model.parameters(), **kw)


def _groups(second: dict[str, Any]):
    """Two groups; the second one is invalid (the first one is valid and comes first)."""

    def call(c):
        return badm_fast.BADM(
            [{"params": list(c.model[0].parameters())}, {"params": list(c.model[2].parameters()), **second}],
            sub_batches=2,
        )

    return call


def _add_group(**hp):
    return lambda c: c.opt.add_param_group({"params": [nn.Parameter(torch.ones(3, dtype=torch.float64))], **hp})


def _step(**kw):
    return lambda c: c.opt.step(**kw)


def _set_group(index=0, **hp):
    return lambda c: c.opt.param_groups[index].update(hp)


def _restore_groups(c: Ctx) -> None:
    """The groups' hyperparameters as make_opt gave them (a rho/sigma write removed)."""
    for g, (rho, sigma) in zip(c.opt.param_groups, [(1.0, 4.0), (RHO, SIGMA)] if c.groups else [(RHO, SIGMA)]):
        g.pop("rho", None)
        g.pop("sigma", None)
        lr, momentum = reference.lr_momentum(rho, sigma)
        g.update(lr=lr, momentum=momentum, weight_decay=0.0, maximize=False)


def _stray_backward(c: Ctx) -> None:
    """A backward pass outside any sub-batch (accumulates into the last sub-batch's .grad)."""
    x, y = _data(5)
    F.cross_entropy(c.model(x), y).backward()


def _take_grads(c: Ctx) -> None:
    c.kept = [p.grad for p in c.params]


def _put_grads_back(c: Ctx) -> None:
    for p, g in zip(c.params, c.kept):
        p.grad = g


def _assign_grad(c: Ctx) -> None:
    _take_grads(c)
    c.model[0].weight.grad = torch.ones_like(c.model[0].weight)


def _model_zero_grad_then_stray_backward(c: Ctx) -> None:
    _take_grads(c)
    c.model.zero_grad()
    _stray_backward(c)


def _clip_outside(c: Ctx) -> None:
    torch.nn.utils.clip_grad_norm_(c.model.parameters(), 1e-3)  # in place, after the last sub-batch


def _poison_grad(row: int, value: float):
    def setup(c):
        c.opt.sub_batch_grad(c.model[2].bias, row)[1] = value  # parameter 3: model[2].bias, shape (3,)

    return setup


def _enter_sub_batch(s: int):
    return lambda c: c.stack.enter_context(c.opt.sub_batch(s))


def _load(c: Ctx):
    return c.opt.load_state_dict(c.sd)


def _sd(mutate: Callable[[dict[str, Any]], Any], version: int = 3):
    """Setup: the optimizer's own state_dict, made conspicuous (duals 42, lr 0.07, momentum 0.7;
    rho 7 for a version-2 state, whose groups carry rho/sigma only) then broken."""

    def setup(c):
        sd = c.opt.state_dict()
        for entry in sd["state"].values():
            entry["duals"] = torch.full_like(entry["duals"], 42.0)
        for g in sd["param_groups"]:
            g.update(lr=0.07, momentum=0.7)
            g["rho"], g["sigma"] = reference.rho_sigma(0.07, 0.7)
        if version < 3:
            sd["badm"]["version"] = version
            for g in sd["param_groups"]:
                for key in ("lr", "momentum", "weight_decay", "maximize"):
                    del g[key]
                g["rho"] = 7.0
        mutate(sd)
        c.sd = sd

    return setup


def _set_sd(value):
    def setup(c):
        c.sd = value

    return setup


def _closure(c: Ctx):
    def closure():
        c.backward(seed=77)
        return 0.0

    return closure


def _w(*values):
    return list(values)


# Suspected defects (see the reply of the test port; each has a minimal reproduction there).

BAD_SIGMAS = [0.0, -1.0, NAN, INF, -INF, "1", [1.0], True, torch.tensor([1.0, 2.0])]
BAD_RHOS = [-0.1, NAN, INF, "0", True]
BAD_LRS = [-0.1, NAN, INF, -INF, "0.1", [0.1], True, 0.1j, torch.tensor([0.1, 0.2]), torch.tensor(0.1 + 0j)]
BAD_MOMENTA = [1.0, 1.5, -0.1, NAN, INF, "0.9", torch.tensor(1.0)]
BAD_WEIGHT_DECAYS = [-1e-4, NAN, INF, "0", None, torch.tensor([0.0, 0.0])]
BAD_MAXIMIZE = [1, 0, "True", None, torch.tensor(True)]


def _vid(v: Any) -> str:
    return f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)


CASES = [
    # ------------------------------------------------ construction: hyperparameters and options
    *[Case(f"init-sigma={_vid(v)}", _new(sigma=v), ValueError, "Invalid sigma", INIT) for v in BAD_SIGMAS],
    *[Case(f"init-rho={_vid(v)}", _new(rho=v), ValueError, "Invalid rho", INIT) for v in BAD_RHOS],
    *[Case(f"init-lr={_vid(v)}", _new(lr=v), ValueError, "Invalid lr", INIT) for v in BAD_LRS],
    *[Case(f"init-momentum={_vid(v)}", _new(momentum=v), ValueError, "Invalid momentum", INIT) for v in BAD_MOMENTA],
    *[
        Case(f"init-weight_decay={_vid(v)}", _new(weight_decay=v), ValueError, "Invalid weight_decay", INIT)
        for v in BAD_WEIGHT_DECAYS
    ],
    *[Case(f"init-maximize={_vid(v)}", _new(maximize=v), ValueError, "Invalid maximize", INIT) for v in BAD_MAXIMIZE],
    Case("init-rho-and-lr", _new(rho=1.0, lr=0.1), ValueError, "either lr/momentum or rho/sigma", INIT),
    Case("init-sigma-and-momentum", _new(sigma=1.0, momentum=0.5), ValueError, "either lr/momentum or rho/sigma",
         INIT),
    Case("init-rho-sigma-and-lr-momentum", _new(rho=1.0, sigma=2.0, lr=0.1, momentum=0.5), ValueError,
         "either lr/momentum or rho/sigma", INIT),
    Case("init-rho-sigma-overflow", _new(rho=1e308, sigma=1e308), ValueError, "Invalid rho/sigma", INIT),
    Case("init-rho-dwarfs-sigma", _new(rho=1e20, sigma=1.0), ValueError, "Invalid rho/sigma", INIT),
    *[
        Case(f"init-sub_batches={v!r}", _new(sub_batches=v), ValueError, "Invalid sub_batches", INIT)
        for v in (0, -2, 2.0, True, "2", None)
    ],
    Case("init-mode", _new(mode="fast"), ValueError, "Invalid mode: 'fast'", INIT),
    Case("init-mode-None", _new(mode=None), ValueError, "Invalid mode", INIT),
    Case("init-backend", _new(backend="tpu"), ValueError, "Invalid backend: 'tpu'", INIT),
    Case("init-on_nonfinite", _new(on_nonfinite="warn"), ValueError, "Invalid on_nonfinite: 'warn'", INIT),
    Case("init-capturable", _new(capturable=1), ValueError, "Invalid capturable", INIT),
    Case("init-overlap", _new(overlap="yes"), ValueError, "Invalid overlap", INIT),
    Case("init-overlap-without-process_group", _new(overlap=True), ValueError, "give process_group", INIT),
    *[
        Case(f"init-bucket_cap_mb={_vid(v)}", _new(bucket_cap_mb=v), ValueError, "Invalid bucket_cap_mb", INIT)
        for v in (0.0, -1.0, NAN, INF, "25", None, True)
    ],
    Case("init-backend-cuda-on-cpu", _new(backend="cuda"), badm_fast.BackendUnavailable,
         "'cuda' is unavailable on cpu", INIT),
    # ------------------------------------------------ construction: parameters
    Case("init-empty", lambda c: badm_fast.BADM([]), ValueError, "empty parameter list", INIT),
    Case("init-single-tensor", lambda c: badm_fast.BADM(c.model[0].weight), TypeError,
         "iterable of Tensors or dicts", INIT),
    Case("init-non-tensor", lambda c: badm_fast.BADM([c.model[0].weight, 1.0]), TypeError,
         "can only optimize Tensors", INIT),
    Case("init-non-tensor-in-dict", lambda c: badm_fast.BADM([{"params": [c.model[0].weight, "w"]}]), TypeError,
         "can only optimize Tensors", INIT),
    Case("init-non-leaf", lambda c: badm_fast.BADM([c.model[0].weight, c.model[2].weight * 2]), ValueError,
         "non-leaf", INIT),
    Case("init-dtype-float8_e4m3fn",
         lambda c: badm_fast.BADM([c.model[0].weight, torch.zeros(3, dtype=torch.float8_e4m3fn, requires_grad=True)]),
         ValueError, "BADM supports", INIT),
    Case("init-dtype-int32",
         lambda c: badm_fast.BADM([c.model[0].weight, torch.zeros(3, dtype=torch.int32)]),
         ValueError, "BADM supports", INIT),
    Case("init-non-dense-parameter",
         lambda c: badm_fast.BADM([c.model[0].weight, torch.zeros(4, 6, dtype=torch.float64)[:, ::2].requires_grad_()]),
         ValueError, "dense in memory", INIT),
    Case("init-duplicate-across-groups",
         lambda c: badm_fast.BADM([{"params": [c.model[0].weight]}, {"params": [c.model[0].weight]}]),
         ValueError, "more than one parameter group", INIT),
    # A valid first group followed by an invalid second one: the first group must be left as it
    # was (no state, no hooks, no change of its tensors).
    Case("init-second-group-sigma", _groups({"sigma": -1.0}), ValueError, "Invalid sigma", INIT),
    Case("init-second-group-rho", _groups({"rho": NAN}), ValueError, "Invalid rho", INIT),
    Case("init-second-group-lr", _groups({"lr": -1.0}), ValueError, "Invalid lr", INIT),
    Case("init-second-group-momentum", _groups({"momentum": 1.0}), ValueError, "Invalid momentum", INIT),
    Case("init-second-group-weight_decay", _groups({"weight_decay": NAN}), ValueError, "Invalid weight_decay", INIT),
    Case("init-second-group-maximize", _groups({"maximize": 2}), ValueError, "Invalid maximize", INIT),
    Case("init-second-group-rho-and-lr", _groups({"rho": 1.0, "lr": 0.1}), ValueError,
         "either lr/momentum or rho/sigma", INIT),
    Case("init-second-group-duplicate",
         lambda c: badm_fast.BADM([{"params": c.model.parameters()}, {"params": [c.model[0].weight]}], sub_batches=2),
         ValueError, "more than one parameter group", INIT),
    Case("init-second-group-dtype",
         _groups({"params": [torch.zeros(2, dtype=torch.float8_e4m3fn, requires_grad=True)]}),
         ValueError, "BADM supports", INIT),
    # ------------------------------------------------ add_param_group on a live optimizer
    Case("add-group-sigma", _add_group(sigma=0.0), ValueError, "Invalid sigma"),
    Case("add-group-rho", _add_group(rho=-1.0), ValueError, "Invalid rho"),
    Case("add-group-lr", _add_group(lr=INF), ValueError, "Invalid lr"),
    Case("add-group-lr-string", _add_group(lr="0.1"), ValueError, "Invalid lr"),
    Case("add-group-momentum", _add_group(momentum=-0.5), ValueError, "Invalid momentum"),
    Case("add-group-weight_decay", _add_group(weight_decay=-1.0), ValueError, "Invalid weight_decay"),
    Case("add-group-maximize", _add_group(maximize="yes"), ValueError, "Invalid maximize"),
    Case("add-group-rho-and-lr", _add_group(rho=1.0, lr=0.1), ValueError, "either lr/momentum or rho/sigma"),
    Case("add-group-duplicate", lambda c: c.opt.add_param_group({"params": [c.model[2].bias]}),
         ValueError, "more than one parameter group"),
    Case("add-group-non-tensor", lambda c: c.opt.add_param_group({"params": [nn.Parameter(torch.ones(3)), 3]}),
         TypeError, "can only optimize Tensors"),
    Case("add-group-dtype",
         lambda c: c.opt.add_param_group({"params": [torch.zeros(3, dtype=torch.float8_e4m3fn, requires_grad=True)]}),
         ValueError, "BADM supports"),
    Case("add-group-cuda-backend-unavailable",
         lambda c: c.opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]}),
         badm_fast.BackendUnavailable, "'cuda' is unavailable on cpu", INIT,
         setup=lambda c: setattr(c, "opt", badm_fast.BADM([nn.Parameter(torch.ones(2), requires_grad=False)],
                                                          backend="cuda")),
         recover=lambda c: setattr(c, "opt", None)),
    # ------------------------------------------------ step(weights=...)
    Case("weights-too-few", _step(weights=_w(1.0)), ValueError, "expected 2 weights"),
    Case("weights-too-many", _step(weights=_w(1.0, 1.0, 1.0)), ValueError, "expected 2 weights"),
    Case("weights-empty", _step(weights=[]), ValueError, "expected 2 weights"),
    Case("weights-negative", _step(weights=_w(1.0, -0.5)), ValueError, "must be >= 0"),
    Case("weights-all-zero", _step(weights=_w(0.0, 0.0)), ValueError, "must not all be zero"),
    Case("weights-nan", _step(weights=_w(NAN, 1.0)), ValueError, "must be finite"),
    Case("weights-inf", _step(weights=_w(1.0, INF)), ValueError, "must be finite"),
    Case("weights-tensor-nan", _step(weights=torch.tensor([1.0, NAN])), ValueError, "must be finite"),
    Case("weights-tensor-negative", _step(weights=torch.tensor([1.0, -1.0])), ValueError, "must be >= 0"),
    Case("weights-non-numeric", _step(weights=["a", "b"]), ValueError, "sequence of 2 numbers"),
    Case("weights-None-inside", _step(weights=[None, 1.0]), ValueError, "sequence of 2 numbers"),
    Case("weights-number", _step(weights=3.0), ValueError, "sequence of 2 numbers"),
    Case("weights-2d-tensor", _step(weights=torch.ones(2, 1)), ValueError, "must be 1-D"),
    Case("weights-0d-tensor", _step(weights=torch.tensor(1.0)), ValueError, "must be 1-D"),
    Case("weights-string", _step(weights="12"), ValueError, "weights"),
    Case("weights-dict", _step(weights={0: 3.0, 1: 1.0}), ValueError, "weights"),
    Case("weights-complex-tensor", _step(weights=torch.tensor([1 + 1j, 1 + 0j])), ValueError, "weights"),
    Case("weights-with-closure", lambda c: c.opt.step(_closure(c), weights=_w(1.0, 2.0, 3.0)), ValueError,
         "expected 2 weights"),
    # ------------------------------------------------ hyperparameters set by the user in param_groups
    # (written between steps; the next step refuses them before anything changes)
    *[
        Case(f"group-sigma={v!r}", _step(), ValueError, "Invalid sigma", setup=_set_group(sigma=v),
             recover=_restore_groups)
        for v in (0.0, -2.0, NAN, INF, "5", None)
    ],
    *[
        Case(f"group-rho={v!r}", _step(), ValueError, "Invalid rho", setup=_set_group(rho=v), recover=_restore_groups)
        for v in (-1.0, NAN, INF, None)
    ],
    Case("group-second-sigma", _step(), ValueError, "Invalid sigma", GROUPS,
         setup=_set_group(1, sigma=-3.0), recover=_restore_groups),
    *[
        Case(f"group-lr={_vid(v)}", _step(), ValueError, "Invalid lr", setup=_set_group(lr=v), recover=_restore_groups)
        for v in (-1.0, NAN, INF, "0.1", True, None, torch.tensor(-1.0), torch.tensor([0.1, 0.2]))
    ],
    *[
        Case(f"group-momentum={_vid(v)}", _step(), ValueError, "Invalid momentum", setup=_set_group(momentum=v),
             recover=_restore_groups)
        for v in (1.0, -0.1, NAN, torch.tensor(1.0))
    ],
    *[
        Case(f"group-weight_decay={v!r}", _step(), ValueError, "Invalid weight_decay",
             setup=_set_group(weight_decay=v), recover=_restore_groups)
        for v in (-1.0, NAN, None)
    ],
    *[
        Case(f"group-maximize={v!r}", _step(), ValueError, "Invalid maximize", setup=_set_group(maximize=v),
             recover=_restore_groups)
        for v in (2, "yes", None)
    ],
    Case("group-second-lr", _step(), ValueError, "Invalid lr", GROUPS, setup=_set_group(1, lr=NAN),
         recover=_restore_groups),
    # ------------------------------------------------ sub_batch(s)
    *[
        Case(f"sub_batch({v!r})", lambda c, v=v: c.stack.enter_context(c.opt.sub_batch(v)), ValueError,
             "out of range", recover=lambda c: c.stack.close())
        for v in (2, -1, 1.0, True, "0", None)
    ],
    *[
        Case(f"sub_batch(0, weight={_vid(v)})", lambda c, v=v: c.stack.enter_context(c.opt.sub_batch(0, weight=v)),
             ValueError, "Invalid weight", recover=lambda c: c.stack.close())
        for v in (-1.0, NAN, INF, "1", True, [1.0], torch.ones(2))
    ],
    Case("sub_batch-nested", lambda c: c.stack.enter_context(c.opt.sub_batch(0)), RuntimeError, "do not nest",
         setup=_enter_sub_batch(1), recover=lambda c: c.stack.close()),
    # ------------------------------------------------ gradients outside `with opt.sub_batch(s):` (S > 1)
    # No hook runs during backward: what reaches .grad outside a sub-batch is refused by the next
    # step(), sub_batch(), set_grads() or clip_grad_norm_(), with weights, duals and rows unchanged.
    *[
        Case(f"backward-outside-sub_batch-then-{name}", call, RuntimeError,
             r"modified in place outside `with opt.sub_batch\(s\):`", setup=_stray_backward,
             recover=lambda c: c.opt.zero_grad())
        for name, call in [
            ("step", _step()),
            ("sub_batch", _enter_sub_batch(0)),
            ("set_grads", lambda c: c.opt.set_grads(0, c.params[3:], [torch.zeros(3, dtype=torch.float64)])),
            ("clip_grad_norm_", lambda c: c.opt.clip_grad_norm_(1.0)),
        ]
    ],
    Case("backward-outside-after-model.zero_grad", _step(), RuntimeError,
         r"was assigned outside `with opt.sub_batch\(s\):`", setup=_model_zero_grad_then_stray_backward,
         undo=_put_grads_back),
    Case("backward-outside-after-zero_grad(set_to_none=False)", _step(), RuntimeError,
         r"modified in place outside `with opt.sub_batch\(s\):`",
         setup=lambda c: (c.opt.zero_grad(set_to_none=False), _stray_backward(c)),
         recover=lambda c: c.opt.zero_grad()),
    Case("clip_grad_norm-outside-sub_batch", _step(), RuntimeError,
         r"parameter 0 \(shape \(8, 5\)\) was modified in place outside", setup=_clip_outside,
         recover=lambda c: c.opt.zero_grad()),
    Case("grad-assigned-directly", _step(), RuntimeError,
         r"parameter 0 \(shape \(8, 5\)\) was assigned outside `with opt.sub_batch\(s\):`",
         setup=_assign_grad, undo=_put_grads_back),
    Case("grad-assigned-directly-then-sub_batch", _enter_sub_batch(1), RuntimeError,
         r"was assigned outside `with opt.sub_batch\(s\):`", setup=_assign_grad, undo=_put_grads_back,
         recover=lambda c: c.stack.close()),
    # ------------------------------------------------ set_grads
    Case("set_grads-shape", lambda c: c.opt.set_grads(0, [c.model[0].weight], [torch.ones(5, 8, dtype=torch.float64)]),
         ValueError, r"gradient of shape \(5, 8\) for a parameter of shape \(8, 5\)"),
    Case("set_grads-unknown-param", lambda c: c.opt.set_grads(0, [nn.Parameter(torch.ones(3))], [torch.ones(3)]),
         ValueError, "not managed by this optimizer"),
    Case("set_grads-lengths", lambda c: c.opt.set_grads(0, c.params[:2], [torch.zeros(8, 5, dtype=torch.float64)]),
         ValueError, "got 2 parameters but 1 gradients"),
    Case("set_grads-index", lambda c: c.opt.set_grads(2, c.params[3:], [torch.zeros(3, dtype=torch.float64)]),
         ValueError, "out of range"),
    Case("set_grads-index-bool", lambda c: c.opt.set_grads(True, c.params[3:], [torch.zeros(3, dtype=torch.float64)]),
         ValueError, "out of range"),
    Case("set_grads-not-a-tensor", lambda c: c.opt.set_grads(0, c.params[3:], [[0.0, 0.0, 0.0]]),
         ValueError, "gradient must be a tensor"),
    Case("set_grads-sparse",
         lambda c: c.opt.set_grads(0, c.params[1:2], [torch.ones(8, dtype=torch.float64).to_sparse()]),
         RuntimeError, "sparse gradients"),
    Case("set_grads-second-shape-wrong",
         lambda c: c.opt.set_grads(0, c.params[:2], [torch.ones(8, 5, dtype=torch.float64),
                                                     torch.ones(3, dtype=torch.float64)]),
         ValueError, r"gradient of shape \(3,\)"),
    Case("set_grads-second-sparse",
         lambda c: c.opt.set_grads(0, c.params[:2],
                                   [torch.ones(8, 5, dtype=torch.float64),
                                    torch.ones(8, dtype=torch.float64).to_sparse()]),
         RuntimeError, "sparse gradients"),
    # ------------------------------------------------ sub_batch_grad
    Case("sub_batch_grad-index", lambda c: c.opt.sub_batch_grad(c.model[0].weight, 2), ValueError, "out of range"),
    Case("sub_batch_grad-unknown-param", lambda c: c.opt.sub_batch_grad(nn.Parameter(torch.ones(3)), 0), ValueError,
         "no gradient rows"),
    # ------------------------------------------------ merged mode
    Case("merged-sub_batch", lambda c: c.stack.enter_context(c.opt.sub_batch(0)), ValueError,
         "one backward pass over the whole batch", MERGED),
    Case("merged-changing-weights", _step(weights=_w(3.0, 1.0)), ValueError, "same sub-batch weights", MERGED),
    Case("merged-set_grads-row-1", lambda c: c.opt.set_grads(1, c.params[3:], [torch.zeros(3, dtype=torch.float64)]),
         ValueError, "out of range", MERGED),
    Case("merged-vmap_step", lambda c: badm_fast.vmap_step(c.model, c.opt, F.cross_entropy, *_data(3)), ValueError,
         "per-sub-batch gradients", MERGED),
    # ------------------------------------------------ helpers
    Case("vmap_step-batch-not-divisible",
         lambda c: badm_fast.vmap_step(c.model, c.opt, F.cross_entropy, _data(3, n=7)[0], _data(3, n=7)[1]),
         ValueError, "multiple of sub_batches=2"),
    Case("vmap_step-empty-batch",
         lambda c: badm_fast.vmap_step(c.model, c.opt, F.cross_entropy, _data(3)[0][:0], _data(3)[1][:0]),
         ValueError, "multiple of sub_batches=2"),
    Case("split_step-empty-batch",
         lambda c: badm_fast.split_step(c.model, c.opt, F.cross_entropy, _data(3)[0][:0], _data(3)[1][:0]),
         ValueError, "empty batch"),
    Case("split_step-sizes-differ",
         lambda c: badm_fast.split_step(c.model, c.opt, F.cross_entropy, _data(3)[0][:5], _data(3)[1]),
         ValueError, "inputs have 5 samples but targets 8"),
    # ------------------------------------------------ non-finite gradients, moved parameters
    *[
        Case(f"nonfinite-grad-{v}", _step(), RuntimeError,
             r"non-finite gradient in parameter 3 of param group 0 \(shape \(3,\)\), sub-batch 1",
             setup=_poison_grad(1, v), recover=lambda c: c.opt.zero_grad())
        for v in (NAN, INF, -INF)
    ],
    Case("nonfinite-grad-merged", _step(), RuntimeError, r"parameter 3 of param group 0 \(shape \(3,\)\), sub-batch 0",
         MERGED, setup=_poison_grad(0, NAN), recover=lambda c: c.opt.zero_grad()),
    Case("nonfinite-grad-one-sub-batch", _step(), RuntimeError,
         r"parameter 3 of param group 0 \(shape \(3,\)\), sub-batch 0", {"S": 1}, setup=_poison_grad(0, INF),
         recover=lambda c: c.opt.zero_grad()),
    Case("nonfinite-grad-second-group", _step(), RuntimeError,
         r"parameter 1 of param group 1 \(shape \(3,\)\), sub-batch 0", GROUPS, setup=_poison_grad(0, NAN),
         recover=lambda c: c.opt.zero_grad()),
    Case("nonfinite-set_grads", _step(), RuntimeError, r"parameter 3 of param group 0 \(shape \(3,\)\), sub-batch 1",
         setup=lambda c: c.opt.set_grads(1, [c.model[2].bias], [torch.tensor([0.0, NAN, 1.0], dtype=torch.float64)]),
         recover=lambda c: c.opt.zero_grad()),
    Case("nonfinite-grad-in-sub_batch", _step(), RuntimeError,
         r"parameter 0 of param group 0 \(shape \(8, 5\)\), sub-batch 0",
         setup=lambda c: (c.opt.zero_grad(), c.backward(seed=3), _enter_sub_batch(0)(c),
                          F.cross_entropy(c.model(_data(4)[0] * INF), _data(4)[1]).backward(), c.stack.close()),
         recover=lambda c: c.opt.zero_grad()),
    Case("params-cast-after-the-first-step", _step(), RuntimeError,
         r"parameter 0 of param group 0 changed to shape \(8, 5\), torch.float32, cpu after the first step",
         setup=lambda c: c.model.float(), recover=lambda c: c.model.double()),
    Case("param-replaced-by-other-shape", _step(), RuntimeError,
         r"parameter 3 of param group 0 changed to shape \(3, 3\)",
         setup=lambda c: setattr(c.model[2].bias, "data", torch.zeros(3, 3, dtype=torch.float64)),
         recover=lambda c: setattr(c.model[2].bias, "data", torch.zeros(3, dtype=torch.float64))),
    # ------------------------------------------------ load_state_dict
    Case("load-list", _load, ValueError, "not an optimizer state_dict", setup=_set_sd([1, 2])),
    Case("load-None", _load, ValueError, "not an optimizer state_dict", setup=_set_sd(None)),
    Case("load-no-state", _load, ValueError, "not an optimizer state_dict", setup=_sd(lambda sd: sd.pop("state"))),
    Case("load-no-param_groups", _load, ValueError, "not an optimizer state_dict",
         setup=_sd(lambda sd: sd.pop("param_groups"))),
    Case("load-no-badm", _load, ValueError, "not a BADM state_dict",
         setup=_sd(lambda sd: [g.pop("badm") for g in [sd, *sd["param_groups"]]])),
    Case("load-groups-badm-differ", _load, ValueError, "param groups of the state carry different 'badm' metadata",
         GROUPS,
         setup=_sd(lambda sd: (sd.pop("badm"), sd["param_groups"][-1].update(
             badm=sd["param_groups"][-1]["badm"].replace('"step": ', '"step": 99'))))),
    Case("load-groups-badm-not-json", _load, ValueError, "'badm' metadata of the state's param groups is not JSON",
         setup=_sd(lambda sd: (sd.pop("badm"), [g.update(badm="{oops") for g in sd["param_groups"]]))),
    Case("load-badm-not-dict", _load, ValueError, "not a BADM state_dict", setup=_sd(lambda sd: sd.update(badm=3))),
    Case("load-torch-optim-state", _load, ValueError, "not a BADM state_dict",
         setup=lambda c: setattr(c, "sd", torch.optim.SGD(c.model.parameters(), lr=0.1).state_dict())),
    Case("load-newer-version", _load, ValueError, "unsupported BADM state version",
         setup=_sd(lambda sd: sd["badm"].update(version=badm_fast.STATE_VERSION + 1))),
    Case("load-version-0", _load, ValueError, "unsupported BADM state version 0",
         setup=_sd(lambda sd: sd["badm"].update(version=0))),
    Case("load-version-str", _load, ValueError, "unsupported BADM state version '1'",
         setup=_sd(lambda sd: sd["badm"].update(version="1"))),
    Case("load-other-sub_batches", _load, ValueError, "saved with sub_batches=3",
         setup=_sd(lambda sd: sd["badm"].update(sub_batches=3))),
    Case("load-invalid-sub_batches", _load, ValueError, "invalid sub_batches=0",
         setup=_sd(lambda sd: sd["badm"].update(sub_batches=0))),
    Case("load-invalid-mode", _load, ValueError, "mode='fast'", setup=_sd(lambda sd: sd["badm"].update(mode="fast"))),
    Case("load-other-mode-and-sub_batches", _load, ValueError, "saved with sub_batches=3, mode='sub_batch'", MERGED,
         setup=_sd(lambda sd: sd["badm"].update(mode="sub_batch", sub_batches=3))),
    Case("load-v1-per-sub-batch-into-merged", _load, ValueError, "does not record the weights", MERGED,
         setup=_sd(lambda sd: (sd["badm"].update(mode="sub_batch"), sd["badm"].pop("alpha", None),
                               [e.update(duals=e["duals"].expand(2, *e["duals"].shape[1:]).clone())
                                for e in sd["state"].values()]), version=1)),
    Case("load-other-group-count", _load, ValueError, "state has 2 parameter groups, this optimizer 1",
         setup=_sd(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])))),
    Case("load-other-param-count", _load, ValueError, "parameter group 0 has 4 parameters, the state 3",
         setup=_sd(lambda sd: sd["param_groups"][0]["params"].pop())),
    Case("load-wrong-dual-shape", _load, ValueError,
         r"duals of parameter 0 have shape \(2, 5, 8\), expected \(2, 8, 5\)",
         setup=_sd(lambda sd: sd["state"][0].update(duals=torch.zeros(2, 5, 8, dtype=torch.float64)))),
    Case("load-wrong-dual-rows", _load, ValueError, r"expected \(2, 3\)",
         setup=_sd(lambda sd: sd["state"][3].update(duals=torch.zeros(3, 3, dtype=torch.float64)))),
    Case("load-dual-not-tensor", _load, ValueError, "have shape list",
         setup=_sd(lambda sd: sd["state"][2].update(duals=[[0.0] * 8] * 3))),
    Case("load-missing-dual", _load, ValueError, "no duals for parameter 1", setup=_sd(lambda sd: sd["state"].pop(1))),
    Case("load-entry-without-duals", _load, ValueError, "no duals for parameter 3",
         setup=_sd(lambda sd: sd["state"].update({3: {}}))),
    Case("load-integer-dual", _load, ValueError, "expected a floating dtype",
         setup=_sd(lambda sd: sd["state"][1].update(duals=torch.zeros(2, 8, dtype=torch.int64)))),
    Case("load-complex-dual", _load, ValueError, "expected a floating dtype",
         setup=_sd(lambda sd: sd["state"][1].update(duals=torch.zeros(2, 8, dtype=torch.complex64)))),
    Case("load-nonfinite-dual", _load, ValueError, "duals of parameter 2 are not finite",
         setup=_sd(lambda sd: sd["state"][2]["duals"].view(-1).__setitem__(5, NAN))),
    # version 3: the groups' lr/momentum/weight_decay/maximize are loaded (rho/sigma beside them are ignored)
    *[
        Case(f"load-saved-lr={v!r}", _load, ValueError, "param group 0 of the state: Invalid lr",
             setup=_sd(lambda sd, v=v: sd["param_groups"][0].update(lr=v)))
        for v in (-1.0, NAN, INF, "0.1", None)
    ],
    *[
        Case(f"load-saved-momentum={v!r}", _load, ValueError, "Invalid momentum",
             setup=_sd(lambda sd, v=v: sd["param_groups"][0].update(momentum=v)))
        for v in (1.0, -0.5, NAN)
    ],
    Case("load-saved-weight_decay", _load, ValueError, "Invalid weight_decay",
         setup=_sd(lambda sd: sd["param_groups"][0].update(weight_decay=-1.0))),
    *[
        Case(f"load-saved-maximize={v!r}", _load, ValueError, "Invalid maximize",
             setup=_sd(lambda sd, v=v: sd["param_groups"][0].update(maximize=v)))
        for v in (2, "yes")
    ],
    Case("load-saved-lr-second-group", _load, ValueError, "param group 1 of the state: Invalid lr", GROUPS,
         setup=_sd(lambda sd: sd["param_groups"][1].update(lr=-INF))),
    # versions 1 and 2: the groups carry rho/sigma
    *[
        Case(f"load-v2-saved-sigma={v!r}", _load, ValueError, "Invalid sigma",
             setup=_sd(lambda sd, v=v: sd["param_groups"][0].update(sigma=v), version=2))
        for v in (0.0, -1.0, NAN, "5")
    ],
    Case("load-v2-saved-rho", _load, ValueError, "Invalid rho",
         setup=_sd(lambda sd: sd["param_groups"][0].update(rho=-1), version=2)),
    Case("load-v1-saved-rho-missing", _load, ValueError, "Invalid rho",
         setup=_sd(lambda sd: sd["param_groups"][0].pop("rho"), version=1)),
    Case("load-v2-saved-sigma-second-group", _load, ValueError, "Invalid sigma", GROUPS,
         setup=_sd(lambda sd: sd["param_groups"][1].update(sigma=INF), version=2)),
    # Structurally corrupt checkpoints: a ValueError, raised before anything is copied.
    Case("load-state-not-dict", _load, ValueError, "state", setup=_sd(lambda sd: sd.update(state=[]))),
    Case("load-entry-not-dict", _load, ValueError, "parameter 0", setup=_sd(lambda sd: sd["state"].update({0: 5}))),
    Case("load-param_groups-not-list", _load, ValueError, "param_groups",
         setup=_sd(lambda sd: sd.update(param_groups=5))),
    Case("load-group-without-params", _load, ValueError, "params",
         setup=_sd(lambda sd: sd["param_groups"][0].pop("params"))),
    Case("load-step-not-int", _load, ValueError, "step", setup=_sd(lambda sd: sd["badm"].update(step="abc"))),
    Case("load-step-negative", _load, ValueError, "step", setup=_sd(lambda sd: sd["badm"].update(step=-1))),
    Case("load-merged_alpha-not-list", _load, ValueError, "merged_alpha", MERGED,
         setup=_sd(lambda sd: sd["badm"].update(merged_alpha=5))),
    Case("load-alpha-negative", _load, ValueError, "'alpha'",
         setup=_sd(lambda sd: sd["badm"].update(alpha=[1.0, -1.0]))),
]


def _params(cases):
    out = []
    for c in cases:
        marks = [pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize("case", _params(CASES))
def test_invalid_input_raises_and_changes_nothing(case: Case):
    ctx, twin = Ctx(**case.ctx), Ctx(**case.ctx)
    if case.undo is not None:
        before = _snapshot(ctx)
    if case.setup is not None:
        case.setup(ctx)
        case.setup(twin)
    if case.undo is None:
        before = _snapshot(ctx)
    with pytest.raises(case.exc, match=case.match):
        case.call(ctx)
    if case.undo is not None:
        case.undo(ctx)
        case.undo(twin)
    _assert_unchanged(before, _snapshot(ctx))
    # Still usable, and indistinguishable from a twin that never saw the invalid call.
    for c in (ctx, twin):
        if case.recover is not None:
            case.recover(c)
        c.stack.close()
        _resume(c)
    for p, q in zip(ctx.params, twin.params):
        assert torch.equal(p, q)
        assert torch.equal(ctx.opt.state[p]["duals"], twin.opt.state[q]["duals"])
    assert repr(ctx.opt.state_dict()["badm"]) == repr(twin.opt.state_dict()["badm"])
    assert ctx.opt.skipped_steps == twin.opt.skipped_steps == 0


def test_huge_finite_weights_are_normalised():
    """Weights are only relative sizes: finite weights whose sum overflows still normalise."""
    assert normalize_weights([1e308, 1e308], 2) == [0.5, 0.5]
    assert normalize_weights([1e308, 0.5e308, 0.5e308], 3) == [0.5, 0.25, 0.25]


# ---------------------------------------------------------------- inputs that became valid on purpose


def _trained(opt_kwargs: dict[str, Any], group_writes: dict[str, Any] | None = None, S: int = 2):
    """Three steps of the Ctx model under BADM(**opt_kwargs); ``group_writes`` go into the param
    group after the first step. Returns the model and optimizer."""
    ctx = Ctx(S=S, opt=False)
    ctx.opt = badm_fast.BADM(ctx.model.parameters(), sub_batches=S, **opt_kwargs)
    for t in range(3):
        if t == 1 and group_writes:
            ctx.opt.param_groups[0].update(group_writes)
        ctx.backward(seed=t)
        ctx.opt.step()
    return ctx


def _assert_same_run(a: Ctx, b: Ctx) -> None:
    for p, q in zip(a.params, b.params):
        assert torch.equal(p, q)
        assert torch.equal(a.opt.state[p]["duals"], b.opt.state[q]["duals"])


def test_tensor_and_numpy_scalar_hyperparameters_are_valid():
    """lr/momentum/weight_decay as one-element tensors or numpy scalars, at construction and
    written into a group between steps, run exactly like the Python floats of the same values."""
    lr32 = torch.tensor(0.05)  # float32: the run uses float(lr32), not 0.05
    floats = _trained(dict(lr=float(lr32), momentum=0.8, weight_decay=float(np.float32(1e-3))),
                      dict(lr=0.02, momentum=float(np.float32(0.6))))
    scalars = _trained(dict(lr=lr32, momentum=np.float64(0.8), weight_decay=np.float32(1e-3)),
                       dict(lr=np.float64(0.02), momentum=torch.tensor([0.6])))
    _assert_same_run(floats, scalars)
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in scalars.params])).all()
    sd = scalars.opt.state_dict()  # and the state_dict still reads them
    assert sd["param_groups"][0]["rho"] == pytest.approx(0.6 / 0.02)


@pytest.mark.parametrize("kwargs,lr_momentum", [
    (dict(rho=4.0), reference.lr_momentum(4.0, 10.0)),  # the other is completed with sigma = 10
    (dict(sigma=3.0), reference.lr_momentum(9.0, 3.0)),  # ... with rho = 9
    (dict(rho=None, sigma=None), (0.01, 0.9)),  # None is "not given"
    (dict(rho=0.0, sigma=2.0), (0.5, 0.0)),
    (dict(lr=0.0), (0.0, 0.9)),  # lr = 0: the weights stay, the duals go on
    (dict(momentum=0.0), (0.01, 0.0)),
])
def test_hyperparameter_forms_that_are_valid(kwargs, lr_momentum):
    model = Ctx(opt=False).model
    opt = badm_fast.BADM(model.parameters(), sub_batches=2, **kwargs)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"]) == lr_momentum
    assert "rho" not in g and "sigma" not in g


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters_are_valid(dtype):
    """Complex parameters were refused before the redesign; now they are stepped as their real view."""
    p = nn.Parameter(torch.randn(4, dtype=dtype))
    opt = badm_fast.BADM([p], sub_batches=2, rho=RHO, sigma=SIGMA)
    before = p.detach().clone()
    for s in range(2):
        with opt.sub_batch(s):
            (p.abs() ** 2).sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), before) and torch.isfinite(torch.view_as_real(p.detach())).all()


@pytest.mark.parametrize("S", [1, 2])
def test_cast_before_the_first_step_is_valid(S):
    """.double() between construction and the first step was refused before the redesign."""
    ctx = Ctx(S=S, opt=False)
    ctx.model.float()
    ctx.opt = ctx.make_opt()
    ctx.model.double()
    ctx.train(2, seed=0)
    twin = Ctx(S=S, opt=False)
    twin.model.float().double()
    twin.opt = twin.make_opt()
    twin.train(2, seed=0)
    _assert_same_run(ctx, twin)
    assert all(ctx.opt.state[p]["duals"].dtype == torch.float64 for p in ctx.params)


# ---------------------------------------------------------------- loading only through weights_only


SOURCE_DIRS = ("badm_fast", "kernels", "bench", "tests")
NO_PICKLE_DIRS = ("badm_fast", "kernels", "bench")


def _python_files(dirs):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))
    if "badm_fast" in dirs and (ROOT / "setup.py").exists():
        yield ROOT / "setup.py"


def _torch_load_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to the torch module and to torch.load / torch.serialization.load in a file."""
    modules, loads = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch":
                    modules.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            for a in node.names:
                if a.name == "load":
                    loads.add(a.asname or "load")
    return modules, loads


def _load_call_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, loads = _torch_load_aliases(tree)
    rel = path.relative_to(ROOT)
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        is_torch_load = (
            (isinstance(f, ast.Name) and f.id in loads)
            or (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                and f.value.id in modules)
            or (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Attribute)
                and f.value.attr == "serialization")
        )
        if is_torch_load:
            kw = {k.arg: k.value for k in node.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                problems.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
    return problems


def _pickle_problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle", "marshal", "shelve"):
            problems.append(f"{rel}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("dill", "cloudpickle", "marshal", "shelve"):
                    problems.append(f"{rel}:{node.lineno}: import {a.name}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if isinstance(f.value, ast.Name) and f.value.id == "pickle" and f.attr in ("load", "loads", "Unpickler"):
                problems.append(f"{rel}:{node.lineno}: pickle.{f.attr}")
            if f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id in ("np", "numpy"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                    if "allow_pickle" in kw:
                        problems.append(f"{rel}:{node.lineno}: numpy.load(allow_pickle=...)")
    return problems


def test_every_torch_load_is_weights_only():
    files = list(_python_files(SOURCE_DIRS))
    assert any(f.name == "optimizer.py" for f in files)  # the scan sees the package
    problems = [p for f in files for p in _load_call_problems(f)]
    assert not problems, "\n".join(problems)


def test_nothing_is_unpickled_in_the_package():
    problems = [p for f in _python_files(NO_PICKLE_DIRS) for p in _pickle_problems(f)]
    assert not problems, "\n".join(problems)


def test_the_source_scan_finds_unsafe_loads(tmp_path, monkeypatch):
    """The scanners flag what they are meant to flag (aliases included)."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch as T\nimport pickle\nfrom torch import load as L\n"
        "T.load('a')\nL('b', weights_only=False)\ntorch.serialization.load('c')\npickle.loads(b'')\n"
        "T.load('ok', weights_only=True)\n"
    )
    assert len(_load_call_problems(bad)) == 3
    assert len(_pickle_problems(bad)) == 1


def _state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("mode", ["sub_batch", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_optimizer_state_dict_round_trips_through_weights_only_load(mode, dtype):
    torch.manual_seed(3)
    model = nn.Linear(7, 3).to(dtype)
    opt = badm_fast.BADM(model.parameters(), sub_batches=3, rho=1.5, sigma=4.0, mode=mode)
    for t in range(2):
        x = torch.randn(9, 7, generator=torch.Generator().manual_seed(t)).to(dtype)
        badm_fast.split_step(model, opt, lambda out, y: out.float().square().mean(), x, torch.zeros(9))
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert _state_equal(sd, loaded)
    opt2 = badm_fast.BADM(copy.deepcopy(model).parameters(), sub_batches=3, mode=mode)
    opt2.load_state_dict(loaded)
    assert _state_equal(opt2.state_dict(), sd)


@pytest.mark.parametrize("mode", ["sub_batch", "merged"])
def test_training_checkpoint_round_trips_through_weights_only_load(mode, tmp_path):
    """{"model", "opt", "rng", "step"} saved mid-run and loaded with weights_only=True into a
    fresh model and optimizer resumes bit-exactly, including the random stream."""

    def run(ctx, steps, seed):
        for t in range(steps):
            ctx.backward(seed + t)
            ctx.opt.step(weights=None if mode == "merged" else [1.0, 2.0])
            ctx.model[0].weight.data.add_(torch.randn(ctx.model[0].weight.shape, dtype=torch.float64) * 1e-3)

    ctx = Ctx(mode=mode)
    torch.manual_seed(11)
    run(ctx, 3, seed=20)
    path = tmp_path / "ckpt.pt"
    ckpt = {"model": ctx.model.state_dict(), "opt": ctx.opt.state_dict(), "rng": torch.get_rng_state(), "step": 3}
    torch.save(ckpt, path)
    run(ctx, 3, seed=30)

    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 3 and isinstance(loaded["step"], int)
    assert torch.equal(loaded["rng"], ckpt["rng"])
    fresh = Ctx(mode=mode, opt=False)
    with torch.no_grad():
        for p in fresh.params:
            p.mul_(0.5)  # different starting weights: everything must come from the checkpoint
    fresh.model.load_state_dict(loaded["model"])
    fresh.opt = badm_fast.BADM(fresh.model.parameters(), sub_batches=2, rho=0.1, sigma=1.0, mode=mode)
    fresh.opt.load_state_dict(loaded["opt"])
    torch.set_rng_state(loaded["rng"])
    run(fresh, 3, seed=30)
    for p, q in zip(ctx.params, fresh.params):
        assert torch.equal(p, q)
        assert torch.equal(ctx.opt.state[p]["duals"], fresh.opt.state[q]["duals"])
    assert repr(ctx.opt.state_dict()["badm"]) == repr(fresh.opt.state_dict()["badm"])
