r"""The process-group mode's all-reduce overlapped with the backward pass (``BADM(..., overlap=True)``).

Without overlap (:mod:`badm_fast.distributed`) every payload is reduced in ``step()``, after all
backward passes. With ``overlap=True`` the parameters of every :class:`badm_fast.layout.Bucket`
are cut, in the reverse order of their registration (about the order in which a backward pass
produces their gradients), into *comm buckets* of about ``bucket_cap_mb`` MiB (the first one of
each bucket 1 MiB, as DDP's), each with its own payload (the delta columns and the tail of
:mod:`badm_fast.distributed`) and its own copy of the duals.

When the overlap starts
    Only inside ``with opt.sub_batch(S_r - 1):``, the last local sub-batch: entering it registers a
    ``register_post_accumulate_grad_hook`` on every parameter, leaving it removes them. A plain
    ``loss.backward()`` outside a context (gradient accumulation with ``sub_batches=1``) starts
    nothing: its gradients may still grow before ``step()``. The step's weights are needed
    before the last backward pass: the sub-batches' ``sub_batch(s, weight=w)`` (default 1).

During the backward pass
    When every parameter of comm bucket ``k`` has its gradient and comm buckets ``0..k-1`` were
    started (every rank starts them in the same order), bucket ``k``'s duals are copied aside,
    the kernel runs over its rows into its payload (:func:`badm_fast.distributed.contribute`: the
    duals are updated in place) and ``all_reduce(..., async_op=True)`` starts. What the
    contribution used is recorded: the weights, a GradScaler's scale (that of the previous
    step, see below), the hyperparameters, and each gradient's tensor and version counter (and
    for ``S_r > 1`` the version of the gradient rows). A comm bucket with a parameter that got no
    gradient in this backward pass (unused on this rank) is not complete: it and the ones after
    it start in ``step()``, without overlap.

In ``step()``
    The comm buckets not started yet start (with this step's data), then every rank waits for
    all of them and one small all-reduce of two flags per rank decides:

    - *refuse* (a non-finite gradient on some rank with ``on_nonfinite="raise"``/``"skip"``, or a
      GradScaler's found_inf): every rank copies its duals back from the copy; weights and duals
      are exactly as before, on every rank;
    - *again* (some rank's early contribution no longer matches the step: ``step(weights=...)``
      other than the weights it used, a second backward pass or an edit of a gradient after it
      (clipping after the backward pass, ``zero_grad()``, another ``backward()``), a GradScaler's
      scale that changed, ``residuals=True`` after a step without, hyperparameters changed, the
      parameters changed, ``state_dict()`` in between): every rank copies its duals back and the
      whole step runs again the way ``overlap=False`` runs it (a warning names the reason once);
    - otherwise :func:`badm_fast.distributed.finish` adds ``delta / W`` per comm bucket.

    The kernel is element-wise, so the weights and duals are bit for bit those of
    ``overlap=False`` (the residuals, sums over other groupings, agree to rounding).

A GradScaler's scale is only known in ``step()``; the early contributions unscale with the scale
of the previous step (the scaler changes it rarely), and a step whose scale differs is reduced
again. The one decision read on the host is the price of the overlap on GPUs (one synchronisation
per step).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist

from . import distributed
from .layout import kernel_view

__all__ = ["CommBucket", "Overlap", "FIRST_BUCKET_BYTES"]

FIRST_BUCKET_BYTES = 1 << 20  # the first comm bucket of each bucket, like DDP's first bucket


class _Part:
    """The parameters of one comm bucket as :func:`badm_fast.distributed.contribute` sees a bucket."""

    __slots__ = ("params", "locals", "duals", "rows", "device", "compute_dtype")

    def __init__(self, params, locals_, duals, rows, device, compute_dtype):
        self.params = params
        self.locals = locals_
        self.duals = duals
        self.rows = rows
        self.device = device
        self.compute_dtype = compute_dtype


class CommBucket:
    """Consecutive parameters (in reverse registration order) of one :class:`badm_fast.layout.Bucket`:
    ``sel`` their positions in it, ``pos`` the bucket's position in the step's bucket list, ``g``
    its param group; the payload and the copy of the duals are allocated once."""

    __slots__ = ("bucket", "pos", "g", "sel", "params", "size", "payload", "backup")

    def __init__(self, bucket: Any, pos: int, g: int, sel: list[int]):
        self.bucket = bucket
        self.pos = pos
        self.g = g
        self.sel = sorted(sel)
        self.params = [bucket.params[i] for i in self.sel]
        self.size = sum(bucket.locals[i].numel() for i in self.sel)
        m = len(self.sel)
        cdt = bucket.compute_dtype
        tail = distributed._TAIL + -(-2 * m // distributed._TAIL) * distributed._TAIL
        self.payload = torch.zeros(self.size + tail, dtype=cdt, device=bucket.device)
        duals = self._duals()
        self.backup = distributed._views(torch.empty(bucket.rows * self.size, dtype=cdt, device=bucket.device), duals)

    def _duals(self) -> list[torch.Tensor]:
        b, n = self.bucket, len(self.bucket.params)
        return [b.duals[r * n + i] for r in range(b.rows) for i in self.sel]

    def part(self) -> _Part:
        b = self.bucket
        return _Part(self.params, [b.locals[i] for i in self.sel], self._duals(), b.rows, b.device, b.compute_dtype)

    def rows_of(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """This comm bucket's entries of a bucket's ``R*N`` gradient list."""
        n = len(self.bucket.params)
        return [grads[r * n + i] for r in range(self.bucket.rows) for i in self.sel]


def comm_buckets(layout: list[list[Any]], cap_bytes: int) -> list[CommBucket]:
    """The comm buckets of a layout, in the order they start (every rank derives the same ones).

    The parameters of all buckets are walked in reverse registration order (param group, then
    position in it); each bucket fills its own comm bucket, closed once it holds ``cap_bytes``
    of payload (the first one of each bucket :data:`FIRST_BUCKET_BYTES`); they start in the order
    in which their last parameter comes in that walk."""
    items = []
    flat = [(g, b) for g, bufs in enumerate(layout) for b in bufs]
    for pos, (g, b) in enumerate(flat):
        elem = torch.empty((), dtype=b.compute_dtype).element_size()
        for i, t in enumerate(b.locals):
            items.append(((g, b.index[i]), pos, i, t.numel() * elem))
    items.sort(key=lambda it: it[0], reverse=True)
    open_: dict[int, list[Any]] = {}
    closed: dict[int, int] = {}
    out: list[tuple[tuple[int, int], CommBucket]] = []
    for key, pos, i, nbytes in items:
        cur = open_.setdefault(pos, [[], 0])
        cur[0].append(i)
        cur[1] += nbytes
        limit = min(FIRST_BUCKET_BYTES, cap_bytes) if closed.get(pos, 0) == 0 else cap_bytes
        if cur[1] >= limit:
            g, b = flat[pos]
            out.append((key, CommBucket(b, pos, g, cur[0])))
            closed[pos] = closed.get(pos, 0) + 1
            del open_[pos]
    for pos, (sel, _) in open_.items():
        g, b = flat[pos]
        out.append((min((g, b.index[i]) for i in sel), CommBucket(b, pos, g, sel)))
    out.sort(key=lambda o: o[0], reverse=True)
    return [cb for _, cb in out]


class _Launch:
    """One started comm bucket: its all-reduce and what its contribution used."""

    __slots__ = ("cb", "work", "contribution", "part", "grads", "versions", "rows_versions", "hyper", "restored")

    def __init__(self, cb, work, contribution, part, grads, versions, rows_versions, hyper):
        self.cb = cb
        self.work = work
        self.contribution = contribution
        self.part = part
        self.grads = grads
        self.versions = versions
        self.rows_versions = rows_versions
        self.hyper = hyper
        self.restored = False


_REASONS = {
    "weights": "step(weights=...) differs from the weights the early contributions used ({detail}); give every "
               "sub-batch's weight to sub_batch(s, weight=w) and call step() without weights",
    "grads": "a gradient changed after its comm bucket was reduced ({detail}); run one backward pass in the last "
             "sub-batch's context and leave the gradients as it made them until step() (clip with overlap=False)",
    "scale": "the GradScaler's scale differs from the previous step's, with which the early contributions "
             "unscaled the gradients",
    "residuals": "step(residuals=True) after a step without residuals (the early contributions did not compute "
                 "their residual shares)",
    "hyper": "lr, momentum, weight_decay or maximize changed between the last backward pass and step()",
    "layout": "the parameters or their layout changed between the last backward pass and step()",
    "aborted": "{detail}",
}


def _reason(kind: str, detail: str = "") -> tuple[str, str]:
    return kind, _REASONS[kind].format(detail=detail)


class Overlap:
    """The overlap state of one optimizer: its comm buckets and what the current step started."""

    def __init__(self, opt: Any, bucket_cap_mb: float):
        self.opt = opt
        self.cap_bytes = max(1, int(bucket_cap_mb * 2**20))
        self._layout_obj: Any = None
        self._comm: list[CommBucket] = []
        self.last_inv: torch.Tensor | None = None  # the GradScaler inverse scale of the previous step
        self.last_residuals = True  # the first step computes the residual shares, in case it is asked for them
        self.warned: set[str] = set()
        self.steps_overlapped = 0  # steps whose early contributions were used as they were
        self.steps_again = 0  # steps reduced again without overlap
        self.early_starts = 0  # comm buckets started during a backward pass, over all steps
        self._reset()

    # ------------------------------------------------------------------ bookkeeping
    def _reset(self) -> None:
        self.handles: list[Any] = []
        self.launches: dict[int, _Launch] = {}
        self.comm: list[CommBucket] | None = None  # the comm buckets this step's launches belong to
        self.param_cb: dict[int, int] = {}
        self.pending: list[int] = []
        self.ready: set[int] = set()
        self.next = 0
        self.raw: list[float] | None = None
        self.inv: torch.Tensor | None = None
        self.want_residuals = False
        self.hypers: list[torch.Tensor] = []
        self.invalid: tuple[str, str] | None = None
        self.flags: dict[torch.device, torch.Tensor] = {}
        self.stop = False

    def comm_buckets(self) -> list[CommBucket]:
        """The comm buckets of the optimizer's current layout (derived again when it changes)."""
        layout = self.opt._buckets()
        if layout is not self._layout_obj:
            self._comm = comm_buckets(layout, self.cap_bytes)
            self._layout_obj = layout
        return self._comm

    def _flag(self, device: torch.device) -> torch.Tensor:
        f = self.flags.get(device)
        if f is None:
            f = torch.zeros(1, dtype=torch.float32, device=device)
            self.flags[device] = f
        return f

    def _invalidate(self, reason: tuple[str, str]) -> None:
        if self.invalid is None:
            self.invalid = reason

    # ------------------------------------------------------------------ the last sub-batch's context
    def arm(self) -> None:
        """Entering ``sub_batch(S_r - 1)``: register the hooks, unless this step started already or
        the step's inputs are not known yet (then everything happens in step())."""
        opt = self.opt
        if self.launches or self.handles or torch.compiler.is_compiling():
            return
        if not distributed.layout_checked(opt):  # add_param_group: step() checks the layout first
            return
        raw = opt._context_raw_weights()
        if not all(math.isfinite(w) and w >= 0 for w in raw) or not any(w > 0 for w in raw):
            return  # step() raises the weights' error
        if opt._rows == 1 and (opt._step_count == 0 or not opt._native):
            try:
                opt._revalidate()  # a model moved or cast before the first step gets fresh state (as step() does)
            except RuntimeError:
                return  # step() raises it
        layout = opt._buckets()
        if opt._rows > 1 and any(rec.state[-1] == 1 for bufs in layout for b in bufs for rec in b.records):
            return  # the last row holds a gradient already: this context adds to it
        try:
            hypers = [opt._group_hyper(g, group, b.device)
                      for g, (group, bufs) in enumerate(zip(opt.param_groups, layout)) for b in bufs]
        except (ValueError, RuntimeError):
            return  # step() raises it
        comm = self.comm_buckets()
        self.comm = comm
        self.raw = raw
        self.inv = self.last_inv
        self.want_residuals = self.last_residuals
        self.hypers = hypers
        self.pending = [len(cb.sel) for cb in comm]
        self.param_cb = {id(p): k for k, cb in enumerate(comm) for p in cb.params}
        for cb in comm:
            for p in cb.params:
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def disarm(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def before_absorb(self) -> None:
        """``S_r > 1``, when the last context ends: rows written since their comm bucket started (by
        ``set_grads``, ``opt.clip_grad_norm_``, a row view of ``sub_batch_grad``) make it stale."""
        for launch in self.launches.values():
            if launch.contribution is None:
                continue
            for j, p in enumerate(launch.part.params):
                if self.opt._records[id(p)].rows._version != launch.rows_versions[j]:
                    self._invalidate(_reason("grads", "gradient rows written in the last sub-batch's context"))

    def after_absorb(self) -> None:
        """``S_r > 1``, after the last context copied ``.grad`` into its row: a gradient that is still
        the one the contribution read makes the row write legitimate (its version is taken again)."""
        for launch in self.launches.values():
            if launch.contribution is None:
                continue
            for j, p in enumerate(launch.part.params):
                g = p.grad
                if g is launch.grads[j] and g is not None and g._version == launch.versions[j]:
                    launch.rows_versions[j] = self.opt._records[id(p)].rows._version
                else:
                    self._invalidate(_reason("grads", "in the last sub-batch's context, after its backward pass"))

    def _hook(self, p: torch.Tensor) -> None:
        k = self.param_cb.get(id(p))
        if k is None or self.stop:
            return
        if k in self.launches:
            self._invalidate(_reason("grads", "a second backward pass in the last sub-batch's context"))
            return
        if id(p) not in self.ready:
            self.ready.add(id(p))
            self.pending[k] -= 1
        while not self.stop and self.next < len(self.comm) and self.pending[self.next] == 0:
            if not self._launch_early(self.next):
                self.stop = True
                break
            self.next += 1
            self.early_starts += 1

    # ------------------------------------------------------------------ starting a comm bucket
    @torch.no_grad()
    def _launch_early(self, k: int) -> bool:
        opt = self.opt
        cb = self.comm[k]
        b = cb.bucket
        grads = [p.grad for p in cb.params]
        if any(g is None or g.layout != torch.strided for g in grads):
            return False  # step() raises the sparse-gradient error
        kv = [kernel_view(g) for g in grads] if b.complex else grads
        R = b.rows
        if R == 1:
            rows = list(kv)
        else:
            records = [opt._records[id(p)] for p in cb.params]
            for rec in records:  # rows without a gradient are zero (as step()'s _prepare_rows makes them)
                for r in range(R - 1):
                    if rec.state[r] != 1:
                        rec.rows[r].zero_()
                        rec.state[r] = 1
            rows = cb.rows_of(b.grad_rows)[: (R - 1) * len(cb.sel)] + list(kv)
        if opt._check():
            flag = self._flag(b.device)
            if R == 1:
                opt._nonfinite(b, kv, flag)
            elif not opt._rows_fresh:  # rows carried over from an earlier step
                opt._nonfinite(b, rows[: (R - 1) * len(cb.sel)], flag)
        hyper = self.hypers[cb.pos]
        inv = self.inv.to(b.device) if self.inv is not None else None
        self._start(k, rows, opt.param_groups[cb.g], hyper, self.raw, self.want_residuals, inv,
                    grads, [g._version for g in grads],
                    [opt._records[id(p)].rows._version for p in cb.params] if R > 1 else None)
        return True

    def _start(self, k, rows, group, hyper, raw, residuals, inv, grads, versions, rows_versions) -> None:
        cb = self.comm[k]
        part = cb.part()
        torch._foreach_copy_(cb.backup, part.duals)
        launch = _Launch(cb, None, None, part, grads, versions, rows_versions, hyper.clone())
        self.launches[k] = launch  # recorded first: the duals come back from the copy even if the kernel raises
        launch.contribution = distributed.contribute(self.opt, part, cb.payload, group, rows, hyper, raw, residuals,
                                                     None, inv)
        launch.work = dist.all_reduce(cb.payload, group=distributed._replica(self.opt).group, async_op=True)

    # ------------------------------------------------------------------ step()
    def _check_launches(self, raw: list[float], inv: torch.Tensor | None, residuals: bool,
                        plan: Any) -> tuple[str, str] | None:
        """Why the early contributions cannot be used as they are (None: they can)."""
        opt = self.opt
        if self.invalid is not None:
            return self.invalid
        if self.comm is not self.comm_buckets():
            return _reason("layout")
        if raw != self.raw:
            return _reason("weights", f"{raw} against {self.raw}")
        if (inv is None) != (self.inv is None) or (inv is not None and not torch.equal(inv.cpu(), self.inv.cpu())):
            return _reason("scale")
        if residuals and not self.want_residuals:
            return _reason("residuals")
        for k, launch in self.launches.items():
            cb = self.comm[k]
            if not torch.equal(launch.hyper, plan.hypers[cb.pos]):
                return _reason("hyper")
            for j, p in enumerate(cb.params):
                if opt._rows == 1:
                    g = p.grad
                    ok = g is launch.grads[j] and g is not None and g._version == launch.versions[j]
                else:
                    rec = opt._records[id(p)]
                    ok = (rec.left is launch.grads[j] and rec.left_version == launch.versions[j]
                          and rec.rows._version == launch.rows_versions[j])
                if not ok:
                    return _reason("grads", "after the backward pass")
        return None

    def _restore(self) -> None:
        for launch in self.launches.values():
            if not launch.restored:
                launch.restored = True
                torch._foreach_copy_(launch.part.duals, launch.cb.backup)

    def _wait(self) -> None:
        for launch in self.launches.values():
            if launch.work is not None:
                launch.work.wait()
                launch.work = None

    @torch.no_grad()
    def abort(self, detail: str) -> None:
        """Something outside step() needs the step's state as it was (state_dict, load_state_dict, an
        exception): wait for the started all-reduces, copy the duals back, and have step() reduce
        everything again (its collectives still pair with the other ranks')."""
        self.disarm()
        if not self.launches:
            return
        self._wait()
        self._restore()
        self._invalidate(_reason("aborted", detail))

    @torch.no_grad()
    def step(self, plan: Any, residuals: bool) -> torch.Tensor | None:
        """The step of ``overlap=True``; returns the residual sums like ``BADM._fused_pass`` and sets
        ``plan.flags`` to the agreed refusal for ``BADM._decide``."""
        opt = self.opt
        rep = distributed._replica(opt)
        self.disarm()
        distributed.check_layout(opt)
        raw = distributed._raw_weights(getattr(opt, "_raw_step_weights", None), opt.sub_batches)
        again = self._check_launches(raw, plan.inv, residuals, plan) if self.launches else None
        if self.comm is None:
            self.comm = self.comm_buckets()
        current = self.comm is self.comm_buckets()
        for k in range(self.next, len(self.comm)):  # the comm buckets that did not start early
            cb = self.comm[k]
            if not current:  # the old layout's collectives still pair with the other ranks'
                cb.payload.zero_()
                work = dist.all_reduce(cb.payload, group=rep.group, async_op=True)
                self.launches[k] = _Launch(cb, work, None, cb.part(), [], [], None, None)
                self.launches[k].restored = True
                continue
            b = plan.buckets[cb.pos]
            assert b is cb.bucket, "the step's buckets are not those of the comm buckets"
            rows = cb.rows_of(plan.grads[cb.pos])
            if plan.check and (opt._rows == 1 or plan.recheck_rows):
                opt._nonfinite(b, rows, self._flag(b.device))
            inv = plan.inv.to(b.device) if plan.inv is not None else None
            self._start(k, rows, plan.groups[cb.pos], plan.hypers[cb.pos], raw, residuals, inv, [], [], None)
        self.next = len(self.comm)
        # This rank's refusal: its checks at the starts (and for S_r > 1 those of the rows' copies), a
        # GradScaler's found_inf. A rank that cannot use its early contributions asks for the step
        # again instead, whose own agreement then checks the gradients as they are.
        mine = []
        if again is None:
            if plan.check:
                mine += [f.reshape(()).to(rep.device) for f in self.flags.values()]
                if opt._rows > 1:
                    mine += [f.reshape(()).to(rep.device) for f in plan.flags.values()]
            if isinstance(plan.found_inf, torch.Tensor):
                mine.append(plan.found_inf.reshape(-1)[0].to(device=rep.device, dtype=torch.float32))
            elif plan.found_inf:
                mine.append(torch.ones((), device=rep.device))
        decision = torch.zeros(2 * rep.world, dtype=torch.float32, device=rep.device)
        if mine:
            decision[rep.rank] = (torch.stack(mine).amax() != 0).to(torch.float32)
        decision[rep.world + rep.rank] = 1.0 if again is not None else 0.0
        self._wait()
        dist.all_reduce(decision, group=rep.group)
        decided = decision.cpu()
        refusing, redo = decided[: rep.world], decided[rep.world :]
        opt._refusing_ranks = refusing
        if bool((refusing != 0).any()):
            self._restore()
            if not plan.flags:
                plan.flags.update({d: opt._flag(d) for d in plan.devices})
            for f in plan.flags.values():
                f.fill_(1.0)
            self._done(plan, residuals)
            return None
        if bool((redo != 0).any()):
            self._restore()
            self._warn(again, [r for r in range(rep.world) if redo[r] != 0], rep.rank)
            self._done(plan, residuals)
            self.steps_again += 1
            opt._raise_flags(plan)
            return opt._fused_pass(plan, residuals)
        sums = None
        for k in sorted(self.launches):
            launch, cb = self.launches[k], self.comm[k]
            res = torch.zeros(2, dtype=torch.float64, device=cb.bucket.device) if residuals else None
            distributed.finish(launch.part, launch.contribution, res, None)
            if residuals:
                hyper = plan.hypers[cb.pos]
                lr, mu = hyper[0], hyper[1]
                sigma = torch.where(lr > 0, (1.0 - mu) / torch.where(lr > 0, lr, 1.0), 0.0)
                part = torch.stack((res[0], res[1] * sigma * sigma))
                sums = part if sums is None else sums + part.to(sums.device)
        self.steps_overlapped += 1
        self._done(plan, residuals)
        return sums

    def _done(self, plan: Any, residuals: bool) -> None:
        self.last_inv = plan.inv.detach().clone() if plan.inv is not None else None
        self.last_residuals = residuals
        self._reset()

    def _warn(self, again: tuple[str, str] | None, ranks: list[int], rank: int) -> None:
        kind = again[0] if again is not None else "peer"
        if kind in self.warned or kind == "aborted":
            return
        self.warned.add(kind)
        why = again[1] if again is not None else f"rank(s) {ranks} could not use their early contributions"
        warnings.warn(
            f"BADM(overlap=True), rank {rank}: this step's all-reduce ran again after the backward pass, without "
            f"overlap: {why} (warned once per reason)",
            RuntimeWarning,
            stacklevel=4,
        )
