"""Distributed BADM (badm_fast.distributed) on CPU with gloo: 2 ranks spawned by the test.

One spawn of two worker processes (this file run as a script, addresses on 127.0.0.1 only)
runs every scenario below in order and writes, per rank, which scenarios failed and why; the
tests read those reports. Each worker compares its distributed run with a single-process run
of the same sub-batches computed in the same process, so every check is against fresh data.
Time: about 1-2 minutes on 2 shared cores (the overlap scenarios most of it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import ranks
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import HAVE_GLOO
from torch import nn

import badm_fast
from badm_fast import backends

WORLD = 2
TIMEOUT_S = 180  # the whole spawn; each collective also times out after 60 s


def _cpu_backends() -> list[str]:
    ok, _, _ = backends.availability("cpp", "cpu")
    return ["torch", "cpp"] if ok else ["torch"]


# ================================================================== worker side (2 processes)
def _model(seed=0, dtype=torch.float64, hidden=16, heads=1):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(6, hidden), nn.Tanh())
    return nn.ModuleDict(
        {"body": body, **{f"head{k}": nn.Linear(hidden, 3) for k in range(heads)}},
    ).to(dtype)


def _forward(model, x, head=0):
    return model[f"head{head}"](model["body"](x))


def _batches(steps, sizes_per_step, seed=1, dtype=torch.float64):
    """Per step, the global sub-batches [(x, y), ...] with the given sizes (fresh random data)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for sizes in sizes_per_step[:steps]:
        x = torch.randn(sum(sizes), 6, generator=gen, dtype=torch.float64).to(dtype)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        out.append(list(zip(x.split(sizes), y.split(sizes))))
    return out


def _train(model, opt, steps, heads_used=None, residuals=True):
    """Run ``opt`` over ``steps`` (per step: this optimizer's sub-batches); returns residuals."""
    res = []
    for k, parts in enumerate(steps):
        opt.zero_grad()
        used = heads_used[k] if heads_used else [[0]] * len(parts)
        if opt.mode == "merged":
            x = torch.cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            F.cross_entropy(_forward(model, x), y).backward()
        else:
            for s, (x, y) in enumerate(parts):
                with opt.sub_batch(s):
                    loss = sum(F.cross_entropy(_forward(model, x, h), y) for h in used[s]) if used[s] else None
                    if loss is not None:
                        loss.backward()
        opt.step(weights=[float(len(p[1])) for p in parts], residuals=residuals)
        if residuals:
            res.append(torch.stack([opt.residuals["primal"], opt.residuals["dual"]]).clone())
    return res


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _duals(model, opt):
    return [opt.state[p]["duals"].clone() for p in model.parameters() if p in opt.state]


def _close(a, b, dtype, what):
    tol = {torch.float64: (1e-12, 1e-13), torch.float32: (2e-6, 2e-6), torch.bfloat16: (2 * 2.0**-8, 2 * 2.0**-8)}
    rtol, atol = tol[dtype]
    for k, (u, v) in enumerate(zip(a, b)):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=lambda m: f"{what}[{k}]: {m}")


def _compare_with_single(rank, sub_batches, sizes, backend, dtype, steps=6, mode="sub_batch"):
    """Distributed run (this rank: sub_batches[rank] sub-batches) against one process holding
    all sum(sub_batches) sub-batches; same data, weights = sizes (ragged, changing each step)."""
    total = sum(sub_batches)
    first = sum(sub_batches[:rank])
    mine = slice(first, first + sub_batches[rank])
    data = _batches(steps, sizes, dtype=dtype)
    groups = lambda m: [  # noqa: E731 - two groups with their own rho/sigma, one frozen parameter
        {"params": list(m["body"].parameters()), "rho": 3.0, "sigma": 5.0},
        {"params": list(m["head0"].parameters()), "rho": 1.0, "sigma": 4.0},
    ]
    ref_model = _model(dtype=dtype)
    ref_model["body"][0].bias.requires_grad_(False)
    ref = badm_fast.BADM(groups(ref_model), sub_batches=total, backend=backend)
    ref_res = _train(ref_model, ref, data)
    model = _model(dtype=dtype)
    model["body"][0].bias.requires_grad_(False)
    opt = badm_fast.BADM(
        groups(model), sub_batches=sub_batches[rank], backend=backend, mode=mode, process_group=dist.group.WORLD
    )
    res = _train(model, opt, [parts[mine] for parts in data])
    _close(_params(model), _params(ref_model), dtype, "weights")
    if mode == "sub_batch":
        _close(_duals(model, opt), [d[mine] for d in _duals(ref_model, ref)], dtype, "duals")
    else:  # the merged dual is the weighted mean of this rank's sub-batch duals (constant weights)
        w = torch.tensor(sizes[0][mine], dtype=torch.float64)
        w = (w / w.sum()).to(_duals(model, opt)[0].dtype)
        merged = [(w.view(-1, *[1] * (d.dim() - 1)) * d[mine]).sum(0, keepdim=True) for d in _duals(ref_model, ref)]
        _close(_duals(model, opt), merged, dtype, "merged duals")
    # residuals: the primal one of the merged mode is that of the merged dual, not comparable
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    cols = slice(0, 2) if mode == "sub_batch" else slice(1, 2)
    torch.testing.assert_close(torch.stack(res)[:, cols], torch.stack(ref_res)[:, cols], rtol=rtol, atol=1e-12)
    assert not torch.equal(_params(model)[0], _params(_model(dtype=dtype))[0])  # it moved
    assert opt.backend == backend


def scenario_two_ranks_one_sub_batch(rank):
    sizes = [[5, 9], [8, 8], [11, 3], [6, 7], [9, 9], [4, 12]]
    for backend in _cpu_backends():
        _compare_with_single(rank, [1, 1], sizes, backend, torch.float64)
    _compare_with_single(rank, [1, 1], sizes, _cpu_backends()[-1], torch.float32)


def scenario_low_precision(rank):
    """bf16/fp16 weights: the payload is fp32 and z is rounded once, so one step from the same
    state gives the single-process weights bit for bit (up to a rare fp32 tie: <= 1%, 1 ulp).
    A bf16 payload, or a delta rounded before the addition, changes ~10% of the elements."""
    for dtype in (torch.bfloat16, torch.float16):
        for backend in _cpu_backends():
            data = _batches(1, [[9, 7]], dtype=dtype)
            ref_model = _model(dtype=dtype, hidden=128)
            ref = badm_fast.BADM(ref_model.parameters(), sub_batches=2, rho=1.0, sigma=0.5, backend=backend)
            _train(ref_model, ref, data)
            model = _model(dtype=dtype, hidden=128)
            opt = badm_fast.BADM(
                model.parameters(), rho=1.0, sigma=0.5, backend=backend, process_group=dist.group.WORLD
            )
            _train(model, opt, [parts[rank : rank + 1] for parts in data])
            a, b = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (model, ref_model))
            assert float((a != b).double().mean()) <= 0.01, f"{dtype}, {backend}: {int((a != b).sum())} of {a.numel()}"
            ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
            torch.testing.assert_close(a.float(), b.float(), rtol=ulp, atol=1e-6)
            assert all(d.dtype == torch.float32 for d in badm_fast.distributed._replica(opt).payloads.values())
    # a few steps: the trajectories stay together to the storage precision
    sizes = [[5, 9], [8, 8], [11, 3]]
    for backend in _cpu_backends():
        _compare_with_single(rank, [1, 1], sizes, backend, torch.bfloat16, steps=3)


def scenario_two_ranks_two_ragged_sub_batches(rank):
    sizes = [[3, 5, 7, 2], [4, 4, 4, 4], [1, 9, 6, 3], [8, 2, 2, 5], [5, 5, 1, 7]]
    for backend in _cpu_backends():
        _compare_with_single(rank, [2, 2], sizes, backend, torch.float64)


def scenario_sub_batch_counts_differ(rank):
    sizes = [[3, 5, 7, 2], [4, 4, 4, 4], [1, 9, 6, 3], [8, 2, 2, 5]]
    _compare_with_single(rank, [1, 3], sizes, _cpu_backends()[-1], torch.float64)


def scenario_merged(rank):
    sizes = [[3, 5, 7, 2]] * 6  # constant weights: the exact fast path
    for backend in _cpu_backends():
        _compare_with_single(rank, [2, 2], sizes, backend, torch.float64, mode="merged")


def scenario_unused_parameters(rank):
    """Head 1 gets a gradient from rank 1 only (step 0), then from nobody (steps 1-2): the
    single-process rule over all sub-batches (zero gradient where none; no gradient anywhere:
    weights and duals unchanged) holds across ranks."""
    sizes = [[6, 8], [7, 5], [9, 4]]
    heads = [[[0], [0, 1]], [[0], [0]], [[0], [0]]]
    data = _batches(3, sizes)
    for backend in _cpu_backends():
        ref_model = _model(heads=2)
        ref = badm_fast.BADM(ref_model.parameters(), sub_batches=2, rho=2.0, sigma=5.0, backend=backend)
        model = _model(heads=2)
        opt = badm_fast.BADM(
            model.parameters(), sub_batches=1, rho=2.0, sigma=5.0, backend=backend, process_group=dist.group.WORLD
        )
        ref_res, res = [], []
        for k in range(3):
            ref_res += _train(ref_model, ref, data[k : k + 1], [heads[k]])
            res += _train(model, opt, [data[k][rank : rank + 1]], [heads[k][rank : rank + 1]])
            _close(_params(model), _params(ref_model), torch.float64, f"weights after step {k}")
            _close(_duals(model, opt), [d[rank : rank + 1] for d in _duals(ref_model, ref)], torch.float64, "duals")
            if k == 1:
                head1 = [p.clone() for p in model["head1"].parameters()] + [
                    opt.state[p]["duals"].clone() for p in model["head1"].parameters()
                ]
        assert any(float(ref.state[p]["duals"].abs().max()) > 0 for p in ref_model["head1"].parameters())
        now = [p for p in model["head1"].parameters()] + [opt.state[p]["duals"] for p in model["head1"].parameters()]
        assert all(torch.equal(a, b) for a, b in zip(head1, now)), "an unused parameter moved"
        torch.testing.assert_close(torch.stack(res), torch.stack(ref_res), rtol=1e-10, atol=1e-12)


def scenario_checkpoint_resume(rank, tmpdir):
    """Rank 0 saves one checkpoint (model + every rank's duals); a fresh job resumes from it
    and ends bit-identical to the uninterrupted run."""
    sizes = [[3, 5, 7, 2], [4, 4, 4, 4], [1, 9, 6, 3], [8, 2, 2, 5], [5, 5, 1, 7], [2, 6, 3, 3]]
    data = _batches(6, sizes)
    mine = slice(2 * rank, 2 * rank + 2)
    path = os.path.join(tmpdir, "ckpt.pt")

    def fresh():
        model = _model(seed=3)
        opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=2.0, sigma=6.0, process_group=dist.group.WORLD)
        return model, opt

    model, opt = fresh()
    _train(model, opt, [p[mine] for p in data[:3]], residuals=False)
    ckpt = badm_fast.distributed.gather_state_dict(opt)
    if rank == 0:
        assert ckpt["world_size"] == WORLD and len(ckpt["ranks"]) == WORLD
        torch.save({"model": model.state_dict(), "optimizer": ckpt}, path)
    else:
        assert ckpt is None
    dist.barrier()
    _train(model, opt, [p[mine] for p in data[3:]], residuals=False)
    want_w, want_d = _params(model), _duals(model, opt)

    model, opt = fresh()
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    badm_fast.distributed.scatter_state_dict(opt, saved["optimizer"] if rank == 0 else None)
    assert opt._step_count == 3
    _train(model, opt, [p[mine] for p in data[3:]], residuals=False)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), want_w)), "weights differ after resuming"
    assert all(torch.equal(a, b) for a, b in zip(_duals(model, opt), want_d)), "duals differ after resuming"

    # A checkpoint of another group size, or not a checkpoint at all: every rank refuses it.
    before = _duals(model, opt)
    bad = dict(saved["optimizer"], ranks=saved["optimizer"]["ranks"][:1])
    for wrong, match in ((bad, "holds the optimizer states of 1 ranks"), ({"x": 1}, "not a checkpoint")):
        try:
            badm_fast.distributed.scatter_state_dict(opt, wrong if rank == 0 else None)
        except ValueError as exc:
            assert match in str(exc), str(exc)
        else:
            raise AssertionError(f"scatter_state_dict accepted {match!r}")
    # A rank whose optimizer does not fit its entry: every rank raises, nothing changes.
    other = [dict(sd) for sd in saved["optimizer"]["ranks"]]
    other[1] = dict(other[1], badm=dict(other[1]["badm"], sub_batches=5))
    try:
        badm_fast.distributed.scatter_state_dict(opt, dict(saved["optimizer"], ranks=other) if rank == 0 else None)
    except ValueError as exc:
        assert ("rank 1 could not load" in str(exc)) if rank == 1 else ("rank(s) [1] could not load" in str(exc))
    else:
        raise AssertionError("scatter_state_dict accepted a state with the wrong sub-batch count")
    assert all(torch.equal(a, b) for a, b in zip(_duals(model, opt), before))


def _expect_error(build, pattern):
    import re

    try:
        build()
    except RuntimeError as exc:
        assert re.search(pattern, str(exc)), f"{pattern!r} not in {exc}"
        return str(exc)
    raise AssertionError(f"no RuntimeError matching {pattern!r}")


def scenario_mismatched_weights(rank):
    def build():
        model = _model()
        if rank == 1:
            with torch.no_grad():
                model["head0"].weight[1, 2] += 1e-3
        badm_fast.BADM(model.parameters(), process_group=dist.group.WORLD)

    _expect_error(
        build,
        r"initial weights differ across ranks: parameter 2 of param group 0 \(shape \(3, 16\)\) "
        r"on rank\(s\) \[1\] differs from rank 0",
    )

    def build_seed():
        badm_fast.BADM(_model(seed=rank).parameters(), process_group=dist.group.WORLD)

    _expect_error(build_seed, r"initial weights differ.*parameter 0 of param group 0.*rank\(s\) \[1\]")
    # identical weights, different sub-batch counts: accepted
    badm_fast.BADM(_model().parameters(), sub_batches=1 + rank, process_group=dist.group.WORLD)


def scenario_mismatched_layout(rank):
    cases = [
        (lambda: _model(hidden=16 + rank).parameters(), r"disagree on the parameter layout: rank 0 has 1 param groups"),
        (
            lambda: _model(dtype=torch.float64 if rank == 0 else torch.float32).parameters(),
            r"param group 0 \(bucket 0\): rank 0 has 4 parameters, \d+ elements, torch.float64; "
            r"rank 1 has 4 parameters, \d+ elements, torch.float32",
        ),
        (lambda: [{"params": [p]} for p in _model().parameters()][: 3 + rank], r"rank 1 has 4 param groups"),
    ]
    for params, pattern in cases:
        _expect_error(lambda: badm_fast.BADM(params(), process_group=dist.group.WORLD), pattern)

    # shapes permuted inside one buffer with equal sizes
    def swapped():
        a, b = nn.Parameter(torch.ones(2, 3, dtype=torch.float64)), nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
        return [a, b] if rank == 0 else [b, a]

    _expect_error(lambda: badm_fast.BADM(swapped(), process_group=dist.group.WORLD), r"same sizes, different shapes")
    _expect_error(
        lambda: badm_fast.BADM(
            _model().parameters(), on_nonfinite=["raise", "skip"][rank], process_group=dist.group.WORLD
        ),
        r"on_nonfinite='raise'; rank 1 has .* on_nonfinite='skip'",
    )
    # overlap and bucket_cap_mb: the ranks' all-reduces would not pair
    _expect_error(
        lambda: badm_fast.BADM(_model().parameters(), overlap=bool(rank), process_group=dist.group.WORLD),
        r"rank 0 has .*overlap=False, on_nonfinite='raise'; rank 1 has .*overlap=True, bucket_cap_mb=25,",
    )
    _expect_error(
        lambda: badm_fast.BADM(_model().parameters(), overlap=True, bucket_cap_mb=[25, 1][rank],
                               process_group=dist.group.WORLD),
        r"bucket_cap_mb=25, .*; rank 1 has .*bucket_cap_mb=1,",
    )
    try:
        badm_fast.BADM(_model().parameters(), overlap=True, mode="merged", process_group=dist.group.WORLD)
    except ValueError as exc:
        assert "mode='merged' does not have" in str(exc)
    else:
        raise AssertionError("overlap=True with mode='merged' was accepted")


def scenario_nonfinite(rank):
    sizes = [[6, 8]] * 2
    data = _batches(2, sizes)
    for mode in ("raise", "skip"):
        model = _model()
        opt = badm_fast.BADM(model.parameters(), on_nonfinite=mode, process_group=dist.group.WORLD)
        _train(model, opt, [data[0][rank : rank + 1]], residuals=False)
        before = _params(model) + _duals(model, opt)
        x, y = data[1][rank]
        opt.zero_grad()
        F.cross_entropy(_forward(model, x), y).backward()
        if rank == 1:
            model["head0"].bias.grad[1] = float("nan")
        if mode == "raise":
            pattern = (
                r"rank 1: non-finite gradient in parameter 3" if rank == 1 else r"rank\(s\) \[1\] refused the step"
            )
            _expect_error(lambda: opt.step(weights=[len(y)]), pattern)
        else:
            opt.step(weights=[len(y)])
            assert opt.skipped_steps == 1
        after = _params(model) + _duals(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{mode}: the refused step changed the state"
        _train(model, opt, [data[1][rank : rank + 1]], residuals=False)  # the group is still in step
        assert not torch.equal(_params(model)[0], before[0])


# ------------------------------------------------------------ overlap=True against overlap=False
def _exact(a, b, what):
    assert len(a) == len(b), what
    for k, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"{what}[{k}] differs: max |diff| {float((u.double() - v.double()).abs().max())}"


def _run_overlap(model, opt, steps, heads_used=None, context_weights=True, plain=False, residuals=False,
                 nan_at=None, edit=None, inside=None):
    """Like _train with one step at a time, the weights given to the contexts (``context_weights``)
    or to step(); ``plain``: S_r = 1 without a context; ``nan_at=(step, s)`` makes that sub-batch's
    input NaN; ``edit(k, opt)`` runs between the last backward pass and step k, ``inside(k, s, opt)``
    in the context of sub-batch s after its backward pass. Returns per step
    whether it ran, the residuals, the refusal error, and the weights and duals before and after it."""
    out = []
    for k, parts in enumerate(steps):
        before = _params(model) + _duals(model, opt)
        opt.zero_grad()
        used = heads_used[k] if heads_used else [[0]] * len(parts)
        for s, (x, y) in enumerate(parts):
            if nan_at == (k, s):
                x = x.clone()
                x[0, 0] = float("nan")
            if plain:
                F.cross_entropy(_forward(model, x), y).backward()
                continue
            with opt.sub_batch(s, weight=float(len(y)) if context_weights else None):
                loss = sum(F.cross_entropy(_forward(model, x, h), y) for h in used[s]) if used[s] else None
                if loss is not None:
                    loss.backward()
                if inside is not None:
                    inside(k, s, opt)
        if edit is not None:
            edit(k, opt)
        error = None
        skipped = opt.skipped_steps
        try:
            opt.step(weights=None if context_weights and not plain else [float(len(p[1])) for p in parts],
                     residuals=residuals)
        except RuntimeError as exc:
            error = str(exc)
        res = torch.stack([opt.residuals["primal"], opt.residuals["dual"]]).clone() if residuals else None
        ran = error is None and opt.skipped_steps == skipped
        out.append((ran, res, error, before, _params(model) + _duals(model, opt)))
    return out


def _pair(rank, sub_batches, sizes, backend=None, dtype=torch.float64, heads=1, steps=4, wd=0.0, cap=1e-5,
          on_nonfinite="raise", **run):
    """The same job with overlap=False (weights to step()) and overlap=True (weights to the contexts,
    comm buckets of ``cap`` MiB); returns both (model, optimizer, per-step results)."""
    backend = backend or _cpu_backends()[-1]
    first = sum(sub_batches[:rank])
    mine = slice(first, first + sub_batches[rank])
    data = [parts[mine] for parts in _batches(steps, sizes, dtype=dtype)]
    groups = lambda m: [  # noqa: E731 - two param groups with their own lr/momentum
        {"params": list(m["body"].parameters()), "rho": 3.0, "sigma": 5.0},
        {"params": [p for k in range(heads) for p in m[f"head{k}"].parameters()], "rho": 1.0, "sigma": 4.0},
    ]
    out = []
    for overlap in (False, True):
        model = _model(dtype=dtype, heads=heads)
        model["body"][0].bias.requires_grad_(False)  # a frozen parameter: no state, no comm bucket
        kw = dict(overlap=True, bucket_cap_mb=cap) if overlap else {}
        opt = badm_fast.BADM(groups(model), sub_batches=sub_batches[rank], backend=backend, weight_decay=wd,
                             on_nonfinite=on_nonfinite, process_group=dist.group.WORLD, **kw)
        run_kw = dict(run)
        if not overlap:
            run_kw["context_weights"] = False
        out.append((model, opt, _run_overlap(model, opt, data, **run_kw)))
    return out


def _same_state(a, b, what):
    (m0, o0, r0), (m1, o1, r1) = a, b
    _exact(_params(m1), _params(m0), f"{what}: weights")
    _exact(_duals(m1, o1), _duals(m0, o0), f"{what}: duals")
    assert [x[0] for x in r1] == [x[0] for x in r0], f"{what}: steps taken differ"


def scenario_overlap_is_bit_identical(rank):
    """overlap=True (comm buckets started in the last sub-batch's backward pass) gives the weights and
    duals of overlap=False bit for bit, step after step: S_r = 1 and 2 (and 1 against 3), ragged
    weights, weight decay, two param groups, both back ends, fp64 and fp32; the residuals agree to
    rounding; and the overlap did start comm buckets early and used them."""
    sizes = [[3, 5, 7, 2], [4, 4, 4, 4], [1, 9, 6, 3], [8, 2, 2, 5]]
    cases = [([1, 1], torch.float64, 0.0), ([2, 2], torch.float64, 0.01), ([1, 3], torch.float64, 0.0),
             ([2, 2], torch.float32, 0.0), ([1, 1], torch.bfloat16, 0.01)]
    for backend in _cpu_backends():
        for sub_batches, dtype, wd in cases:
            for cap in (1e-5, 25.0):
                plain, ovl = _pair(rank, sub_batches, sizes, backend, dtype, wd=wd, cap=cap, residuals=True)
                what = f"{backend}, S_r={sub_batches}, {dtype}, wd={wd}, cap={cap}"
                _same_state(plain, ovl, what)
                rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
                torch.testing.assert_close(torch.stack([r[1] for r in ovl[2]]), torch.stack([r[1] for r in plain[2]]),
                                           rtol=rtol, atol=1e-12)
                state = ovl[1]._overlap
                assert state.steps_overlapped == 4 and state.steps_again == 0, what
                assert state.early_starts >= 4, what
                if cap < 1:
                    assert len(state.comm_buckets()) == 3, what  # one per parameter with state
    # and against the single-process run of all sub-batches (to rounding, as without overlap)
    for sub_batches in ([1, 1], [2, 2]):
        total = sum(sub_batches)
        mine = slice(sum(sub_batches[:rank]), sum(sub_batches[: rank + 1]))
        data = _batches(4, [sz[:total] for sz in sizes])
        ref_model = _model()
        ref = badm_fast.BADM(ref_model.parameters(), sub_batches=total, rho=2.0, sigma=5.0)
        _train(ref_model, ref, data, residuals=False)
        model = _model()
        opt = badm_fast.BADM(model.parameters(), sub_batches=sub_batches[rank], rho=2.0, sigma=5.0, overlap=True,
                             bucket_cap_mb=1e-4, process_group=dist.group.WORLD)
        _run_overlap(model, opt, [parts[mine] for parts in data])
        _close(_params(model), _params(ref_model), torch.float64, "weights against the single process")
        _close(_duals(model, opt), [d[mine] for d in _duals(ref_model, ref)], torch.float64, "duals")


def scenario_overlap_checkpoint_resume(rank, tmpdir):
    """overlap=True: a checkpoint of every rank's duals (gather_state_dict) taken after 2 steps resumes
    bit-exactly; gather_state_dict between the last backward pass and step() sees the duals as they
    were before that step (the started all-reduces' dual updates are put back; the step then runs
    again without overlap)."""
    sizes = [[3, 5, 7, 2]] * 5
    data = [parts[2 * rank : 2 * rank + 2] for parts in _batches(5, sizes)]
    path = os.path.join(tmpdir, "overlap.pt")

    def fresh():
        model = _model(seed=4)
        return model, badm_fast.BADM(model.parameters(), sub_batches=2, rho=2.0, sigma=6.0, overlap=True,
                                     bucket_cap_mb=1e-5, process_group=dist.group.WORLD)

    model, opt = fresh()
    _run_overlap(model, opt, data[:2])
    committed = _duals(model, opt)

    def gather_between(k, opt):
        if k == 0:
            ckpt = badm_fast.distributed.gather_state_dict(opt)
            if rank == 0:
                _exact([ckpt["ranks"][0]["state"][i]["duals"] for i in range(4)], committed, "gathered duals")
                torch.save({"model": model.state_dict(), "optimizer": ckpt}, path)
            dist.barrier()

    _run_overlap(model, opt, data[2:], edit=gather_between)
    assert opt._overlap.steps_again == 1
    want = _params(model) + _duals(model, opt)
    model, opt = fresh()
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    badm_fast.distributed.scatter_state_dict(opt, saved["optimizer"] if rank == 0 else None)
    _run_overlap(model, opt, data[2:])
    _exact(_params(model) + _duals(model, opt), want, "resumed")
    assert opt._overlap.steps_again == 0


def scenario_overlap_unused_parameter(rank):
    """Head 1 gets a gradient on rank 1 only (step 0), then from nobody: its comm bucket is incomplete
    on rank 0 (reduced in step()); the result is overlap=False's bit for bit, and a parameter no rank
    touched keeps its weights and duals."""
    sizes = [[6, 8], [7, 5], [9, 4]]
    heads = [[[0], [0, 1]], [[0], [0]], [[0], [0]]]
    for sub_batches in ([1, 1], [2, 2]):
        sz = sizes if sub_batches == [1, 1] else [[3, 3, 4, 4], [4, 3, 2, 3], [5, 4, 2, 2]]
        hd = heads if sub_batches == [1, 1] else [[[0], [0], [0], [0, 1]], [[0]] * 4, [[0]] * 4]
        mine = slice(sum(sub_batches[:rank]), sum(sub_batches[: rank + 1]))
        plain, ovl = _pair(rank, sub_batches, sz, heads=2, steps=3, heads_used=[h[mine] for h in hd])
        _same_state(plain, ovl, f"S_r={sub_batches}")
        assert ovl[1]._overlap.steps_again == 0


def scenario_overlap_refusal(rank):
    """A NaN in rank 1's last sub-batch (on_nonfinite="raise" and "skip"), S_r = 1 and 2: the step is
    refused on both ranks with weights and duals exactly as before (on rank 1 the kernel ran during
    the backward pass: its duals come back from their copy), and the runs go on together."""
    sizes = [[6, 8], [7, 5], [9, 4]]
    for mode in ("raise", "skip"):
        for sub_batches in ([1, 1], [2, 2]):
            S = sub_batches[rank]
            sz = sizes if S == 1 else [[3, 3, 4, 4], [4, 3, 2, 3], [5, 4, 2, 2]]
            plain, ovl = _pair(rank, sub_batches, sz, steps=3, on_nonfinite=mode,
                               nan_at=(1, S - 1) if rank == 1 else None)
            _same_state(plain, ovl, f"{mode}, S_r={sub_batches}")
            for _, opt, results in (plain, ovl):
                assert [r[0] for r in results] == [True, False, True], [r[:3] for r in results]
                _exact(results[1][4], results[1][3], "the refused step changed the state")
                assert not torch.equal(results[2][4][0], results[2][3][0])  # the next step moved
                if mode == "raise":
                    pattern = r"rank 1: non-finite gradient" if rank == 1 else r"rank\(s\) \[1\] refused"
                    assert re.search(pattern, results[1][2]), results[1][2]
                else:
                    assert opt.skipped_steps == 1
            assert ovl[1]._overlap.early_starts > 0 and ovl[1]._overlap.steps_again == 0


def _step_again_cases(rank):
    """(name, run kwargs, reason pattern) of steps whose early contributions cannot be used."""
    def clip(opt):
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 0.1)

    def clip_in_context(k, s, opt):  # the README's clipping of every sub-batch, the last one included
        if k == 1:
            clip(opt)

    def clip_after_context(k, opt):  # S_r = 1 only: with S_r > 1 an edit after the context is refused
        if k == 1 and opt.sub_batches == 1:
            clip(opt)

    def set_grads_after_context(k, opt):  # row 0 (S_r > 1) or .grad (S_r = 1) replaced before step()
        if k == 1:
            params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            opt.set_grads(0, params, [torch.full_like(p, 0.01) for p in params])

    def zero_grad_after_backward(k, opt):
        if k == 1:
            opt.zero_grad()

    def state_dict_between(k, opt):
        if k == 2:
            opt.state_dict()

    return [
        ("weights given to step()", dict(context_weights=False), "differs from the weights"),
        ("clipping in the last context", dict(inside=clip_in_context), "a gradient changed"),
        ("clipping after the last context", dict(edit=clip_after_context), None),
        ("set_grads before step()", dict(edit=set_grads_after_context), "a gradient changed"),
        ("zero_grad() before step()", dict(edit=zero_grad_after_backward), "ran again"),
        ("state_dict() between", dict(edit=state_dict_between), None),
    ]


def scenario_overlap_steps_again(rank):
    """What the early contributions used changed before step(): the step is reduced again without
    overlap (a warning names the reason on the rank that changed it), with overlap=False's result bit
    for bit; a plain backward pass with S_r = 1 (no context, e.g. gradient accumulation) starts
    nothing early; a rank with a context and one without still pair their collectives."""
    import warnings

    sizes = [[6, 8], [7, 5], [9, 4], [5, 5]]
    for name, run, pattern in _step_again_cases(rank):
        for sub_batches in ([1, 1], [2, 2]) if "after the last context" not in name else ([1, 1],):
            sz = sizes if sub_batches == [1, 1] else [[3, 3, 4, 4], [4, 3, 2, 3], [5, 4, 2, 2], [1, 2, 3, 4]]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plain, ovl = _pair(rank, sub_batches, sz, **run)
            _same_state(plain, ovl, f"{name}, S_r={sub_batches}")
            state = ovl[1]._overlap
            assert state.steps_again >= 1, name
            if pattern is not None:
                messages = [str(w.message) for w in caught]
                assert any(pattern in m for m in messages), (name, sub_batches, messages)
    # S_r = 2: a view of row 0 (sub_batch_grad, taken after the previous step) written inside the last
    # context, after its backward pass
    out = []
    for overlap in (False, True):
        model = _model()
        opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=2.0, sigma=5.0, process_group=dist.group.WORLD,
                             **(dict(overlap=True, bucket_cap_mb=1e-5) if overlap else {}))
        row = None
        for k, parts in enumerate(_batches(3, [[3, 4, 5, 6]] * 3)):
            opt.zero_grad()
            mine = parts[2 * rank : 2 * rank + 2]
            with opt.sub_batch(0, weight=len(mine[0][1])):
                F.cross_entropy(_forward(model, mine[0][0]), mine[0][1]).backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                with opt.sub_batch(1, weight=len(mine[1][1])):
                    F.cross_entropy(_forward(model, mine[1][0]), mine[1][1]).backward()
                    if row is not None and k == 1:
                        row.mul_(0.5)
                opt.step(weights=[len(p[1]) for p in mine])
            if k == 0:
                row = opt.sub_batch_grad(model["body"][0].weight, 0)
        out.append((model, opt))
    _exact(_params(out[1][0]) + _duals(*out[1]), _params(out[0][0]) + _duals(*out[0]), "row written in the context")
    state = out[1][1]._overlap
    assert state.steps_again == 1, (state.steps_again, state.steps_overlapped, state.early_starts)
    data = _batches(3, [[6, 8], [7, 5], [9, 4]])

    def both(backward):
        """overlap=False, then overlap=True (tiny buckets), the same ``backward(model, opt, x, y)`` per step."""
        runs = []
        for overlap in (False, True):
            model = _model()
            opt = badm_fast.BADM(model.parameters(), rho=2.0, sigma=5.0, process_group=dist.group.WORLD,
                                 **(dict(overlap=True, bucket_cap_mb=1e-4) if overlap else {}))
            for parts in data:
                opt.zero_grad()
                x, y = parts[rank]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    backward(model, opt, x, y)
                    opt.step()
            runs.append((model, opt))
        return runs

    def twice(model, x, y):
        F.cross_entropy(_forward(model, x[:3]), y[:3]).backward()
        F.cross_entropy(_forward(model, x[3:]), y[3:]).backward()

    # gradient accumulation: two plain backward passes (S_r = 1) before step(), no context
    plain, over = both(lambda model, opt, x, y: twice(model, x, y))
    assert over[1]._overlap.early_starts == 0 and over[1]._overlap.steps_again == 0
    _exact(_params(over[0]), _params(plain[0]), "accumulated: weights")
    _exact(_duals(*over), _duals(*plain), "accumulated: duals")

    # a second backward pass inside the last context: the second one adds to gradients already reduced
    def in_context(model, opt, x, y):
        with opt.sub_batch(0, weight=len(y)):
            twice(model, x, y)

    plain, over = both(in_context)
    _exact(_params(over[0]), _params(plain[0]), "two backward passes: weights")
    assert over[1]._overlap.steps_again == 3

    # rank 0 with the context, rank 1 a plain backward pass: the same collectives, the same result
    def mixed(model, opt, x, y):
        with opt.sub_batch(0) if rank == 0 else contextlib.nullcontext():
            F.cross_entropy(_forward(model, x), y).backward()

    plain, over = both(mixed)
    _exact(_params(over[0]), _params(plain[0]), "mixed: weights")
    _exact(_duals(*over), _duals(*plain), "mixed: duals")
    assert over[1]._overlap.steps_again == 0


def scenario_overlap_split_step(rank):
    """badm_fast.split_step gives the sub-batch sizes to the contexts: with overlap=True it starts the
    all-reduce during the last backward pass and its result is overlap=False's bit for bit; with
    max_grad_norm (clipping after each backward pass) nothing starts early."""
    data = _batches(3, [[7, 6, 9, 5]] * 3)
    for clip in (None, 0.5):
        out = []
        for overlap in (False, True):
            model = _model()
            opt = badm_fast.BADM(model.parameters(), sub_batches=2, rho=2.0, sigma=5.0, process_group=dist.group.WORLD,
                                 **(dict(overlap=True, bucket_cap_mb=1e-5) if overlap else {}))
            for parts in data:
                mine = parts[2 * rank : 2 * rank + 2]
                x, y = torch.cat([p[0] for p in mine]), torch.cat([p[1] for p in mine])
                badm_fast.split_step(lambda t: _forward(model, t), opt, F.cross_entropy, x, y, max_grad_norm=clip)
            out.append((model, opt))
        _exact(_params(out[1][0]) + _duals(*out[1]), _params(out[0][0]) + _duals(*out[0]), f"split_step, clip={clip}")
        state = out[1][1]._overlap
        assert state.steps_again == 0 and (state.early_starts == 0) == (clip is not None), vars(state)


def scenario_overlap_grad_scaler(rank):
    """torch.amp.GradScaler: the early contributions unscale with the previous step's scale (the
    first step, without one, is reduced again); an overflow on rank 1 is refused on both ranks; the
    result is overlap=False's bit for bit."""
    import warnings

    data = _batches(5, [[6, 8]] * 5)
    out = []
    for overlap in (False, True):
        model = _model()
        opt = badm_fast.BADM(model.parameters(), rho=2.0, sigma=5.0, process_group=dist.group.WORLD,
                             **(dict(overlap=True, bucket_cap_mb=1e-4) if overlap else {}))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
        taken = []
        for k, parts in enumerate(data):
            opt.zero_grad()
            x, y = parts[rank]
            with opt.sub_batch(0, weight=len(y)):
                loss = F.cross_entropy(_forward(model, x), y)
                if k == 2 and rank == 1:
                    loss = loss * float("inf")
                scaler.scale(loss).backward()
            before = opt.skipped_steps
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                scaler.step(opt)
            scaler.update()
            taken.append(opt.skipped_steps == before)
        out.append((model, opt, taken))
    _exact(_params(out[1][0]), _params(out[0][0]), "GradScaler: weights")
    _exact(_duals(out[1][0], out[1][1]), _duals(out[0][0], out[0][1]), "GradScaler: duals")
    assert out[0][2] == out[1][2] == [True, True, False, True, True], out[0][2]
    state = out[1][1]._overlap
    assert state.steps_overlapped >= 2, (state.steps_overlapped, state.steps_again)


SCENARIOS = {
    "two_ranks_one_sub_batch": scenario_two_ranks_one_sub_batch,
    "low_precision": scenario_low_precision,
    "two_ranks_two_ragged_sub_batches": scenario_two_ranks_two_ragged_sub_batches,
    "sub_batch_counts_differ": scenario_sub_batch_counts_differ,
    "merged": scenario_merged,
    "unused_parameters": scenario_unused_parameters,
    "checkpoint_resume": scenario_checkpoint_resume,
    "mismatched_weights": scenario_mismatched_weights,
    "mismatched_layout": scenario_mismatched_layout,
    "nonfinite": scenario_nonfinite,
    "overlap_is_bit_identical": scenario_overlap_is_bit_identical,
    "overlap_checkpoint_resume": scenario_overlap_checkpoint_resume,
    "overlap_unused_parameter": scenario_overlap_unused_parameter,
    "overlap_refusal": scenario_overlap_refusal,
    "overlap_steps_again": scenario_overlap_steps_again,
    "overlap_split_step": scenario_overlap_split_step,
    "overlap_grad_scaler": scenario_overlap_grad_scaler,
}


reports, test_distributed = ranks.scenario_tests(__file__, SCENARIOS, WORLD, TIMEOUT_S)


@pytest.mark.parametrize("mode", ["process-group", "overlap", "fsdp"])
def test_training_job_runs_distributed(tmp_path, mode):
    """``torchrun --nproc_per_node=2 -m badm_fast.train --distributed``: every batch is split
    over the ranks; BADM (2 ranks x 2 sub-batches) and DDP + SGD follow the single-process run
    (4 sub-batches) of the same job, and only rank 0 writes. With ``--fsdp`` the model is
    sharded (FSDP2): the ranks share each of BADM's 2 sub-batches, and BADM and SGD follow the
    single-process run with 2 sub-batches. ``--overlap``: the same as without it."""
    fsdp = mode == "fsdp"
    if not HAVE_GLOO:
        pytest.skip("torch.distributed with gloo is not available")
    from badm_fast.train import cli

    job = ["--task", "digits", "--subset", "256", "--batch-size", "32", "--epochs", "2", "--optimizers", "badm,sgd"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    run = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    run += ["--master_addr=127.0.0.1", f"--master_port={ranks.free_port()}", "-m", "badm_fast.train", "--distributed"]
    out = tmp_path / "distributed"
    flags = {"process-group": [], "overlap": ["--overlap"], "fsdp": ["--fsdp"]}[mode]
    done = subprocess.run(
        [*run, *flags, *job, "--sub-batches", "2", "--out", str(out), "--threads", "1", "--quiet"],
        env=env, cwd=root, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "curves.png", "final-badm.pt", "final-sgd.pt", "results.json", "summary.md"
    ], "rank 0 alone writes the outputs"
    assert done.stdout.count("| badm |") == 1, "only rank 0 prints the summary"
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["distributed"] is True and res["config"]["world_size"] == 2
    assert res["config"]["fsdp"] is fsdp
    assert "process group is still referenced" not in done.stderr
    assert "ran again after the backward pass" not in done.stderr, "--overlap fell back to the plain step"

    single_s = "2" if fsdp else "4"
    assert cli.main([*job, "--sub-batches", single_s, "--out", str(tmp_path / "single"), "--threads", "1",
                     "--quiet"]) == 0  # fmt: skip
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    for name in ("badm", "sgd"):
        d, s = res["optimizers"][name]["epochs"], single["optimizers"][name]["epochs"]
        assert len(d) == len(s) == 2
        assert d[-1]["train_loss"] < d[0]["train_loss"]
        for a, b in zip(d, s):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4), name
            assert a["test_metric"] == pytest.approx(b["test_metric"], abs=1e-9), name


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["process-group", "fsdp"])
def test_distributed_job_exits_cleanly_fresh_and_after_sigkill_resume(tmp_path, fsdp):
    """bench/soak_distributed.py with 2 runs (about 20 s; gloo workers reniced, no extra load): a
    fresh ``torchrun`` job, and a job SIGKILLed mid-run then resumed. Every job exits 0, its output
    shows no abort and no warning that the process group outlived ``destroy_process_group`` (the
    gloo worker threads of such a group can abort the interpreter's exit, see
    badm_fast/train/cli.py::_shutdown_distributed), and the resumed run ends with the fresh run's
    weights. The long soak: ``python bench/soak_distributed.py --runs 50 --load 3 --starve``."""
    if not HAVE_GLOO:
        pytest.skip("torch.distributed with gloo is not available")
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sys.path.insert(0, bench)
    try:
        import soak_distributed
    finally:
        sys.path.remove(bench)
    lines = []
    outcomes, failures = soak_distributed.soak(2, keep=tmp_path, starve=True, echo=lines.append, fsdp=fsdp)
    assert [o["kind"] for o in outcomes] == ["fresh", "resumed"]
    assert outcomes[1]["mid_run"], "the SIGKILL came after the job had trained everything"
    assert not failures, "\n".join(lines)


def test_process_group_is_validated():
    model = _model()
    before = _params(model)
    with pytest.raises(
        ValueError, match="torch.distributed is not initialised|must be a torch.distributed.ProcessGroup"
    ):
        badm_fast.BADM(model.parameters(), process_group="world")
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    opt = badm_fast.BADM(model.parameters())
    assert opt.process_group is None
    with pytest.raises(ValueError, match="has no process_group"):
        badm_fast.distributed.gather_state_dict(opt)


if __name__ == "__main__":
    ranks.run_scenarios(SCENARIOS, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                        with_dir=frozenset({"checkpoint_resume", "overlap_checkpoint_resume"}))
