"""Shared parity machinery: every kernel back end against :mod:`badm_fast.reference`.

A case is a list of parameter tensors of several sizes (fresh random data per seed), their
gradient rows and duals, weights and a hyperparameter tensor whose values are not exact in fp32.
Every tensor is a view into a larger buffer whose other elements are NaN (the poison): a kernel
that reads outside its tensors yields NaN, one that writes there removes the poison.

The contract promises the reference's bits in every dtype (same constants, same operation order,
no contraction, round to nearest even), so steps are compared bit for bit (:func:`raw_bits`:
signed zeros and infinities included, NaN payloads aside); residual sums are reduced in a back
end's own fixed order and compared with RESIDUAL_RTOL. TOLERANCES and LOWP_FACTOR are the table
for comparisons with an fp64 evaluation (tests/test_properties.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from badm_fast import backends, reference

# (rtol, atol) for values stored in each dtype, comparing a computation to the fp64 oracle:
# a few ulps of the storage dtype for fp32/fp64; two ulps for bf16/fp16 (the fp32 result is
# rounded once, and a value within an ulp of a rounding boundary may round either way).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.bfloat16: (2 * 2.0**-8, 2 * 2.0**-8),
    torch.float16: (2 * 2.0**-11, 2 * 2.0**-11),
}

# Low-precision rule: the error against the fp64 oracle may be at most LOWP_FACTOR times the
# error of the reference run in the same storage dtype, plus the absolute floor of the table.
LOWP_FACTOR = 2.0

# Residual sums: float64 partial sums of compute-dtype terms, added in another order than the
# reference's; the relative difference is bounded by the number of terms times the fp64 epsilon
# (1e5 elements * 2.2e-16), with margin.
RESIDUAL_RTOL = 1e-9

ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SIZE_MIXES = {
    "empty-and-tiny": [0, 1, 7],
    "aligned-and-odd": [4096, 4097, 33],
    "large": [100003],
    "many-small": [5, 16, 17, 64, 3] * 6,
}
ROWS = [1, 2, 3, 8]
PAD = 5  # poisoned elements after every tensor


@dataclass
class Case:
    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    duals: list[torch.Tensor]
    weights: torch.Tensor
    hyper: torch.Tensor
    buffers: list[torch.Tensor]  # the poisoned buffers behind every view

    def clone(self) -> Case:
        """A deep copy whose views sit in copies of the same poisoned buffers (every view starts
        its own buffer)."""
        buffers = [b.clone() for b in self.buffers]
        it = iter(buffers)

        def twin(t):
            buf = next(it)
            return None if t is None else buf[: t.numel()].view(t.shape)

        params = [twin(t) for t in self.params]
        grads = [twin(t) for t in self.grads]
        duals = [twin(t) for t in self.duals]
        return Case(params, grads, duals, self.weights.clone(), self.hyper.clone(), buffers)


def _poisoned(n: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0):
    """A NaN buffer of ``n + PAD`` elements and a view of its first ``n``, filled with random values."""
    buf = torch.full((n + PAD,), float("nan"), dtype=dtype)
    buf[:n] = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return buf, buf[:n]


def make_case(sizes, rows: int, dtype: torch.dtype, seed: int = 0, weight_decay: float = 0.0,
              maximize: bool = False, skip: tuple[int, ...] = ()) -> Case:
    """Random inputs of the kernel contract; items whose index is in ``skip`` get no gradient."""
    gen = torch.Generator().manual_seed(seed)
    cdt = reference.compute_dtype(dtype)
    buffers, params, grads, duals = [], [], [], []
    for n in sizes:
        b, t = _poisoned(n, dtype, gen)
        buffers.append(b)
        params.append(t)
    for _ in range(rows):
        for i, n in enumerate(sizes):
            b, t = _poisoned(n, dtype, gen, scale=0.5)
            buffers.append(b)
            grads.append(None if i in skip else t)
    for _ in range(rows):
        for n in sizes:
            b, t = _poisoned(n, cdt, gen, scale=0.5)
            buffers.append(b)
            duals.append(t)
    for r in range(1, rows):
        for i in skip:
            grads[r * len(sizes) + i] = None
    w = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.1
    lr = float(torch.rand((), generator=gen, dtype=torch.float64) * 0.3 + 0.01)  # not exact in fp32
    mu = float(torch.rand((), generator=gen, dtype=torch.float64) * 0.95)
    hyper = reference.hyper_tensor(lr, mu, weight_decay, maximize)
    return Case(params, grads, duals, (w / w.sum()).to(cdt), hyper, buffers)


def run(step, case: Case, residuals: bool = False, found_inf=None, inv_scale=None):
    """Runs ``step`` (a back end's step of the contract) on a copy of ``case``; returns the copy
    and the residual sums (or None)."""
    out = case.clone()
    res = torch.zeros(2, dtype=torch.float64) if residuals else None
    step(out.params, out.grads, out.duals, out.weights, out.hyper, res, found_inf, inv_scale)
    return out, res


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def raw_bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``x`` as integers (signed zeros and infinities distinct), every NaN
    replaced by ``+0.0`` first (NaN payloads aside; compare ``isnan`` separately)."""
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    return x.view(_BITS[x.element_size()])


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """NaNs in the same places and every other element bit for bit (:func:`raw_bits`)."""
    return torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(raw_bits(x), raw_bits(y))


def assert_same_bits(a: Case, b: Case) -> None:
    """Every buffer (views and poison) bit for bit, NaN payloads aside: ``-0.0`` differs from
    ``+0.0`` and an infinity from the largest finite value."""
    for x, y in zip(a.buffers, b.buffers):
        assert torch.equal(torch.isnan(x), torch.isnan(y)), "written outside a tensor, or an element left unwritten"
        assert torch.equal(raw_bits(x), raw_bits(y)), "values differ from the reference"


def cpu_backends():
    """The back ends that run on CPU tensors here, as pytest parameters; ``cpp`` is skipped
    (with the reason) when the extension is not built."""
    ok, reason, _ = backends.availability("cpp", "cpu")
    return ["torch", "cpp" if ok else pytest.param("cpp", marks=pytest.mark.skip(reason=reason))]
