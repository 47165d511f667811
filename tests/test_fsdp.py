"""BADM under FSDP2 (``fully_shard``: DTensor parameters) on 2 CPU gloo ranks.

Every rank steps its local shards; the duals are sharded like the parameters. Each scenario
compares the sharded run with a single-process run, computed in the same worker, on the same
global batch: sub-batch ``s`` of the global batch is the ranks' ``s``-th local chunks together
(FSDP averages the ranks' gradients, so the sharded gradient of sub-batch ``s`` is the gradient
of its mean loss). Scenarios: one sub-batch, two sub-batches (``reshard_after_forward`` off),
merged mode, mixed precision (bf16 compute, fp32 gradients), per-sub-batch clipping and the
residuals, non-finite gradients in one rank's shard (every rank refuses), a
torch.distributed.checkpoint save / fresh start / load that resumes exactly, and the refusal of
``process_group`` for sharded parameters. One spawn runs them all (tests/ranks.py).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import ranks
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import badm_fast

WORLD = 2
TIMEOUT_S = 240
# rtol/atol of the sharded run against the single process, by parameter dtype: only the order of
# the floating-point sums differs (gradient reduction, residual and norm partial sums)
TOL = {torch.float64: (1e-12, 1e-13), torch.float32: (2e-6, 2e-6)}


# ================================================================== worker side (2 processes)
class Net(nn.Module):
    """Three linear layers; ``aux`` has one output, so its shards on rank 1 are empty."""

    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 1)
        self.to(dtype)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h), self.aux(h)


def loss_fn(model, x, y):
    logits, aux = model(x)
    return F.cross_entropy(logits.float(), y) + 0.1 * aux.float().pow(2).mean()


def shard(model, **kw):
    from torch.distributed.fsdp import fully_shard

    for layer in (model.body, model.head, model.aux):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def batches(steps, size, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(size, 6, generator=gen, dtype=torch.float64).to(dtype)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        out.append((x, y))
    return out


def sub_batches(x, y, S):
    return list(zip(x.tensor_split(S), y.tensor_split(S)))


def train(model, opt, data, S, rank=None, before_step=None, residuals=False):
    """S sub-batches per step (merged: one backward over all of them). ``rank`` None: the single
    process over the global sub-batches; else this rank's chunk of every sub-batch."""
    mine = (lambda t: t) if rank is None else (lambda t: t.tensor_split(WORLD)[rank])
    out = []
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        parts = sub_batches(x, y, S)
        if opt.mode == "merged" or S == 1:
            # merged: the rank's chunks of all sub-batches in one backward
            xs = torch.cat([mine(a) for a, _ in parts])
            ys = torch.cat([mine(b) for _, b in parts])
            loss_fn(model, xs, ys).backward()
        else:
            for s, (a, b) in enumerate(parts):
                with opt.sub_batch(s):
                    loss_fn(model, mine(a), mine(b)).backward()
        if before_step is not None:
            out.append(before_step(k))
        opt.step(residuals=residuals)
        if residuals:
            out.append(torch.stack([opt.residuals["primal"], opt.residuals["dual"]]).clone())
    return out


def full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def close(got, want, dtype, what):
    rtol, atol = TOL[dtype]
    assert len(got) == len(want), what
    for k, (u, v) in enumerate(zip(got, want)):
        torch.testing.assert_close(full(u), full(v), rtol=rtol, atol=atol, msg=lambda m: f"{what}[{k}]: {m}")


def compare(rank, S, mode="sub_batch", steps=4, shard_kw=None, **opt_kw):
    data = batches(steps, 16)
    ref_model = Net()
    ref = badm_fast.BADM(ref_model.parameters(), sub_batches=S, mode=mode, lr=0.05, momentum=0.8, **opt_kw)
    ref_res = train(ref_model, ref, data, S, residuals=True)
    model = shard(Net(), **(shard_kw or {}))
    params = list(model.parameters())
    opt = badm_fast.BADM(params, sub_batches=S, mode=mode, lr=0.05, momentum=0.8, **opt_kw)
    res = train(model, opt, data, S, rank=rank, residuals=True)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params], "parameters were replaced"
    for p in params:  # duals sharded like the parameters, rows first
        d = opt.state[p]["duals"]
        assert type(d) is type(p) and d.placements[0].dim == p.placements[0].dim + 1
        assert d._local_tensor.shape[1:] == p._local_tensor.shape
    assert params[-1]._local_tensor.numel() == (1 if rank == 0 else 0)  # aux.bias: an empty shard on rank 1
    close(list(model.parameters()), list(ref_model.parameters()), torch.float64, "weights")
    close([opt.state[p]["duals"] for p in params], [ref.state[p]["duals"] for p in ref_model.parameters()],
          torch.float64, "duals")
    close(res, ref_res, torch.float64, "residuals")


def scenario_one_sub_batch(rank):
    compare(rank, S=1)


def scenario_two_sub_batches(rank):
    compare(rank, S=2, shard_kw={"reshard_after_forward": False})


def scenario_merged(rank):
    compare(rank, S=2, mode="merged")


def scenario_weight_decay_and_maximize(rank):
    compare(rank, S=2, weight_decay=0.01, maximize=True)


def scenario_mixed_precision(rank):
    """bf16 forward/backward, fp32 reduction and fp32 sharded parameters; the single process
    does the same by hand: a bf16 copy per rank chunk, gradients in fp32, averaged over ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    S = 2
    data = batches(3, 16, dtype=torch.float32)
    ref_model = Net(dtype=torch.float32)
    ref = badm_fast.BADM(ref_model.parameters(), sub_batches=S, lr=0.05, momentum=0.8)
    for x, y in data:
        ref.zero_grad()
        for s, (a, b) in enumerate(sub_batches(x, y, S)):
            grads = []
            for r in range(WORLD):
                low = Net(dtype=torch.float32)
                low.load_state_dict(ref_model.state_dict())
                low.to(torch.bfloat16)
                loss_fn(low, a.tensor_split(WORLD)[r].bfloat16(), b.tensor_split(WORLD)[r]).backward()
                grads.append([p.grad.float() for p in low.parameters()])
            mean = [sum(gs) / WORLD for gs in zip(*grads)]
            ref.set_grads(s, list(ref_model.parameters()), mean)
        ref.step()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(Net(dtype=torch.float32), mp_policy=policy)
    opt = badm_fast.BADM(model.parameters(), sub_batches=S, lr=0.05, momentum=0.8)
    for x, y in data:
        opt.zero_grad()
        for s, (a, b) in enumerate(sub_batches(x, y, S)):
            with opt.sub_batch(s):
                loss_fn(model, a.tensor_split(WORLD)[rank], b.tensor_split(WORLD)[rank]).backward()
        opt.step()
    assert all(p.dtype == torch.float32 and opt.state[p]["duals"].dtype == torch.float32 for p in model.parameters())
    close(list(model.parameters()), list(ref_model.parameters()), torch.float32, "weights")


def scenario_clipping(rank):
    """opt.clip_grad_norm_ gives every sub-batch's norm over all shards (as the single process
    over whole gradients) and clips every rank's shards by it."""
    for S, norm_type in ((2, 2.0), (2, math.inf), (1, 2.0)):
        data = batches(3, 16)
        ref_model = Net()
        ref = badm_fast.BADM(ref_model.parameters(), sub_batches=S, lr=0.05, momentum=0.8)
        ref_norms = train(ref_model, ref, data, S, before_step=lambda k: ref.clip_grad_norm_(0.05, norm_type))
        model = shard(Net())
        opt = badm_fast.BADM(model.parameters(), sub_batches=S, lr=0.05, momentum=0.8)
        norms = train(model, opt, data, S, rank=rank, before_step=lambda k: opt.clip_grad_norm_(0.05, norm_type))
        close(norms, ref_norms, torch.float64, f"norms S={S} p={norm_type}")
        assert all(bool((n > 0.05).all()) for n in norms)  # the clipping did something
        close(list(model.parameters()), list(ref_model.parameters()), torch.float64, f"weights S={S} p={norm_type}")


def scenario_nonfinite_in_one_shard(rank):
    """A NaN in one rank's gradient shard: every rank refuses the step ("skip": weights and
    duals unchanged everywhere; "raise": every rank raises, the rank holding it names it)."""
    for S, policy in ((1, "skip"), (2, "skip"), (1, "raise"), (2, "raise")):
        model = shard(Net())
        opt = badm_fast.BADM(model.parameters(), sub_batches=S, lr=0.05, momentum=0.8, on_nonfinite=policy)
        train(model, opt, batches(1, 16), S, rank=rank)  # one good step: non-zero duals
        before = [full(p) for p in model.parameters()] + [full(opt.state[p]["duals"]) for p in model.parameters()]
        (x, y), = batches(1, 16, seed=5)
        opt.zero_grad()
        target = model.head.weight
        for s, (a, b) in enumerate(sub_batches(x, y, S)):
            with opt.sub_batch(s) if S > 1 else _nothing():
                loss_fn(model, a.tensor_split(WORLD)[rank], b.tensor_split(WORLD)[rank]).backward()
                if rank == 0 and s == S - 1:
                    target.grad._local_tensor[0, 0] = float("nan")
        if policy == "skip":
            opt.step()
            assert opt.skipped_steps == 1, f"S={S}: rank {rank} did not skip"
        else:
            with pytest.raises(RuntimeError) as err:
                opt.step()
            want = "param group 0 (shape (3, 16))" if rank == 0 else "in a shard held by another rank"
            assert want in str(err.value), str(err.value)
        after = [full(p) for p in model.parameters()] + [full(opt.state[p]["duals"]) for p in model.parameters()]
        assert all(torch.equal(u, v) for u, v in zip(before, after)), f"S={S} {policy}: state changed"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def scenario_dcp_resume(rank, tmpdir):
    """torch.distributed.checkpoint: save model and optimizer after 3 of 6 steps, build a fresh
    model (other initial weights) and optimizer, load, finish: the same bits as 6 steps in one go."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    for S, mode in ((2, "sub_batch"), (3, "merged")):
        data = batches(6, 12)
        whole = shard(Net())
        whole_opt = badm_fast.BADM(whole.parameters(), sub_batches=S, mode=mode, lr=0.05, momentum=0.8)
        train(whole, whole_opt, data, S, rank=rank)

        first = shard(Net())
        first_opt = badm_fast.BADM(first.parameters(), sub_batches=S, mode=mode, lr=0.05, momentum=0.8)
        train(first, first_opt, data[:3], S, rank=rank)
        msd, osd = get_state_dict(first, first_opt)
        path = os.path.join(tmpdir, f"dcp-{mode}")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)

        second = shard(Net(seed=7))
        second_opt = badm_fast.BADM(second.parameters(), sub_batches=S, mode=mode, lr=0.3, momentum=0.1)
        msd2, osd2 = get_state_dict(second, second_opt)
        state = {"model": msd2, "optim": osd2}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(second, second_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        group = second_opt.param_groups[0]
        assert (group["lr"], group["momentum"]) == (0.05, 0.8) and "badm" not in group
        assert second_opt.state_dict()["badm"]["step"] == 3
        train(second, second_opt, data[3:], S, rank=rank)
        for u, v in zip(second.parameters(), whole.parameters()):
            assert torch.equal(u._local_tensor, v._local_tensor), f"{mode}: weights differ after the resume"
        for u, v in zip(second.parameters(), whole.parameters()):
            du, dv = second_opt.state[u]["duals"], whole_opt.state[v]["duals"]
            assert torch.equal(du._local_tensor, dv._local_tensor), f"{mode}: duals differ after the resume"


def scenario_process_group_refused(rank):
    model = shard(Net())
    with pytest.raises(ValueError, match="DTensor parameters .* without it"):
        badm_fast.BADM(model.parameters(), process_group=dist.group.WORLD)


SCENARIOS = {
    "one_sub_batch": scenario_one_sub_batch,
    "two_sub_batches": scenario_two_sub_batches,
    "merged": scenario_merged,
    "weight_decay": scenario_weight_decay_and_maximize,
    "mixed_precision": scenario_mixed_precision,
    "clipping": scenario_clipping,
    "nonfinite_in_one_shard": scenario_nonfinite_in_one_shard,
    "dcp_resume": scenario_dcp_resume,
    "process_group_refused": scenario_process_group_refused,
}


# ====================================================================== pytest side
reports, test_fsdp = ranks.scenario_tests(__file__, SCENARIOS, WORLD, TIMEOUT_S)


def test_state_dict_without_top_level_metadata_loads():
    """A state that kept only 'state' and 'param_groups' (what torch.distributed.checkpoint's
    get_state_dict returns) loads from the groups' copy of the metadata, and resumes exactly."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    data = batches(4, 12)
    whole = Net()
    whole_opt = badm_fast.BADM(whole.parameters(), sub_batches=3, lr=0.05, momentum=0.8)
    train(whole, whole_opt, data, 3)
    first = Net()
    first_opt = badm_fast.BADM(first.parameters(), sub_batches=3, lr=0.05, momentum=0.8)
    train(first, first_opt, data[:2], 3)
    msd, osd = get_state_dict(first, first_opt)
    assert "badm" not in osd and json.loads(osd["param_groups"][0]["badm"])["step"] == 2
    second = Net(seed=3)
    second_opt = badm_fast.BADM(second.parameters(), sub_batches=3)
    set_state_dict(second, second_opt, model_state_dict=msd, optim_state_dict=osd)
    train(second, second_opt, data[2:], 3)
    assert all(torch.equal(u, v) for u, v in zip(second.parameters(), whole.parameters()))


if __name__ == "__main__":
    ranks.run_scenarios(SCENARIOS, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                        with_dir=frozenset({"dcp_resume"}))
