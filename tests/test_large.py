"""64-bit indexing in the C++ CPU kernel: calls whose element offsets go beyond 2^31.

Two slow tests (marked ``slow``; each skipped, with the reason, when the machine has too
little available memory):

- one row of P = 2^31 + 33 bfloat16 elements (z 4.3 GB, grads 4.3 GB, duals fp32 8.6 GB);
- two rows of 2^30 + 64 elements with a row stride of 2^30 + 80, so that row 1's offsets
  s * stride + i pass 2^31 (the duals buffer holds more than 2^31 fp32 elements).

The buffers are filled with constants (fast), except for short windows at the places that
matter (the start, around 2^31, the end), which get random values; the expected values of
those windows are computed by the reference on copies taken before the call. Every buffer
is followed by poisoned (NaN) elements that must stay untouched. The same checks run at a
small size on every test run, so the logic of the slow tests is exercised cheaply.
"""

from __future__ import annotations

import gc

import parity
import pytest
import torch

from badm_fast import backends, reference

GB = 1e9
POISON = 16
WINDOW = 48


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


@pytest.fixture(scope="module")
def cpp_kernel():
    ok, reason, _ = backends.availability("cpp", "cpu")
    if not ok:
        pytest.skip(reason)
    return backends.kernel_for("cpp")


def _footprint(S: int, P: int, row_stride: int, dtype: torch.dtype) -> float:
    itemsize = torch.empty((), dtype=dtype).element_size()
    cdt_size = torch.empty((), dtype=reference.compute_dtype(dtype)).element_size()
    return (P + POISON) * itemsize + S * (row_stride + POISON) * (itemsize + cdt_size)


def _run(kernel, S: int, P: int, row_stride: int, dtype: torch.dtype, windows: list[int]) -> None:
    """One kernel call over (S, P) buffers with the given row stride. ``windows`` are start
    indices (columns) of the WINDOW-element windows that get random values and are checked."""
    cdt = reference.compute_dtype(dtype)
    gen = torch.Generator().manual_seed(P % 9973 + S)
    nan = float("nan")
    z_full = g_full = d_full = None
    try:
        # torch.empty, then every element written once: the body below, the poison here
        z_full = torch.empty(P + POISON, dtype=dtype)
        g_full = torch.empty(S * row_stride + POISON, dtype=dtype)
        d_full = torch.empty(S * row_stride + POISON, dtype=cdt)
        z_full[P:] = nan
        for full in (g_full, d_full):
            full[S * row_stride :] = nan
            full[: S * row_stride].view(S, row_stride)[:, P:] = nan
        z = z_full[:P]
        grads = g_full[: S * row_stride].view(S, row_stride)[:, :P]
        duals = d_full[: S * row_stride].view(S, row_stride)[:, :P]
        assert grads.stride() == (row_stride, 1) and duals.stride() == (row_stride, 1)
        # constants almost everywhere (one value per row), random values in the windows
        z.fill_(1.0)
        for s in range(S):
            grads[s].fill_(0.5 + s)
            duals[s].fill_(-0.25 * (s + 1))
        cols = []
        for a in windows:
            a = max(0, min(a, P - WINDOW))
            cols.append((a, a + WINDOW))
            z[a : a + WINDOW] = torch.randn(WINDOW, generator=gen).to(dtype)
            grads[:, a : a + WINDOW] = torch.randn(S, WINDOW, generator=gen).to(dtype)
            duals[:, a : a + WINDOW] = torch.randn(S, WINDOW, generator=gen).to(cdt)
        w = torch.rand(S, generator=gen, dtype=torch.float64) + 0.1
        weights = (w / w.sum()).to(cdt)
        rho, sigma = 1.5, 2.5

        # expected values, from copies of the windows and of one constant column
        const_col = next(i for i in (P // 2, P // 3, 1) if all(not a <= i < b for a, b in cols))
        expect = []
        for a, b in [*cols, (const_col, const_col + 1)]:
            zw, gw, dw = z[a:b].clone(), grads[:, a:b].clone(), duals[:, a:b].clone()
            want_z, want_d, _ = parity.oracle(zw, gw, dw, weights, rho, sigma)
            low = zw.clone()
            reference.fused_step_(low, gw, dw.clone(), weights, rho, sigma)
            expect.append((a, b, want_z, want_d, low))

        kernel(z, grads, duals, weights, rho, sigma)

        for a, b, want_z, want_d, low in expect:
            where = f"columns [{a}, {b}) (element offsets up to {(S - 1) * row_stride + b - 1})"
            parity._tol_check(f"z {where}", z[a:b], want_z, low if dtype in (torch.bfloat16, torch.float16) else None,
                              dtype)
            parity._tol_check(f"duals {where}", duals[:, a:b], want_d, None, cdt)
        # every constant column got the same update: sample the whole range with a stride
        idx = torch.arange(0, P, max(1, P // 4099))
        idx = idx[[all(not a <= int(i) < b for a, b in cols) for i in idx]]
        assert torch.equal(z[idx], z[const_col].expand(idx.numel())), "constant columns were not all updated alike"
        for s in range(S):
            assert torch.equal(duals[s, idx], duals[s, const_col].expand(idx.numel()))
        # the poison after z, between rows and after the last row is intact
        assert torch.isnan(z_full[P:]).all(), "wrote past the end of z"
        for full in (g_full, d_full):
            rows = full[: S * row_stride].view(S, row_stride)
            assert torch.isnan(rows[:, P:]).all() and torch.isnan(full[S * row_stride :]).all(), "wrote past a row"
    finally:
        del z_full, g_full, d_full
        gc.collect()


def _beyond_2_31_one_row():
    P = 2**31 + 33
    return dict(S=1, P=P, row_stride=P, windows=[0, 2**31 - WINDOW // 2, 2**31 + 1, P - WINDOW])


def _beyond_2_31_row_offsets():
    P, stride = 2**30 + 64, 2**30 + 80
    cross = 2**31 - stride  # column where row 1's offset 1 * stride + i reaches 2^31
    return dict(S=2, P=P, row_stride=stride, windows=[0, cross - WINDOW // 2, P - WINDOW])


@pytest.mark.slow
def test_one_row_beyond_2_31_elements(cpp_kernel):
    case = _beyond_2_31_one_row()
    needed = _footprint(case["S"], case["P"], case["row_stride"], torch.bfloat16) + 1.3 * GB
    _require_memory(needed)
    _run(cpp_kernel, dtype=torch.bfloat16, **case)


@pytest.mark.slow
def test_row_offsets_beyond_2_31_elements(cpp_kernel):
    case = _beyond_2_31_row_offsets()
    assert (case["S"] - 1) * case["row_stride"] + case["P"] > 2**31
    needed = _footprint(case["S"], case["P"], case["row_stride"], torch.bfloat16) + 1.3 * GB
    _require_memory(needed)
    _run(cpp_kernel, dtype=torch.bfloat16, **case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "S,P,row_stride,windows",
    [
        (1, 100_033, 100_033, [0, 65_536 - WINDOW // 2, 65_537, 100_033 - WINDOW]),
        (2, 50_064, 50_080, [0, 65_536 - 50_080 - WINDOW // 2, 50_064 - WINDOW]),
        (3, 40_000, 40_007, [0, 17_000, 40_000 - WINDOW]),
    ],
)
def test_the_large_checks_at_a_small_size(cpp_kernel, S, P, row_stride, windows, dtype):
    """The logic of the slow tests (windows, constant columns, poison between rows), small."""
    _run(cpp_kernel, S, P, row_stride, dtype, windows)
