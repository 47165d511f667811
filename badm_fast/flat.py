"""Flat buffers: the parameters of one (group, device, dtype) viewed into one contiguous buffer.

A :class:`FlatBuffer` owns three buffers of ``P`` columns (the parameters' elements, each
segment padded to a multiple of :data:`ALIGN`):

- ``z``      ``(P,)``     the global weights; every parameter's ``.data`` is a view into it,
- ``grads``  ``(R, P)``   one gradient row per sub-batch (``R = S``, or 1 in merged mode);
                         ``p.grad`` is pointed at a view of the active row,
- ``duals``  ``(R, P)``   the duals ``pi_s`` in the compute dtype (fp32, fp64 for fp64).

Padding elements stay zero in all three buffers (a zero gradient keeps a zero dual zero), so
a kernel may run over the whole buffer.
"""

from __future__ import annotations

import torch

from .reference import compute_dtype

__all__ = ["ALIGN", "FlatBuffer", "SUPPORTED_DTYPES"]

# Segment starts are multiples of 16 elements: at least 32 bytes for every supported dtype,
# so 16-byte vector loads are aligned at every parameter boundary.
ALIGN = 16

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class FlatBuffer:
    """Parameters of one (group, device, dtype), re-pointed into contiguous buffers."""

    def __init__(self, params: list[torch.Tensor], rows: int):
        if not params:
            raise ValueError("FlatBuffer needs at least one parameter")
        self.params = list(params)
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.rows = rows
        self.shapes = [p.shape for p in params]  # as at construction: views keep them
        self.numels = [p.numel() for p in params]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _round_up(n, ALIGN)
        self.size = total
        cdt = compute_dtype(self.dtype)
        self.z = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.grads = torch.zeros(rows, total, dtype=self.dtype, device=self.device)
        self.duals = torch.zeros(rows, total, dtype=cdt, device=self.device)
        with torch.no_grad():
            for p, off, n in zip(self.params, self.offsets, self.numels):
                self.z[off : off + n].copy_(p.detach().reshape(-1))
        # The parameters' own tensors, kept until the optimizer's construction has succeeded.
        self.originals: list[torch.Tensor] | None = [p.data for p in self.params]
        for i, p in enumerate(self.params):
            p.data = self.param_view(i)
        self._grad_views = [[self._row_view(r, i) for i in range(len(params))] for r in range(rows)]
        # Which (row, param) pairs received a gradient since the last zero_grad.
        self.touched = [[False] * len(params) for _ in range(rows)]
        # Rows whose content is stale (after zero_grad(set_to_none=True)): zeroed on first use.
        self.stale = [True] * rows

    # -- views ---------------------------------------------------------------------------
    def _segment(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.numels[i])

    def param_view(self, i: int) -> torch.Tensor:
        return self.z[self._segment(i)].view(self.shapes[i])

    def _row_view(self, r: int, i: int) -> torch.Tensor:
        return self.grads[r, self._segment(i)].view(self.shapes[i])

    def grad_view(self, r: int, i: int) -> torch.Tensor:
        return self._grad_views[r][i]

    def dual_view(self, i: int) -> torch.Tensor:
        """Duals of parameter ``i``: shape ``(rows, *param.shape)``, a view into ``duals``."""
        return self.duals[:, self._segment(i)].view(self.rows, *self.shapes[i])

    # -- bookkeeping ---------------------------------------------------------------------
    def check_binding(self) -> None:
        """Make sure every parameter still lives in ``z``.

        A parameter whose ``.data`` was replaced by a tensor of the same shape, dtype and
        device (``load_state_dict(assign=True)``, ``p.data = ...``) is adopted: its values are
        copied into ``z`` and it is re-pointed. Anything else is an error.
        """
        for i in range(len(self.params)):
            self._check_param(i, adopt=True)

    def _check_param(self, i: int, adopt: bool) -> None:
        p, view = self.params[i], self.param_view(i)
        if p.shape != view.shape or p.dtype != self.dtype or p.device != self.device:
            raise RuntimeError(
                f"parameter {i} of a BADM buffer changed to shape {tuple(p.shape)}, {p.dtype}, {p.device} "
                f"(was {tuple(view.shape)}, {self.dtype}, {self.device}); create the optimizer after "
                "moving or casting the model (model.to(...) before badm_fast.BADM(...))"
            )
        if adopt and p.numel() > 0 and p.data_ptr() != view.data_ptr():
            with torch.no_grad():
                view.copy_(p.detach())
            p.data = view

    def begin_row(self, r: int) -> None:
        """Point every ``p.grad`` at row ``r`` (zeroing the row first if it is stale)."""
        if self.stale[r]:
            self.grads[r].zero_()
            self.stale[r] = False
        for p, view in zip(self.params, self._grad_views[r]):
            p.grad = view

    def absorb_grad(self, r: int, i: int) -> None:
        """Called after autograd accumulated into ``params[i].grad`` for row ``r``.

        When ``p.grad`` is our view, autograd accumulated in place and nothing moves. Otherwise
        (``p.grad`` was None, or autograd replaced it) its value is copied into the row.
        """
        g = self.params[i].grad
        if g is self._grad_views[r][i]:
            self.touched[r][i] = True
        else:
            self.write_grad(r, i, g)

    def check_grad(self, i: int, g: torch.Tensor) -> None:
        """Raise unless ``g`` can be the gradient of parameter ``i``."""
        p = self.params[i]
        self._check_param(i, adopt=False)
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"gradient of parameter {i} must be a tensor, got {type(g).__name__}")
        if g.is_sparse:
            raise RuntimeError(
                f"BADM does not support sparse gradients (parameter {i}, shape {tuple(p.shape)}); "
                "use a dense layer (e.g. nn.Embedding(sparse=False))"
            )
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")

    def write_grad(self, r: int, i: int, g: torch.Tensor) -> None:
        """Set the gradient of parameter ``i`` in row ``r`` to ``g`` and point ``p.grad`` at it."""
        self.check_grad(i, g)
        p = self.params[i]
        if self.stale[r]:
            self.grads[r].zero_()
            self.stale[r] = False
        view = self._grad_views[r][i]
        view.copy_(g)
        p.grad = view
        self.touched[r][i] = True

    def adopt_assigned_grads(self) -> None:
        """Take in gradients assigned directly (``p.grad = g``) since the last backward pass.

        With one row they become row 0; with several rows the sub-batch is unknown, which is an
        error (:meth:`BADM.set_grads` names it).
        """
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None or any(g is views[i] for views in self._grad_views):
                continue
            if self.rows != 1:
                raise RuntimeError(
                    f"the .grad of parameter {i} (shape {tuple(p.shape)}) was assigned outside a sub-batch; "
                    "with several sub-batches use opt.set_grads(s, params, grads) or backward inside opt.sub_batch(s)"
                )
            self.write_grad(0, i, g)

    def zero_grad(self, set_to_none: bool) -> None:
        for p in self.params:
            p.grad = None
        if set_to_none:
            self.stale = [True] * self.rows
            self.touched = [[False] * len(self.params) for _ in range(self.rows)]
        else:
            self.grads.zero_()
            self.stale = [False] * self.rows
            self.touched = [[True] * len(self.params) for _ in range(self.rows)]
            for p, view in zip(self.params, self._grad_views[0]):
                p.grad = view

    def release(self) -> None:
        """Give every parameter its own tensor back (a construction that failed half-way)."""
        for i, p in enumerate(self.params):
            if p.grad is not None and any(p.grad is views[i] for views in self._grad_views):
                p.grad = None
            if p.data_ptr() == self.param_view(i).data_ptr():
                p.data = self.originals[i] if self.originals is not None else self.param_view(i).clone()

    def prepare_rows(self) -> None:
        """Zero stale rows (sub-batches that got no backward pass: their gradient is zero)."""
        for r in range(self.rows):
            if self.stale[r]:
                self.grads[r].zero_()
                self.stale[r] = False

    def active_runs(self) -> list[tuple[int, int]]:
        """Column ranges ``[a, b)`` covering the parameters that received any gradient.

        One range covering the whole buffer in the common case (every parameter has a
        gradient); parameters with no gradient in any row are left out, like torch.optim
        skips parameters whose ``.grad`` is None.
        """
        n = len(self.params)
        has = [any(self.touched[r][i] for r in range(self.rows)) for i in range(n)]
        if all(has):
            return [(0, self.size)]
        runs: list[tuple[int, int]] = []
        for i in range(n):
            if not has[i]:
                continue
            a = self.offsets[i]
            b = self.offsets[i + 1] if i + 1 < n else self.size
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        return runs
