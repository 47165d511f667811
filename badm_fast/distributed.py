r"""Distributed BADM: the sub-batches of one step live on different ranks of a process group.

``badm_fast.BADM(params, sub_batches=S_r, process_group=pg)`` on every rank of ``pg``. Every
rank holds the same global weights :math:`z` and its own ``S_r`` sub-batches: their gradient
rows and their duals :math:`\pi_s`. ``step(weights=...)`` takes this rank's sub-batch weights
(e.g. sizes; or give each one to ``sub_batch(s, weight=w)``); they are normalised over all
ranks, :math:`\alpha_s = w_s / \sum_{\text{all ranks}} w`. The default weight of a sub-batch is
1, so by default every sub-batch of every rank weighs the same.

The parameters stay the user's tensors; the optimizer's :class:`badm_fast.layout.Bucket` of each
(param group, device, dtype) caches the kernel's argument lists (the parameters, their duals and
gradient rows). One step, per bucket:

1. the fused kernel runs over this rank's rows with a zeroed *payload* standing in for
   :math:`z` and the *unnormalised* weights :math:`w_s`. The kernel is linear in the weights
   and adds to its ``params`` argument, so it updates this rank's duals in place and leaves
   :math:`\delta_r = \sum_{s \in r} w_s\,[-2 g_s c + (\rho - \sigma)\pi_s c / \sigma]` in the
   payload (``c = 1/(\rho+\sigma)``);
2. the payload also carries, after the ``P`` columns, this rank's weight sum :math:`W_r`, its
   share of the primal residual, and per parameter whether this rank gave it a gradient;
3. one ``all_reduce(SUM)`` of the payload over the group (gloo on CPU, NCCL on GPU);
4. :math:`z \leftarrow z + \delta / W` with :math:`\delta = \sum_r \delta_r` and
   :math:`W = \sum_r W_r` read from the reduced payload on the device (no host sync), computed
   in place in the payload.

This is the single-process step over the concatenation of all ranks' sub-batches, up to the
order of the floating-point sums; the bytes reduced per step equal one gradient all-reduce of
DDP in the compute dtype.

**Overlap with the backward pass** (``BADM(..., overlap=True)``, see :mod:`badm_fast.overlap`):
the buckets are cut into *comm buckets* of about ``bucket_cap_mb`` MiB in the reverse order of
the parameters (the order in which a backward pass produces their gradients; the first one
1 MiB, like DDP's), each with its own payload. Inside ``with opt.sub_batch(S_r - 1):``, the
last local sub-batch, a comm bucket's contribution is computed and its all-reduce started
(``async_op=True``) as soon as every one of its parameters has its gradient; ``step()`` starts
those that were not complete, waits for all of them, agrees with one small all-reduce on
refusing the step (or on reducing it again without overlap when something it used changed
since: the weights, the gradients, the scale of a GradScaler), then adds ``delta / W``. The
same kernel over the same data gives the same bits: the weights and duals are those of
``overlap=False`` exactly.

Design decisions:

- **Compute dtype on the wire.** The payload has the compute dtype (fp32, fp64 for fp64
  parameters). For bf16/fp16 parameters the gradient rows are converted to fp32 once per step
  (a temporary ``(S_r, P)`` fp32 tensor) so that the same fused kernel runs on fp32 operands;
  the sum over ranks and the division by :math:`W` happen in fp32 and :math:`z` is rounded to
  its storage dtype once, exactly like the single-process step. A payload in bf16 would round
  :math:`\delta_r`, then every partial sum of the reduction, then :math:`z`.
- **Without overlap, one all-reduce per bucket, not cut further.** The payload is one
  contiguous tensor that exists anyway; NCCL and gloo already split a large message into
  pipelined chunks, and the reduction can only start after the kernel (everything happens after
  all backward passes), so cutting it ourselves would add per-call latency without overlapping
  anything. The extra memory is one ``(P,)`` tensor in the compute dtype per bucket, kept
  between steps. With ``overlap=True`` the comm buckets' payloads replace it, plus a copy of the
  duals (``(S_r, P)``) from which a refused step restores them.
- **Agreed skipping.** With ``on_nonfinite="raise"``/``"skip"`` (or under ``GradScaler``) each
  rank checks its own rows first, then a tiny all-reduce of one flag per rank makes every rank
  skip (or raise) together; a refused step changes nothing on any rank. With
  ``on_nonfinite="ignore"`` and no scaler there is no such collective (with ``overlap=True``
  the agreement is always there: it also covers a changed input of an early reduction).
- **Parameters without a gradient** follow the single-process rule over all ranks' sub-batches:
  a parameter that got a gradient on some rank steps on every rank (zero gradient in the rows
  that got none); one that got no gradient on any rank keeps its weights and duals. A rank on
  which some parameter got no gradient reads the per-parameter flags of the reduced payload
  (a host sync, only on that rank and only in that step) and undoes the dual update of a
  parameter that no rank touched.
- **Same weights on every rank.** The optimizer's construction compares, with two
  ``all_gather`` calls of a few integers, the parameter layout (param groups, buckets,
  sizes, shapes, dtypes, ``on_nonfinite``, ``overlap`` and ``bucket_cap_mb``) and an exact
  checksum of every parameter's bits (a plain and a position-weighted integer sum of the bit
  patterns, independent of reduction order) across ranks. Every rank takes part in the
  collectives and then raises the same ``RuntimeError``, naming the bucket or parameter and the
  ranks that differ, so no rank is left waiting. ``sub_batches``, ``mode`` and per-group
  ``rho``/``sigma`` may differ between ranks.

Validation errors raised before any collective (a wrong number of weights, all-zero weights
on a rank, an index out of range) are raised on that rank only; ``torchrun`` then stops the
job. Checkpoints: every rank's duals are its own; :func:`gather_state_dict` collects all of
them on one rank in a single checkpoint and :func:`scatter_state_dict` hands each rank its
part back.
"""

from __future__ import annotations

import io
import math
import zlib
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "check_replicas",
    "gather_state_dict",
    "scatter_state_dict",
    "CHECKPOINT_FORMAT",
]

# Name and version of the checkpoint dict written by gather_state_dict.
CHECKPOINT_FORMAT = ("badm_fast.distributed", 1)

# Payload tail after the P delta columns: [W_r, primal residual share, 14 zeros], then two
# sections of one element per parameter: "got a gradient on this rank" and that parameter's
# primal residual share when it got none; padded to a multiple of 16 elements.
_TAIL = 16
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}
_NONFINITE_CODES = {"raise": 0, "skip": 1, "ignore": 2}
_CHUNK = 1 << 22  # elements per chunk of the weighted checksum (an int64 temporary of 32 MiB)


# --------------------------------------------------------------------------------- helpers
def validate_process_group(process_group: Any) -> None:
    """Raise ValueError unless ``process_group`` is a usable process group this rank is in."""
    if not dist.is_available():
        raise ValueError("process_group was given but this torch has no torch.distributed support")
    if not dist.is_initialized():
        raise ValueError(
            "process_group was given but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group(...) first"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(
            "process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD "
            f"or torch.distributed.new_group(...)), got {type(process_group).__name__}"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError("this process is not a member of process_group")


def _comm_device(pg: Any) -> torch.device:
    """Where the small control tensors of the collectives live: CUDA for a NCCL-only group."""
    backend = str(dist.get_backend(pg)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Replica:
    """Per-optimizer distributed state: the group, this rank, the reduction payloads."""

    def __init__(self, opt: Any):
        pg = opt.process_group
        self.group = pg
        self.rank = dist.get_rank(pg)
        self.world = dist.get_world_size(pg)
        self.device = _comm_device(pg)
        self.checked_groups = -1  # number of param groups whose layout was checked
        self.payloads: dict[int, torch.Tensor] = {}

    def payload(self, bucket: Any) -> torch.Tensor:
        """The reduction buffer of ``bucket``: its elements, then the tail (see :data:`_TAIL`)."""
        n = len(bucket.params)
        size = sum(t.numel() for t in bucket.locals)
        key = (id(bucket), size, n)
        t = self.payloads.get(key)
        if t is None:
            t = torch.zeros(size + _TAIL + -(-2 * n // _TAIL) * _TAIL, dtype=bucket.compute_dtype, device=bucket.device)
            self.payloads = {k: v for k, v in self.payloads.items() if k[0] != id(bucket)}
            self.payloads[key] = t
        return t


def _replica(opt: Any) -> _Replica:
    rep = getattr(opt, "_badm_replica", None)
    if rep is None or rep.group is not opt.process_group:
        rep = _Replica(opt)
        opt._badm_replica = rep
    return rep


def _all_gather(t: torch.Tensor, rep: _Replica) -> torch.Tensor:
    """``(world, *t.shape)`` on the CPU: ``t`` of every rank of the group."""
    t = t.to(rep.device)
    out = [torch.empty_like(t) for _ in range(rep.world)]
    dist.all_gather(out, t, group=rep.group)
    return torch.stack(out).cpu()


def _raw_weights(weights: Any, sub_batches: int) -> list[float]:
    """This rank's sub-batch weights, not normalised (the optimizer validated them already)."""
    if weights is None:
        return [1.0] * sub_batches
    if isinstance(weights, torch.Tensor):
        return weights.detach().cpu().double().tolist()
    return [float(x) for x in weights]


def _ranks(mask: torch.Tensor) -> list[int]:
    return [int(r) for r in torch.nonzero(mask).flatten()]


# ------------------------------------------------------------------------- construction
def _checksums(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two exact integer checksums of ``t``'s bits: their sum and a position-weighted sum.

    Integer sums wrap modulo 2**64 whatever the reduction order, so equal tensors give equal
    checksums on every rank, whatever its thread count or device.
    """
    bits = t.detach().reshape(-1).view(_BITS[t.dtype])
    plain = bits.sum(dtype=torch.int64)
    weighted = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start : start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=t.device) % 65521 + 1
        weighted += (chunk * pos).sum()
    return plain, weighted


def _size(bucket: Any) -> int:
    return sum(t.numel() for t in bucket.locals)


def _layout(opt: Any) -> tuple[list[tuple[int, int, Any]], torch.Tensor, torch.Tensor, list[list[str]]]:
    """(buckets, header, per-bucket layout rows, per-bucket parameter names) of this rank."""
    bufs = [(g, j, buf) for g, group_bufs in enumerate(opt._buckets()) for j, buf in enumerate(group_bufs)]
    overlap = getattr(opt, "_overlap", None)
    header = torch.tensor(
        [len(opt.param_groups), len(bufs), sum(_size(b) for _, _, b in bufs), _NONFINITE_CODES[opt.on_nonfinite],
         int(overlap is not None), overlap.cap_bytes if overlap is not None else 0],
        dtype=torch.int64,
    )
    rows, names = [], []
    for g, j, buf in bufs:
        index = {id(p): k for k, p in enumerate(opt.param_groups[g]["params"])}
        shapes = repr([tuple(p.shape) for p in buf.params]).encode()
        rows.append([g, j, _size(buf), _DTYPE_CODES[buf.dtype], len(buf.params), zlib.crc32(shapes)])
        names.append([f"parameter {index[id(p)]} of param group {g} (shape {tuple(p.shape)})" for p in buf.params])
    return bufs, header, torch.tensor(rows, dtype=torch.int64).reshape(len(bufs), 6), names


def check_replicas(opt: Any) -> None:
    """Check that every rank of ``opt.process_group`` holds the same parameter layout and the
    same weights; raise RuntimeError on every rank otherwise.

    Called by :class:`badm_fast.BADM` at construction (and at the next step after
    ``add_param_group``); call it yourself to verify that the replicas still agree, e.g.
    after loading a checkpoint. Two ``all_gather`` calls of a few integers per parameter.
    """
    rep = _replica(opt)
    bufs, header, rows, names = _layout(opt)
    headers = _all_gather(header, rep)
    bad = _ranks((headers != headers[0]).any(dim=1))
    if bad:
        nf = {v: k for k, v in _NONFINITE_CODES.items()}

        def describe(h: torch.Tensor) -> str:
            g, b, n, f, ovl, cap = (int(x) for x in h)
            comm = f"overlap=True, bucket_cap_mb={cap / 2**20:g}" if ovl else "overlap=False"
            return f"{g} param groups, {b} buckets, {n} elements, {comm}, on_nonfinite={nf.get(f, f)!r}"

        raise RuntimeError(
            f"BADM(process_group=...): the ranks disagree on the parameter layout: rank 0 has {describe(headers[0])}; "
            + "; ".join(f"rank {r} has {describe(headers[r])}" for r in bad)
            + " (build the model and the optimizer identically on every rank; only sub_batches may differ)"
        )
    sums = []
    for _, _, buf in bufs:
        for t in buf.locals:
            sums.extend(_checksums(t))
    local = torch.cat([rows.flatten(), torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.int64)])
    every = _all_gather(local, rep)
    n_layout = rows.numel()
    layouts = every[:, :n_layout].reshape(rep.world, len(bufs), 6)
    dtypes = {v: k for k, v in _DTYPE_CODES.items()}
    for k, (g, j, buf) in enumerate(bufs):
        bad = _ranks((layouts[:, k] != layouts[0, k]).any(dim=1))
        if bad:

            def describe(row: torch.Tensor) -> str:
                n_params, size, code = int(row[4]), int(row[2]), int(row[3])
                return f"{n_params} parameters, {size} elements, {dtypes.get(code, code)}"

            raise RuntimeError(
                f"BADM(process_group=...): the ranks disagree on the parameter layout of param group {g} "
                f"(bucket {j}): rank 0 has {describe(layouts[0, k])}"
                + "".join(f"; rank {r} has {describe(layouts[r, k])}" for r in bad)
                + (
                    " (same sizes, different shapes)"
                    if all(torch.equal(layouts[r, k, :5], layouts[0, k, :5]) for r in bad)
                    else ""
                )
                + "; build the model and the optimizer identically on every rank"
            )
    checks = every[:, n_layout:].reshape(rep.world, -1, 2)
    flat_names = [name for per_buf in names for name in per_buf]
    for i, name in enumerate(flat_names):
        bad = _ranks((checks[:, i] != checks[0, i]).any(dim=1))
        if bad:
            raise RuntimeError(
                f"BADM(process_group=...): the initial weights differ across ranks: {name} on rank(s) {bad} "
                "differs from rank 0. Start every rank from the same weights (the same seed, or load rank 0's "
                "state_dict into the model) before creating the optimizer"
            )
    rep.checked_groups = len(opt.param_groups)


# ----------------------------------------------------------------------------------- step
def layout_checked(opt: Any) -> bool:
    """Whether the layout check covers every param group (none was added since)."""
    return _replica(opt).checked_groups == len(opt.param_groups)


def check_layout(opt: Any) -> None:
    """The layout check of :func:`check_replicas` again after ``add_param_group`` (a collective)."""
    if not layout_checked(opt):
        check_replicas(opt)


def agree(opt: Any, flags: dict[torch.device, torch.Tensor]) -> None:
    """Make every rank refuse the step when one of them must: one small all-reduce of one flag per
    rank (the layout check runs first after add_param_group). Records the refusing ranks in
    ``opt._refusing_ranks`` for the error message."""
    rep = _replica(opt)
    check_layout(opt)
    if not flags:
        return
    mine = torch.stack([f.reshape(()).to(rep.device) for f in flags.values()]).amax()
    every = torch.zeros(rep.world, dtype=torch.float32, device=rep.device)
    every[rep.rank] = (mine != 0).to(torch.float32)
    dist.all_reduce(every, group=rep.group)
    opt._refusing_ranks = every
    bad = (every != 0).any().to(torch.float32).reshape(1)
    for f in flags.values():
        f.copy_(torch.maximum(f, bad.to(f.device)))


def refusal_message(opt: Any, where: str) -> str:
    """The error of a step refused with on_nonfinite="raise", as this rank says it."""
    rep = _replica(opt)
    ranks = _ranks(getattr(opt, "_refusing_ranks", torch.zeros(rep.world)).cpu() != 0)
    if rep.rank in ranks:
        return (
            f"rank {rep.rank}: non-finite gradient {where}; the step was refused on every rank and weights and "
            "duals are unchanged"
        )
    return (
        f"rank(s) {ranks} refused the step (a non-finite gradient; their errors name it); the step was refused on "
        "every rank and weights and duals are unchanged"
    )


# ------------------------------------------------------------------ FSDP2 (DTensor parameters)
def mesh_reduce_(t: torch.Tensor, mesh: Any, placements: tuple, op: str) -> None:
    """Reduce ``t`` in place over a DTensor bucket's device mesh.

    ``op="max"``: over every mesh dimension, so that every rank holding a shard of the parameters
    or a replica of them takes the same decision (the refusal flag). ``op="sum"``: over the
    dimensions the parameters are sharded on only (the shards' partial sums of the residuals or
    of a norm; replicas hold copies and are not counted twice). One small all-reduce per mesh
    dimension; nothing is read on the host.
    """
    reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    for dim, placement in enumerate(placements):
        if op == "max" or placement.is_shard():
            dist.all_reduce(t, op=reduce_op, group=mesh.get_group(dim))


def sharded_total_norm(local_norms: list[tuple[torch.Tensor, Any, tuple]], norm_type: float) -> torch.Tensor:
    """The total ``norm_type``-norm from per-bucket local norms ``(norm, mesh, placements)``
    (mesh None: a plain bucket, nothing to reduce): ``(sum_r n_r^p)^(1/p)``, or the max for inf;
    summed in float64, returned in the dtype of the first local norm (as torch's total norm)."""
    inf = math.isinf(norm_type)
    total = None
    for norm, mesh, placements in local_norms:
        part = norm.to(torch.float64) if inf else norm.to(torch.float64) ** norm_type
        if mesh is not None:
            part = part.clone()
            mesh_reduce_(part, mesh, placements, "max" if inf else "sum")
        if total is None:
            total = part
        else:
            total = torch.maximum(total, part.to(total.device)) if inf else total + part.to(total.device)
    assert total is not None
    return (total if inf else total ** (1.0 / norm_type)).to(local_norms[0][0].dtype)


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive segments of ``flat`` laid out like the tensors of ``like``."""
    out, off = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[off : off + n].as_strided(t.shape, t.stride()) if n else flat[off:off].view(t.shape))
        off += n
    return out


class Contribution:
    """What :func:`contribute` left for :func:`finish`: the payload's views and the duals saved for the
    parameters this rank gave no gradient (restored if no rank gave them one)."""

    __slots__ = ("payload", "P", "delta", "used", "unused_res", "saved", "residuals")

    def __init__(self, payload, P, delta, used, unused_res, saved, residuals):
        self.payload = payload
        self.P = P
        self.delta = delta
        self.used = used
        self.unused_res = unused_res
        self.saved = saved
        self.residuals = residuals


@torch.no_grad()
def contribute(
    opt: Any,
    bucket: Any,
    payload: torch.Tensor,
    group: dict[str, Any],
    grads: list[torch.Tensor | None],
    hyper: torch.Tensor,
    raw_weights: list[float],
    residuals: bool,
    found_inf: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
) -> Contribution:
    r"""This rank's part of one bucket's step, written into ``payload`` (ready for the all-reduce):
    the kernel over this rank's rows with the unnormalised ``raw_weights`` adds
    :math:`\delta_r` to the zeroed payload and updates the duals in place; the tail gets
    :math:`W_r`, the residual share (``residuals``) and which parameters got a gradient here.

    ``bucket`` has ``params``, ``locals``, ``duals`` (``R*N`` rows), ``rows``, ``device`` and
    ``compute_dtype`` (a :class:`badm_fast.layout.Bucket`, or the part of one that a comm bucket of
    :mod:`badm_fast.overlap` holds); ``grads`` are its ``R*N`` gradient rows (None = none)."""
    local_w = [sum(raw_weights)] if opt.mode == "merged" else list(raw_weights)
    cdt = bucket.compute_dtype
    n, R = len(bucket.params), bucket.rows
    P = _size(bucket)
    payload.zero_()
    delta = _views(payload[:P], bucket.locals)
    used = payload[P + _TAIL : P + _TAIL + n]  # 1 where this rank gave the parameter a gradient
    unused_res = payload[P + _TAIL + n : P + _TAIL + 2 * n]
    w = opt._weights_tensor(local_w, bucket.device, cdt)  # the same cache as the single-process step
    step_fn = opt._fns[bucket.device.type][0]
    rows = [None if g is None else (g if g.dtype == cdt else g.to(cdt)) for g in grads]
    wd = float(group["weight_decay"])
    if wd != 0.0:  # the kernel's wd*z would read the zero payload: add the decay to the gradients here
        sign = -1.0 if group["maximize"] else 1.0
        zs = [t.to(cdt) for t in bucket.locals]
        rows = [None if g is None else g + (sign * wd) * zs[k % n] for k, g in enumerate(rows)]
        hyper = hyper.clone()
        hyper[2] = 0.0
    touched = [rows[i] is not None for i in range(n)]
    res = torch.zeros(2, dtype=torch.float64, device=bucket.device) if residuals else None
    step_fn(delta, rows, bucket.duals, w, hyper, res, found_inf, inv_scale)
    saved = []
    if not all(touched):
        # Zero gradient in every local row; undone in finish() if no rank touched the parameter.
        idx = [i for i in range(n) if not touched[i]]
        zeros = [torch.zeros_like(delta[i]) for i in idx]
        sub_rows = [zeros[j] for _ in range(R) for j in range(len(idx))]
        sub_duals = [bucket.duals[r * n + i] for r in range(R) for i in idx]
        saved = [(i, [bucket.duals[r * n + i].clone() for r in range(R)]) for i in idx]
        for j, i in enumerate(idx):
            res_i = torch.zeros(2, dtype=torch.float64, device=bucket.device) if residuals else None
            step_fn([delta[i]], [sub_rows[j]] * R, [sub_duals[r * len(idx) + j] for r in range(R)], w, hyper, res_i,
                    found_inf, inv_scale)
            if res_i is not None:
                unused_res[i] = res_i[0]
    used.copy_(torch.tensor([1.0 if t else 0.0 for t in touched], dtype=cdt))
    payload[P] = sum(local_w)
    if res is not None:
        payload[P + 1] = res[0]
    return Contribution(payload, P, delta, used, unused_res, saved, residuals)


@torch.no_grad()
def finish(
    bucket: Any, c: Contribution, residuals: torch.Tensor | None, found_inf: torch.Tensor | None
) -> None:
    r"""After the all-reduce of ``c.payload``: the duals of parameters no rank gave a gradient are
    restored, ``residuals`` (float64 ``(2,)``, optional; needs a contribution with residuals) gets
    the bucket's global ``[sum_s alpha_s ||w_s' - z||^2, ||z' - z||^2]`` added, and
    :math:`z \leftarrow z + \delta / W` (unless ``found_inf`` is set). The delta columns of the
    payload are overwritten on the way."""
    payload, P, delta, used = c.payload, c.P, c.delta, c.used
    n, R = len(bucket.params), bucket.rows
    cdt = bucket.compute_dtype
    inv_w = payload[P : P + 1].reciprocal()
    untouched = set()  # parameters no rank gave a gradient: their weights and duals stay
    if c.saved:
        users = used.cpu()
        for i, duals in c.saved:
            if users[i] == 0:
                untouched.add(i)
                for r in range(R):
                    bucket.duals[r * n + i].copy_(duals[r])
                delta[i].zero_()
    if residuals is not None:
        iw = inv_w.double()
        primal = (payload[P + 1] + (c.unused_res * (used > 0)).sum()).double() * iw
        dual = torch.linalg.vector_norm(payload[:P], dtype=torch.float64).square() * iw.square()
        part = torch.cat([primal.reshape(1), dual.reshape(1)])
        if found_inf is not None:
            part = torch.where(found_inf.reshape(()) != 0, torch.zeros_like(part), part)
        residuals += part
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    if skip is not None and skip.device.type == "cpu":  # the host reads the decision anyway: no torch.where over P
        if bool(skip):
            return
        skip = None
    scale = inv_w.reshape(())
    for k, (z, d) in enumerate(zip(bucket.locals, delta)):
        if k in untouched:
            continue
        # z + delta / W in the compute dtype without a temporary of the parameter's size: delta / W in
        # place in the payload, then added to z (the same sum either way round), or for bf16/fp16 z (or
        # a refusal decided on the device) summed in the payload and rounded once to z's dtype
        d.mul_(scale)
        if skip is None and z.dtype == cdt:
            z.add_(d)
        else:
            d.add_(z if z.dtype == cdt else z.to(cdt))
            z.copy_(d if skip is None else torch.where(skip, z, d.to(z.dtype)))


@torch.no_grad()
def bucket_step(
    opt: Any,
    bucket: Any,
    group: dict[str, Any],
    grads: list[torch.Tensor | None],
    hyper: torch.Tensor,
    residuals: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
) -> None:
    """The distributed fused step of one bucket without overlap: :func:`contribute` (this rank's
    rows through the kernel into the payload), one all-reduce, then :func:`finish`
    (``z += delta / W``). ``grads`` are the bucket's gradients as the step's plan gathered them
    (``R*N``, None = none). ``residuals`` (optional, float64 ``(2,)``) gets the global
    ``[sum_s alpha_s ||w_s' - z||^2, ||z' - z||^2]`` of this bucket added, like the kernel
    contract's residuals."""
    rep = _replica(opt)
    raw = _raw_weights(getattr(opt, "_raw_step_weights", None), opt.sub_batches)
    c = contribute(opt, bucket, rep.payload(bucket), group, grads, hyper, raw, residuals is not None, found_inf,
                   inv_scale)
    dist.all_reduce(c.payload, group=rep.group)
    finish(bucket, c, residuals, found_inf)


# ---------------------------------------------------------------------------- checkpoints
def _serialize(obj: Any) -> torch.Tensor:
    stream = io.BytesIO()
    torch.save(obj, stream)
    return torch.frombuffer(bytearray(stream.getvalue()), dtype=torch.uint8)


def _deserialize(data: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=True)


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples) with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def _send(obj: Any, dst: int, rep: _Replica) -> None:
    data = _serialize(obj)
    peer = dist.get_global_rank(rep.group, dst)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64).to(rep.device), peer, group=rep.group)
    dist.send(data.to(rep.device), peer, group=rep.group)


def _recv(src: int, rep: _Replica) -> Any:
    peer = dist.get_global_rank(rep.group, src)
    size = torch.zeros(1, dtype=torch.int64, device=rep.device)
    dist.recv(size, peer, group=rep.group)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=rep.device)
    dist.recv(data, peer, group=rep.group)
    return _deserialize(data)


def _require_group(opt: Any) -> _Replica:
    if getattr(opt, "process_group", None) is None:
        raise ValueError("this optimizer has no process_group; use opt.state_dict() / opt.load_state_dict()")
    return _replica(opt)


def gather_state_dict(opt: Any, dst: int = 0) -> dict[str, Any] | None:
    """Collect every rank's optimizer state on rank ``dst`` (a collective: call it on every
    rank of the optimizer's process group).

    Returns, on rank ``dst``, one checkpoint dict ``{"format": ..., "version": ..., "world_size":
    N, "ranks": [state_dict of rank 0, ..., of rank N-1]}`` whose tensors are on the CPU (save
    it with ``torch.save``; it loads with ``torch.load(weights_only=True)``); ``None`` on the
    other ranks. Each entry is that rank's :meth:`BADM.state_dict`: its own duals and sub-batch
    count. Together with the model's ``state_dict`` of any rank (the weights are the same on
    every rank) it resumes the distributed run exactly, see :func:`scatter_state_dict`.
    """
    rep = _require_group(opt)
    if not 0 <= dst < rep.world:
        raise ValueError(f"dst={dst} is not a rank of the process group (size {rep.world})")
    mine = to_cpu(opt.state_dict())
    if rep.rank != dst:
        _send(mine, dst, rep)
        return None
    ranks: list[Any] = [None] * rep.world
    ranks[dst] = mine
    for r in range(rep.world):
        if r != dst:
            ranks[r] = _recv(r, rep)
    return {"format": CHECKPOINT_FORMAT[0], "version": CHECKPOINT_FORMAT[1], "world_size": rep.world, "ranks": ranks}


def scatter_state_dict(opt: Any, checkpoint: dict[str, Any] | None, src: int = 0) -> None:
    """Load a checkpoint of :func:`gather_state_dict` into the optimizer of every rank (a
    collective: call it on every rank; ``checkpoint`` is used on rank ``src`` only, the other
    ranks may pass ``None``). Rank ``r`` loads entry ``r``.

    Raises on every rank, and leaves every rank's optimizer as it was, when the checkpoint is
    not one of :func:`gather_state_dict`, was saved by a group of another size, or does not
    fit some rank's optimizer (that rank's error names the mismatch). Load the model's weights
    on every rank separately (``model.load_state_dict``). When every rank can read the
    checkpoint file, ``opt.load_state_dict(checkpoint["ranks"][rank])`` on each rank does the
    same without communication.
    """
    rep = _require_group(opt)
    if not 0 <= src < rep.world:
        raise ValueError(f"src={src} is not a rank of the process group (size {rep.world})")
    status = torch.zeros(2, dtype=torch.int64)  # [number of ranks in the checkpoint or -1, version]
    if rep.rank == src:
        ok = (
            isinstance(checkpoint, dict)
            and checkpoint.get("format") == CHECKPOINT_FORMAT[0]
            and isinstance(checkpoint.get("ranks"), list)
        )
        version = checkpoint.get("version") if ok else None
        status[0] = len(checkpoint["ranks"]) if ok else -1
        status[1] = version if isinstance(version, int) else -1
    status = status.to(rep.device)
    dist.broadcast(status, dist.get_global_rank(rep.group, src), group=rep.group)
    n, version = (int(x) for x in status.cpu())
    if n < 0:
        raise ValueError(f"scatter_state_dict: rank {src} was given what is not a checkpoint of gather_state_dict")
    if version != CHECKPOINT_FORMAT[1]:
        raise ValueError(f"scatter_state_dict: unsupported checkpoint version {version} (this badm_fast reads 1)")
    if n != rep.world:
        raise ValueError(
            f"scatter_state_dict: the checkpoint holds the optimizer states of {n} ranks, this process group has "
            f"{rep.world}"
        )
    if rep.rank == src:
        for r in range(rep.world):
            if r != src:
                _send(checkpoint["ranks"][r], r, rep)
        mine = checkpoint["ranks"][src]
    else:
        mine = _recv(src, rep)
    before = opt.state_dict()
    error = None
    try:
        opt.load_state_dict(mine)
    except Exception as exc:  # reported on every rank below
        error = exc
    flags = torch.zeros(rep.world, dtype=torch.int32)
    flags[rep.rank] = int(error is not None)
    flags = flags.to(rep.device)
    dist.all_reduce(flags, group=rep.group)
    failed = _ranks(flags.cpu())
    if error is not None:
        raise ValueError(f"scatter_state_dict: rank {rep.rank} could not load its state: {error}") from error
    if failed:
        opt.load_state_dict(before)
        raise ValueError(
            f"scatter_state_dict: rank(s) {failed} could not load their state (their errors say why); "
            "every rank's optimizer was left as it was"
        )
