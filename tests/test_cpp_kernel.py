"""The C++ CPU kernel of the extension (torch.ops.badm_fast.fused_step_ext) against the reference.

Skipped, with the reason, when badm_fast._C is not built (e.g. BADM_FAST_NO_EXTENSION=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import parity
import pytest
import torch

from badm_fast import reference

try:
    import badm_fast._C  # noqa: F401  (registers torch.ops.badm_fast.fused_step_ext)
except ModuleNotFoundError as err:  # not built; a built but broken extension fails loudly
    if err.name != "badm_fast._C":
        raise
    _reason = "badm_fast._C is not built (pure-Python install); build it with `pip install --no-build-isolation -e .`"
    if os.environ.get("BADM_FAST_REQUIRE_EXTENSION") == "1":
        pytest.fail(f"BADM_FAST_REQUIRE_EXTENSION=1 but {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

OP = torch.ops.badm_fast.fused_step_ext
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def fused_step_ext(z, grads, duals, weights, rho, sigma, residuals=None):
    return OP(z, grads, duals, weights, rho, sigma, residuals)


def test_schema():
    assert str(OP.default._schema) == (
        "badm_fast::fused_step_ext(Tensor(a!) z, Tensor grads, Tensor(b!) duals, Tensor weights, "
        "float rho, float sigma, Tensor(c!)? residuals=None) -> ()"
    )


@pytest.mark.parametrize("S", parity.SUB_BATCHES)
@pytest.mark.parametrize("P", parity.SIZES)
@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
def test_parity(dtype, P, S):
    """Every dtype, size and sub-batch count, contiguous rows and padded rows (row stride > P)."""
    for row_pad in (0, 3):
        residuals = (P + S + row_pad) % 2 == 1  # about half of the cases, every dtype and size
        parity.check_kernel(OP, S, P, dtype, seed=P + 10 * S + row_pad, row_pad=row_pad, residuals=residuals)


@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
def test_residuals_match_reference(dtype):
    """The residuals the kernel adds equal those of the reference, and are added, not assigned."""
    (z, grads, duals, weights, rho, sigma), _ = parity.make_inputs(3, 70001, dtype, seed=5)
    res = torch.tensor([1.5, 2.5], dtype=torch.float64)
    fused_step_ext(z.clone(), grads, duals.clone(), weights, rho, sigma, res)
    want = torch.zeros(2, dtype=torch.float64)
    reference.fused_step_(z.clone(), grads, duals.clone(), weights, rho, sigma, want)
    torch.testing.assert_close(res - torch.tensor([1.5, 2.5], dtype=torch.float64), want, rtol=1e-4, atol=1e-9)


def test_zero_size_is_a_noop_but_still_validated():
    z = torch.empty(0)
    fused_step_ext(z, torch.empty(2, 0), torch.empty(2, 0), torch.full((2,), 0.5), 1.0, 2.0)
    with pytest.raises(RuntimeError, match="sigma must be > 0"):
        fused_step_ext(z, torch.empty(2, 0), torch.empty(2, 0), torch.full((2,), 0.5), 1.0, 0.0)


def _inputs(dtype=torch.float32, S=2, P=33):
    (z, grads, duals, weights, rho, sigma), _ = parity.make_inputs(S, P, dtype, seed=1)
    return z, grads, duals, weights, rho, sigma


def _bad_calls():
    """(description, args, expected message): each call violates one rule of the contract."""
    z, g, d, w, rho, sigma = _inputs()
    z64, g64, _, w64, _, _ = _inputs(torch.float64)
    zb, gb, _, wb, _, _ = _inputs(torch.bfloat16)
    strided = torch.zeros(2, 66)[:, ::2]  # (2, 33) with inner stride 2
    overlapping = torch.zeros(40).as_strided((2, 33), (7, 1))  # rows 7 apart
    res64 = torch.zeros(3, dtype=torch.float64)
    return [
        ("duals of the storage dtype", (zb, gb, d.bfloat16(), wb, rho, sigma), r"duals must have dtype Float"),
        ("fp32 duals for fp64", (z64, g64, d, w64, rho, sigma), r"duals must have dtype Double"),
        ("grads of another dtype", (z, g.double(), d, w, rho, sigma), r"grads must have z's dtype"),
        ("weights of another dtype", (z, g, d, w.double(), rho, sigma), r"weights must have dtype Float"),
        ("integer z", (z.int(), g.int(), d, w, rho, sigma), r"z must be float32, float64, bfloat16 or float16"),
        ("grads with P + 1 columns", (z, torch.zeros(2, 34), d, w, rho, sigma), r"grads must have shape \(S, P\)"),
        ("duals with another S", (z, g, torch.zeros(3, 33), w, rho, sigma), r"duals must have the shape of grads"),
        ("1-D grads", (z, g[0], d, w, rho, sigma), r"grads must be 2-D"),
        ("2-D z", (z.view(3, 11), g, d, w, rho, sigma), r"z must be 1-D"),
        ("non-contiguous z", (torch.zeros(66)[::2], g, d, w, rho, sigma), r"z must be contiguous"),
        ("grads with inner stride 2", (z, strided, d, w, rho, sigma), r"grads must have unit inner stride"),
        ("duals with inner stride 2", (z, g, strided, w, rho, sigma), r"duals must have unit inner stride"),
        ("overlapping dual rows", (z, g, overlapping, w, rho, sigma), r"duals rows must not overlap"),
        ("S = 0", (z, torch.zeros(0, 33), torch.zeros(0, 33), torch.zeros(0), rho, sigma), r"S >= 1"),
        ("three weights for S = 2", (z, g, d, torch.full((3,), 1 / 3), rho, sigma), r"weights must have shape \(S,\)"),
        ("rho < 0", (z, g, d, w, -0.5, sigma), r"rho must be >= 0"),
        ("sigma = 0", (z, g, d, w, rho, 0.0), r"sigma must be > 0"),
        ("sigma NaN", (z, g, d, w, rho, float("nan")), r"sigma must be > 0"),
        ("fp32 residuals", (z, g, d, w, rho, sigma, torch.zeros(2)), r"residuals must be float64"),
        ("three residuals", (z, g, d, w, rho, sigma, res64), r"residuals must have shape \(2,\)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_rejects_bad_input_and_changes_nothing(case):
    name, args, message = _bad_calls()[case]
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(RuntimeError, match=message):
        OP(*args, *([None] * (7 - len(args))))
    after = [a for a in args if isinstance(a, torch.Tensor)]
    for b, a in zip(before, after):
        assert torch.equal(b.nan_to_num(7.0), a.nan_to_num(7.0)), f"{name}: an input was modified"


def test_error_message_names_the_op():
    z, g, d, w, rho, sigma = _inputs()
    with pytest.raises(
        RuntimeError, match=r"badm_fast::fused_step_ext: duals must have dtype Float \(the compute dtype"
    ):
        OP(z, g, d.double(), w, rho, sigma, None)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_count_does_not_change_results(dtype, restore_threads):
    """One thread, and more threads than chunks, give bit-identical z, duals and residuals."""
    (z, grads, duals, weights, rho, sigma), _ = parity.make_inputs(4, 50021, dtype, seed=3, row_pad=5)
    outputs = []
    for threads in (1, 8):  # 50021 elements: a few chunks, fewer than 8
        torch.set_num_threads(threads)
        zt, dt, res = z.clone(), duals.clone(), torch.zeros(2, dtype=torch.float64)
        fused_step_ext(zt, grads, dt, weights, rho, sigma, res)
        outputs.append((zt, dt, res))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
    torch.set_num_threads(8)
    parity.check_kernel(OP, 3, 100003, dtype, seed=4, row_pad=3, residuals=True)
    torch.set_num_threads(1)
    parity.check_kernel(OP, 3, 100003, dtype, seed=4, row_pad=3, residuals=True)


def test_offsets_beyond_32_bits():
    """Row strides over 2**31 elements: offsets must be 64-bit. The buffers are allocated but only
    the touched pages become resident, so this needs little memory."""
    S, P = 2, 1000
    stride = 2**31 + 64
    try:
        g_buf = torch.empty(stride + P, dtype=torch.bfloat16)
        d_buf = torch.empty(stride + P, dtype=torch.float32)
    except RuntimeError as err:  # address space refused
        pytest.skip(f"cannot reserve 13 GB of address space: {err}")
    grads = g_buf.as_strided((S, P), (stride, 1))
    duals = d_buf.as_strided((S, P), (stride, 1))
    gen = torch.Generator().manual_seed(0)
    grads.copy_(torch.randn(S, P, generator=gen).bfloat16())
    duals.copy_(torch.randn(S, P, generator=gen))
    z = torch.randn(P, generator=gen).bfloat16()
    weights = torch.tensor([0.25, 0.75])
    want_z, want_d = z.clone(), duals.clone()
    reference.fused_step_(want_z, grads.clone(), want_d, weights, 0.7, 1.9)
    fused_step_ext(z, grads, duals, weights, 0.7, 1.9)
    torch.testing.assert_close(duals, want_d, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(z.float(), want_z.float(), rtol=2 * 2.0**-8, atol=2 * 2.0**-8)


_ISA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import parity, badm_fast._C
    assert torch.backends.cpu.get_cpu_capability() == {cap!r}, torch.backends.cpu.get_cpu_capability()
    op = torch.ops.badm_fast.fused_step_ext
    for dtype in parity.ALL_DTYPES:  # a tail only; vectors and a tail; several chunks (threads)
        for S, P in ((1, 7), (3, 4097), (3, 100003)):
            parity.check_kernel(op, S, P, dtype, seed=P + S, row_pad=3, residuals=S == 3)
    print("ok")
    """
)


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_other_instruction_set_builds(capability):
    """The builds not selected on this machine, forced with ATEN_CPU_CAPABILITY (a fresh process:
    torch reads it once). The build this machine selects is the one the other tests exercise."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    native = torch.backends.cpu.get_cpu_capability()
    if native not in order or order.index(native) <= order.index(capability):
        pytest.skip(f"this CPU's capability is {native}; {capability} is already covered or not runnable")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    script = _ISA_SCRIPT.format(tests=TESTS_DIR, cap=capability)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def _rho_sign_flipped(z, grads, duals, weights, rho, sigma, residuals=None):
    """A deliberately wrong kernel: the sign of rho flipped (the op refuses rho < 0, so the wrong
    arithmetic is the reference's)."""
    reference.fused_step_(z, grads, duals, weights, -rho, sigma, residuals)


def _rho_sigma_swapped(z, grads, duals, weights, rho, sigma, residuals=None):
    """A deliberately wrong kernel: rho and sigma passed in each other's place."""
    OP(z, grads, duals, weights, sigma, rho, residuals)


def _last_element_skipped(z, grads, duals, weights, rho, sigma, residuals=None):
    """A deliberately wrong kernel: the last element is left as it was."""
    P = z.shape[0]
    OP(z[: P - 1], grads[:, : P - 1], duals[:, : P - 1], weights, rho, sigma, residuals)


def _weights_reversed(z, grads, duals, weights, rho, sigma, residuals=None):
    """A deliberately wrong kernel: each weight applied to another sub-batch."""
    OP(z, grads, duals, weights.flip(0), rho, sigma, residuals)


WRONG_KERNELS = [_rho_sign_flipped, _rho_sigma_swapped, _last_element_skipped, _weights_reversed]


@pytest.mark.parametrize("dtype", parity.ALL_DTYPES, ids=str)
@pytest.mark.parametrize("wrong", WRONG_KERNELS, ids=lambda f: f.__name__)
def test_parity_check_catches_wrong_kernels(wrong, dtype):
    """The parity machinery is able to fail: each wrong kernel must raise AssertionError."""
    with pytest.raises(AssertionError):
        parity.check_kernel(wrong, 3, 4097, dtype, seed=11)
