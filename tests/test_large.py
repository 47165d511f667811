"""64-bit indexing in the C++ CPU kernel (torch.ops.badm_fast.fused_step_ext): element offsets
and summed work beyond 2^31.

Two slow tests (marked ``slow``; each skipped, with the reason, when the machine has too
little available memory or the extension is not built):

- one bfloat16 tensor of P = 2^31 + 33 elements, R = 1 (params 4.3 GB, grads 4.3 GB, duals
  fp32 8.6 GB): offsets within one tensor pass 2^31;
- a list of two bfloat16 tensors of 2^30 + 64 and 2^30 + 80 elements, R = 1: each tensor's
  offsets stay below 2^31, the list's total (the work items' running sums) passes it.

The buffers are filled with constants (fast), except for short windows at the places that
matter (the start, around 2^31, the end), which get random values; the expected values of
those windows, and of one constant element per tensor, are computed by the reference on copies
taken before the call and must match bit for bit. Every tensor is a view of a longer buffer
whose extra elements are NaN (the poison) and must stay untouched. The same checks run at a
small size on every test run, so the logic of the slow tests is exercised cheaply.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from badm_fast import reference

GB = 1e9
POISON = 16
WINDOW = 48


@pytest.fixture(scope="module")
def op():
    try:
        import badm_fast._C  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "badm_fast._C":
            raise
        if os.environ.get("BADM_FAST_REQUIRE_EXTENSION") == "1":
            pytest.fail("BADM_FAST_REQUIRE_EXTENSION=1 but badm_fast._C is not built", pytrace=False)
        pytest.skip("badm_fast._C is not built (pure-Python install)")
    return torch.ops.badm_fast.fused_step_ext


def _mem_available() -> float:
    """MemAvailable from /proc/meminfo, in bytes (inf where there is no /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def _require_memory(needed: float) -> None:
    available = _mem_available()
    if available < needed:
        pytest.skip(f"needs about {needed / GB:.1f} GB of available memory, {available / GB:.1f} GB available")


def _footprint(sizes: list[int], R: int, dtype: torch.dtype) -> float:
    itemsize = torch.empty((), dtype=dtype).element_size()
    cdt_size = torch.empty((), dtype=reference.compute_dtype(dtype)).element_size()
    return sum((P + POISON) * (itemsize + R * (itemsize + cdt_size)) for P in sizes)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


def _run(op, sizes: list[int], R: int, dtype: torch.dtype, windows: list[list[int]]) -> None:
    """One op call over len(sizes) tensors with R rows. ``windows[i]`` are the start indices of
    the WINDOW-element windows of tensor i that get random values and are checked."""
    cdt = reference.compute_dtype(dtype)
    gen = torch.Generator().manual_seed(sum(sizes) % 9973 + R)
    nan = float("nan")
    n = len(sizes)
    fulls = []
    params, grads, duals = [], [None] * (R * n), [None] * (R * n)
    try:
        for i, P in enumerate(sizes):
            # torch.empty, then every element written once: the body below, the poison here
            z_full = torch.empty(P + POISON, dtype=dtype)
            z_full[P:] = nan
            z_full[:P].fill_(1.0)
            params.append(z_full[:P])
            fulls.append(z_full)
            for r in range(R):
                g_full = torch.empty(P + POISON, dtype=dtype)
                d_full = torch.empty(P + POISON, dtype=cdt)
                g_full[P:] = nan
                d_full[P:] = nan
                g_full[:P].fill_(0.5 + r)
                d_full[:P].fill_(-0.25 * (r + 1))
                grads[r * n + i], duals[r * n + i] = g_full[:P], d_full[:P]
                fulls += [g_full, d_full]
        w = torch.rand(R, generator=gen, dtype=torch.float64) + 0.1
        weights = (w / w.sum()).to(cdt)
        hyper = reference.hyper_tensor(0.0123, 0.6173, weight_decay=0.0071)

        # random windows; expected values from copies of the windows and of one constant element
        expect = []
        for i, P in enumerate(sizes):
            cols = []
            for a in windows[i]:
                a = max(0, min(a, P - WINDOW))
                b = min(a + WINDOW, P)
                cols.append((a, b))
                params[i][a:b] = torch.randn(b - a, generator=gen).to(dtype)
                for r in range(R):
                    grads[r * n + i][a:b] = torch.randn(b - a, generator=gen).to(dtype)
                    duals[r * n + i][a:b] = torch.randn(b - a, generator=gen).to(cdt)
            const = [c for c in (P // 2, P // 3, 1) if c < P and all(not a <= c < b for a, b in cols)][:1]
            for a, b in [*cols, *((c, c + 1) for c in const)]:
                z = [params[i][a:b].clone()]
                g = [grads[r * n + i][a:b].clone() for r in range(R)]
                d = [duals[r * n + i][a:b].clone() for r in range(R)]
                reference.fused_step_(z, g, d, weights, hyper)
                expect.append((i, a, b, z[0], d))
            if const:  # a sample of constant elements, against the constant element's expected value
                idx = torch.arange(0, P, max(1, P // 4099))
                idx = idx[[all(not a <= int(c) < b for a, b in cols) for c in idx]]
                expect.append((i, idx, None, expect[-1][3], expect[-1][4]))

        op(params, grads, duals, weights, hyper)

        for i, a, b, want_z, want_d in expect:
            if b is None:  # the constant elements
                got_z = params[i][a]
                assert _same_bits(got_z, want_z.expand(a.numel())), f"constant elements of params[{i}] differ"
                for r in range(R):
                    got_d = duals[r * n + i][a]
                    assert _same_bits(got_d, want_d[r].expand(a.numel())), f"constant elements of duals[{r * n + i}]"
                continue
            where = f"params[{i}][{a}:{b}]"
            assert _same_bits(params[i][a:b], want_z), f"{where} differs from the reference"
            for r in range(R):
                assert _same_bits(duals[r * n + i][a:b], want_d[r]), f"duals[{r * n + i}][{a}:{b}] differs"
        for full, P in zip(fulls, [s for s in sizes for _ in range(1 + 2 * R)]):
            assert torch.isnan(full[P:]).all(), "wrote past the end of a tensor"
    finally:
        del params, grads, duals, fulls
        gc.collect()


def _one_tensor_beyond_2_31():
    P = 2**31 + 33
    return dict(sizes=[P], R=1, windows=[[0, 2**31 - WINDOW // 2, 2**31 + 1, P - WINDOW]])


def _list_total_beyond_2_31():
    sizes = [2**30 + 64, 2**30 + 80]
    return dict(sizes=sizes, R=1, windows=[[0, 2**29, sizes[0] - WINDOW], [0, 2**30 - 7, sizes[1] - WINDOW]])


@pytest.mark.slow
def test_one_tensor_beyond_2_31_elements(op):
    case = _one_tensor_beyond_2_31()
    _require_memory(_footprint(case["sizes"], case["R"], torch.bfloat16) + 1.3 * GB)
    _run(op, dtype=torch.bfloat16, **case)


@pytest.mark.slow
def test_list_total_beyond_2_31_elements(op):
    case = _list_total_beyond_2_31()
    assert sum(case["sizes"]) > 2**31 and max(case["sizes"]) < 2**31
    _require_memory(_footprint(case["sizes"], case["R"], torch.bfloat16) + 1.3 * GB)
    _run(op, dtype=torch.bfloat16, **case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "sizes,R,windows",
    [
        ([100_033], 1, [[0, 65_536 - WINDOW // 2, 65_537, 100_033 - WINDOW]]),
        ([50_064, 50_080], 1, [[0, 16_384 - 5, 50_064 - WINDOW], [0, 32_768 - 7, 50_080 - WINDOW]]),
        ([40_000, 7, 40_007], 3, [[0, 17_000, 40_000 - WINDOW], [0], [0, 40_007 - WINDOW]]),
    ],
)
def test_the_large_checks_at_a_small_size(op, sizes, R, windows, dtype):
    """The logic of the slow tests (windows, constant elements, poison after each tensor), small."""
    _run(op, sizes, R, dtype, windows)
