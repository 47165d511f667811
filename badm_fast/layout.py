"""The optimizer's own tensors, beside the user's parameters (which are never re-pointed).

Per parameter that holds state, :class:`BADM` keeps

- ``state[p]["duals"]``: the duals ``pi_s``, shape ``(R, *p.shape)`` in the compute dtype (fp32,
  fp64 for fp64 parameters), with the parameter's own memory layout in every row;
- for ``R > 1`` a private ``(R, *p.shape)`` tensor of gradient rows in the parameter's dtype,
  row ``s`` holding sub-batch ``s``'s gradient (one copy from ``p.grad`` when the sub-batch
  ends, which is also where its non-finite check happens).

A :class:`Bucket` groups the parameters of one (param group, device, dtype) and caches the
argument lists of the kernel contract (:mod:`badm_fast.reference`): the tensors the kernels see
(the local shard for a DTensor), and the row views of the duals and gradient rows. Buckets are
derived from the state and re-derived only when it changes (a parameter gains state, is cast or
moved before the first step, a state is loaded).
"""

from __future__ import annotations

from typing import Any

import torch

from .reference import compute_dtype

__all__ = [
    "SUPPORTED_DTYPES", "Bucket", "GradRecord", "alloc_like", "bucket_key", "is_dense", "kernel_view", "local"
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_DTENSOR: list[Any] = []


def _dtensor_type() -> Any:
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:  # torch without distributed support
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel reads and writes: ``t`` itself, or a DTensor's local shard."""
    return t._local_tensor if is_dtensor(t) else t


def bucket_key(p: torch.Tensor) -> tuple:
    """Parameters of one param group with equal keys share a bucket: same device and dtype of what
    the kernels see, and for DTensors the same device mesh and placements (their reductions run
    over that mesh)."""
    t = kernel_view(p)
    if is_dtensor(p):
        return (t.device, t.dtype, p.device_mesh, tuple(p.placements))
    return (t.device, t.dtype, None, None)


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """What the kernels see of a parameter or gradient: its local shard, as real numbers (a complex
    tensor as its real view with a trailing dimension of 2)."""
    t = local(t)
    return torch.view_as_real(t.detach()) if t.is_complex() else t


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers ``numel`` consecutive elements of memory (any order of its dims)."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expect = 1
    for stride, size in dims:
        if stride != expect:
            return False
        expect *= size
    return True


def alloc_like(p: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros of shape ``(rows, *p.shape)`` in ``dtype`` on ``p``'s device, each row laid out in
    memory like ``p`` (so a kernel may walk ``p``, its gradient and every row in memory order).
    For a DTensor ``p``, a DTensor over the same mesh whose local tensor is laid out like ``p``'s."""
    if is_dtensor(p):
        from torch.distributed.tensor import DTensor, Shard

        loc = alloc_like(p._local_tensor, rows, dtype)
        placements = [Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in p.placements]
        return DTensor.from_local(
            loc, p.device_mesh, placements, run_check=False, shape=(rows, *p.shape),
            stride=(p.numel(), *p.stride()) if p.dim() else (1,),
        )
    n = p.numel()
    if p.is_contiguous():
        return torch.zeros((rows, *p.shape), dtype=dtype, device=p.device)
    flat = torch.zeros(rows * n, dtype=dtype, device=p.device)
    return flat.as_strided((rows, *p.shape), (n, *p.stride()))


class GradRecord:
    """Bookkeeping of one parameter's gradient rows (``R > 1``).

    ``state[r]``: 0 = no gradient in row ``r`` since the rows were cleared, 1 = row holds a
    gradient, 2 = row is zero but present (``zero_grad(set_to_none=False)``; zeroed before use).
    ``left``/``left_version``: the ``.grad`` tensor left on the parameter when its last sub-batch
    ended and its version counter then, to tell ``model.zero_grad()`` or an in-place edit after
    the sub-batch apart from the gradient the rows already hold.
    """

    __slots__ = ("rows", "state", "left", "left_version")

    def __init__(self, rows: torch.Tensor, n_rows: int):
        self.rows = rows
        self.state = [0] * n_rows
        self.left: torch.Tensor | None = None
        self.left_version = 0


class Bucket:
    """The parameters with state of one (group, device, dtype) and their kernel argument lists."""

    __slots__ = (
        "params", "index", "locals", "device", "dtype", "rows", "dtensor", "mesh", "placements", "complex", "duals",
        "grad_rows", "records",
    )

    def __init__(
        self,
        params: list[torch.Tensor],
        index: list[int],
        state: Any,
        records: dict[int, GradRecord] | None,
        rows: int,
    ):
        self.params = params
        self.index = index  # position of each parameter in its param group
        self.dtensor = is_dtensor(params[0])
        # DTensor parameters (FSDP2): every kernel works on the local shards; the step's few scalars
        # (the refusal flag, residual sums, norms) are reduced over the mesh (badm_fast.distributed)
        self.mesh = params[0].device_mesh if self.dtensor else None
        self.placements = tuple(params[0].placements) if self.dtensor else None
        self.complex = params[0].is_complex()
        self.locals = [kernel_view(p) for p in params]
        first = self.locals[0]
        self.device = first.device
        self.dtype = first.dtype
        self.rows = rows
        duals = [local(state[p]["duals"]) for p in params]
        self.duals = [d[r] for r in range(rows) for d in duals]
        if records is not None:
            self.records = [records[id(p)] for p in params]
            grad_rows = [local(rec.rows) for rec in self.records]
            self.grad_rows = [g[r] for r in range(rows) for g in grad_rows]
        else:
            self.records = None
            self.grad_rows = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    def grads(self) -> list[torch.Tensor | None]:
        """The parameters' ``.grad`` as the kernels see them (local shards for DTensors)."""
        if self.dtensor or self.complex:
            return [None if p.grad is None else kernel_view(p.grad) for p in self.params]
        return [p.grad for p in self.params]
