"""The Triton back end (badm_fast.kernels) against badm_fast.reference, on CPU under TRITON_INTERPRET=1.

The kernels work on tensor lists through a device table of data pointers, so every case builds
its own lists of fresh random tensors, each a view into a NaN-poisoned buffer (a read outside a
tensor yields NaN, a write outside it removes the poison), runs the kernel on them and the
reference (:func:`badm_fast.reference.fused_step_`, ``nonfinite_check_``, ``copy_check_``) on
clones, and compares the bits. The interpreter runs one program at a time with numpy, so block
sizes are large and the number of programs small. A compile-only case builds the real kernels
for sm_90 in a subprocess (no GPU needed).
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

# The interpreter mode is read when the kernels are defined, i.e. when
# badm_fast.kernels.badm_triton is first imported; it must be set before that.
if "badm_fast.kernels.badm_triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import parity  # noqa: E402

from badm_fast import kernels, reference  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=f"{kernels.triton_unavailable_reason()}")

if kernels.triton_available():
    import triton
    import triton.language as tl

    from badm_fast.kernels.badm_triton import _to_storage

    @triton.jit
    def _bf16_round_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, _to_storage(tl.load(x_ptr + offs), tl.bfloat16))


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ROWS = [1, 2, 3, 8]
POISON = 8  # NaN elements after every tensor (and `offset` before it)
BIG_BLOCK = 65536

# Relative tolerance of the residual sums against the reference, by storage dtype. The
# per-element terms are the same bits in both (same compute-dtype operations); only the order
# of the float64 summation differs (per chunk, then over chunks, against per tensor).
RESIDUAL_RTOL = {torch.float32: 1e-12, torch.float64: 1e-12, torch.bfloat16: 1e-12, torch.float16: 1e-12}


@pytest.fixture(scope="module")
def bt():
    """The kernel module, in interpreter mode."""
    from badm_fast.kernels import badm_triton

    if not badm_triton.INTERPRETED:
        pytest.skip("badm_fast.kernels.badm_triton was imported before TRITON_INTERPRET=1 was set")
    return badm_triton


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------


class Poisoned:
    """A tensor of ``shape`` (optionally transposed: dense, not contiguous) at element
    ``offset`` of a NaN buffer; :meth:`intact` says whether the poison around it survived."""

    def __init__(self, shape, dtype, gen, offset=0, transpose=False, scale=1.0):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = 1
        for s in shape:
            n *= s
        self.buf = torch.full((offset + n + POISON,), float("nan"), dtype=dtype)
        self.offset, self.n = offset, n
        view = self.buf[offset : offset + n]
        if transpose:
            view = view.view(shape[::-1]).t()
        else:
            view = view.view(shape)
        view.copy_((torch.randn(view.shape, generator=gen, dtype=torch.float64) * scale).to(dtype))
        self.t = view

    def intact(self):
        outside = torch.cat((self.buf[: self.offset], self.buf[self.offset + self.n :]))
        return bool(outside.isnan().all())


def make_case(shapes, rows, dtype, seed, *, weight_decay=0.013, maximize=False, offset=0, transpose=False):
    """Fresh random params, grads (R*N), duals (R*N), weights, hyper (lr, momentum not exact in
    fp32) for the shapes; every tensor poisoned around."""
    gen = torch.Generator().manual_seed(seed)
    cdt = reference.compute_dtype(dtype)
    n = len(shapes)
    params = [Poisoned(s, dtype, gen, offset, transpose) for s in shapes]
    grads = [Poisoned(shapes[k % n], dtype, gen, offset, transpose) for k in range(rows * n)]
    duals = [Poisoned(shapes[k % n], cdt, gen, offset, transpose, scale=0.1) for k in range(rows * n)]
    w = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.2
    weights = (w / w.sum()).to(cdt)
    lr = 0.01 + 0.05 * float(torch.rand((), generator=gen, dtype=torch.float64))
    mu = 0.5 + 0.4 * float(torch.rand((), generator=gen, dtype=torch.float64))
    hyper = reference.hyper_tensor(lr, mu, weight_decay, maximize)
    return dict(params=params, grads=grads, duals=duals, weights=weights, hyper=hyper)


def tensors(case):
    return dict(
        params=[p.t for p in case["params"]],
        grads=[g.t if g is not None else None for g in case["grads"]],
        duals=[d.t for d in case["duals"]],
        weights=case["weights"],
        hyper=case["hyper"],
    )


def cloned(args):
    return {
        k: [t.clone() if t is not None else None for t in v] if isinstance(v, list) else v.clone()
        for k, v in args.items()
    }


def bits_equal(a, b):
    """Same bits (signed zeros and infinities included), NaNs in the same places, NaN payloads
    aside (torch.equal is False on NaN)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(parity.raw_bits(a), parity.raw_bits(b))
    )


def assert_same(got, want, what=""):
    for name in ("params", "duals", "grads"):
        for k, (a, b) in enumerate(zip(got[name], want[name])):
            if a is None:
                assert b is None
                continue
            assert bits_equal(a, b), f"{what}{name}[{k}] differs from the reference ({a.dtype}, shape {tuple(a.shape)})"


def assert_intact(case):
    for name in ("params", "grads", "duals"):
        for k, p in enumerate(case[name]):
            if p is not None:
                assert p.intact(), f"{name}[{k}]: the kernel wrote outside the tensor"


def check_step(case, *, residuals=False, found_inf=None, inv_scale=None, block_size=BIG_BLOCK, res_init=(0.25, 0.5)):
    """Run the kernel on the case and the reference on clones; the params and duals must be
    the same bits, the residuals within RESIDUAL_RTOL. Returns the kernel's residuals."""
    args = tensors(case)
    want = cloned(args)
    res = torch.tensor(res_init, dtype=torch.float64) if residuals else None
    res_want = res.clone() if residuals else None
    flag = {} if found_inf is None else {"found_inf": found_inf.clone()}
    scale = {} if inv_scale is None else {"inv_scale": inv_scale}
    kernels.badm_step(**args, residuals=res, block_size=block_size, **flag, **scale)
    ref_flag = {} if found_inf is None else {"found_inf": found_inf}
    reference.fused_step_(**want, residuals=res_want, **ref_flag, **scale)
    assert_same(args, want)
    assert_intact(case)
    if found_inf is not None:
        assert bits_equal(flag["found_inf"], found_inf), "the step changed found_inf"
    if residuals:
        dtype = args["params"][0].dtype
        torch.testing.assert_close(res, res_want, rtol=RESIDUAL_RTOL[dtype], atol=0.0)
    return res


# ------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_matches_reference_bits(bt, dtype, rows):
    # Sizes 0, 1, 7 (tail chunks only), 4095 (a tail swept in all eight masked sub-blocks),
    # 4096 (one full aligned chunk: the vector path), 4097 (a full chunk and a one-element
    # tail) in one call, block 4096; maximize on odd R.
    case = make_case([0, 1, 7, 4095, 4096, 4097], rows, dtype, seed=rows, maximize=rows % 2 == 1)
    check_step(case, residuals=True, block_size=4096)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_large_tensor_and_no_residuals(bt, dtype):
    # 65536 + 3 elements: one full 65536-element chunk and a 3-element tail.
    check_step(make_case([65536 + 3], 2, dtype, seed=5), block_size=BIG_BLOCK)


def test_step_default_launch_config(bt):
    # The GPU configuration (2048 elements per program, fp64 1024): 4 and 7 programs.
    for dtype in (torch.float32, torch.float64):
        check_step(make_case([3 * 2048 + 5], 1, dtype, seed=6), residuals=True, block_size=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_many_small_tensors(bt, dtype):
    # 60 tensors of 1..40 elements (and a few multi-dimensional ones), one program each.
    gen = torch.Generator().manual_seed(7)
    shapes = [int(n) for n in torch.randint(1, 41, (56,), generator=gen)] + [(3, 5), (2, 3, 4), (1, 16), (16, 1)]
    check_step(make_case(shapes, 3, dtype, seed=8), residuals=True, block_size=256)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_unaligned_and_transposed_tensors(bt, dtype):
    # Views one element into their buffers (not 16-byte aligned: the masked path even for
    # full chunks), and transposed 2-D tensors (dense, not contiguous; memory order).
    check_step(make_case([300, 128, 129], 2, dtype, seed=9, offset=1), residuals=True, block_size=128)
    check_step(make_case([(33, 40), (16, 4)], 3, dtype, seed=10, transpose=True), residuals=True, block_size=256)


@pytest.mark.parametrize("weight_decay, maximize", [(0.0, False), (0.0, True), (0.2, False), (0.2, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_weight_decay_and_maximize(bt, dtype, weight_decay, maximize):
    case = make_case([7, 4096], 2, dtype, seed=11, weight_decay=weight_decay, maximize=maximize)
    check_step(case, residuals=True, block_size=4096)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_inv_scale(bt, dtype):
    # An unscale factor that is not a power of two: every gradient multiplied first.
    check_step(
        make_case([5, 4096], 3, dtype, seed=12), residuals=True, inv_scale=torch.tensor([1.0 / 3.0]), block_size=4096
    )


@pytest.mark.parametrize("flag", [1.0, float("inf"), float("nan"), -2.0])
def test_step_found_inf_set_changes_nothing(bt, flag):
    for dtype in DTYPES:
        case = make_case([7, 4096], 2, dtype, seed=13)
        before = cloned(tensors(case))
        res = check_step(
            case,
            residuals=True,
            found_inf=torch.tensor([flag]),
            inv_scale=torch.tensor([0.5]),
            block_size=4096,
            res_init=(0.25, 0.5),
        )
        assert_same(tensors(case), before, "skipped step: ")
        assert res.tolist() == [0.25, 0.5]


def test_step_found_inf_clear_is_a_normal_step(bt):
    case = make_case([7, 4096], 2, torch.float32, seed=14)
    before = cloned(tensors(case))
    check_step(case, residuals=True, found_inf=torch.zeros(1), block_size=4096)
    assert not bits_equal(tensors(case)["params"][1], before["params"][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_skips_items_without_gradient(bt, dtype):
    # Items 1 and 3 have no gradient (rows None): their params and duals, poisoned with NaN,
    # stay as they are; item 4's later rows are given but its row 0 is None (skipped too).
    rows, shapes = 3, [7, 5, 4096, 9, 11]
    case = make_case(shapes, rows, dtype, seed=15)
    n = len(shapes)
    for i in (1, 3, 4):
        case["params"][i].t.fill_(float("nan"))
        for r in range(rows):
            case["duals"][r * n + i].t.fill_(float("nan"))
            if i != 4 or r == 0:
                case["grads"][r * n + i] = None
    before = cloned(tensors(case))
    check_step(case, residuals=True, block_size=4096)
    after = tensors(case)
    for i in (1, 3, 4):
        assert after["params"][i].isnan().all()
        assert all(after["duals"][r * n + i].isnan().all() for r in range(rows))
    assert not bits_equal(after["params"][2], before["params"][2])


def test_step_without_any_work(bt, monkeypatch):
    # No params, only empty tensors, or only skipped items: no launch, residuals unchanged.
    launches = []
    monkeypatch.setattr(bt, "_launch", lambda *a, **k: launches.append(a[0]))
    hyper = reference.hyper_tensor(0.1, 0.5)
    res = torch.tensor([1.0, 2.0], dtype=torch.float64)
    kernels.badm_step([], [], [], torch.ones(1), hyper, res)
    case = tensors(make_case([0, 0], 2, torch.float32, seed=16))
    kernels.badm_step(**case, residuals=res)
    case = tensors(make_case([3, 4], 1, torch.float32, seed=17))
    case["grads"] = [None, None]
    kernels.badm_step(**case, residuals=res)
    assert launches == [] and res.tolist() == [1.0, 2.0]


def test_one_step_launch_whatever_the_number_of_tensors(bt, monkeypatch):
    calls = []
    real = bt._launch
    monkeypatch.setattr(bt, "_launch", lambda kernel, *a, **k: (calls.append(kernel), real(kernel, *a, **k)))
    case = make_case([int(n) for n in range(1, 41)], 2, torch.float32, seed=18)
    check_step(case, block_size=512)
    assert calls == [bt._badm_step_kernel]
    calls.clear()
    check_step(case, residuals=True, block_size=512)
    assert calls == [bt._badm_step_kernel, bt._residual_reduce_kernel]


def test_residuals_are_deterministic_and_accumulate(bt):
    # Two runs on the same inputs give the same bits; the sums are added to the tensor's
    # values; a strided residuals view writes its two elements only.
    case = make_case([4097, 300, 65536 + 3], 3, torch.float32, seed=19)
    args = tensors(case)
    outs = []
    for _ in range(2):
        fresh = cloned(args)
        buf = torch.full((4,), 7.0, dtype=torch.float64)
        kernels.badm_step(**fresh, residuals=buf[::2], block_size=4096)
        outs.append(buf)
    assert torch.equal(outs[0], outs[1])
    assert outs[0][1].item() == 7.0 and outs[0][3].item() == 7.0
    want = torch.tensor([7.0, 7.0], dtype=torch.float64)
    reference.fused_step_(**cloned(args), residuals=want)
    torch.testing.assert_close(outs[0][::2], want, rtol=1e-12, atol=0.0)


def test_hyperparameters_are_runtime_values(bt):
    # Only switches and the block size are compile-time constants; the hyper tensor is read
    # at each call, so updating it in place (what a captured graph replays) changes the step.
    sig = inspect.signature(bt._badm_step_kernel.fn)
    constexprs = {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}
    assert constexprs == {"HAS_RESIDUALS", "HAS_FOUND_INF", "HAS_INV_SCALE", "BLOCK"}
    case = make_case([100, 7], 2, torch.float32, seed=20)
    args = tensors(case)
    want = cloned(args)
    for lr, mu, wd, mx in [(0.03, 0.7, 0.0, 0.0), (0.011, 0.35, 0.1, 1.0), (0.0, 0.9, 0.0, 0.0)]:
        args["hyper"].copy_(reference.hyper_tensor(lr, mu, wd, mx))
        want["hyper"].copy_(args["hyper"])
        kernels.badm_step(**args, block_size=128)
        reference.fused_step_(**want)
        assert_same(args, want, f"lr={lr}: ")


def test_table_cache_is_keyed_on_the_pointers(bt):
    bt.clear_table_cache()
    case = make_case([7, 300], 2, torch.float32, seed=21)
    args = tensors(case)
    kernels.badm_step(**args, block_size=128)
    assert len(bt._TABLE_CACHE) == 1
    (table,) = [v[0] for v in bt._TABLE_CACHE.values()]
    # New list objects holding the same tensors: the same table.
    again = {k: list(v) if isinstance(v, list) else v for k, v in args.items()}
    kernels.badm_step(**again, block_size=128)
    assert len(bt._TABLE_CACHE) == 1 and list(bt._TABLE_CACHE.values())[0][0] is table
    # Other tensors, or another block size: new tables.
    kernels.badm_step(**tensors(make_case([7, 300], 2, torch.float32, seed=22)), block_size=128)
    kernels.badm_step(**args, block_size=256)
    assert len(bt._TABLE_CACHE) == 3
    bt.clear_table_cache()
    assert len(bt._TABLE_CACHE) == 0


def test_table_layout(bt):
    # Chunk entries (record offset, start) first, then records (numel, aligned, pointers); an
    # item with a pointer off 16-byte alignment is marked unaligned (it takes the masked path).
    items = [(5, 64, 128, 192), (130, 256, 260, 320)]
    table, programs, _ = bt._build_table(items, 5, 64, torch.device("cpu"))
    assert programs == 4
    want = [8, 0, 13, 0, 13, 64, 13, 128, 5, 1, 64, 128, 192, 130, 0, 256, 260, 320]
    assert table.dtype == torch.int64 and table.tolist() == want


def test_bf16_rounding_is_round_to_nearest_even(bt):
    # The storage rounding of the kernel against torch's on ties, overflow, infinities, NaN,
    # subnormals and random bit patterns.
    special = [
        0x3F808000,
        0x3F818000,
        0xBF808000,
        0x3F807FFF,
        0x3F808001,
        0x7F7FFFFF,
        0x7F7F8000,
        0xFF7FFFFF,
        0x7F800000,
        0xFF800000,
        0x00008000,
        0x00018000,
        0x80008000,
        0x00000001,
        0x00000000,
        0x80000000,
    ]
    gen = torch.Generator().manual_seed(23)
    rand = torch.randint(0, 2**31, (4096 - len(special) - 2,), generator=gen, dtype=torch.int64)
    bits = torch.cat((torch.tensor(special, dtype=torch.int64), rand, torch.tensor([0x7FC00001, 0xFFC00000])))
    x = bits.to(torch.int32).view(torch.float32)  # the int32 wrap of the high patterns is intended
    y = torch.empty(4096, dtype=torch.bfloat16)
    _bf16_round_kernel[(1,)](x, y, BLOCK=4096)
    assert bits_equal(y, x.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------
# Invalid inputs
# ------------------------------------------------------------------------------------------


def _valid():
    case = make_case([10, (3, 4)], 2, torch.float32, seed=24)
    args = tensors(case)
    args["residuals"] = torch.zeros(2, dtype=torch.float64)
    return args


def _replace(name, k, value):
    def change(a):
        a[name] = list(a[name])
        a[name][k] = value(a[name][k]) if callable(value) else value

    return change


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(params=[p.int() for p in a["params"]]), "params have dtype torch.int32"),
        (_replace("params", 1, lambda t: t.double()), r"params\[1\] is torch.float64"),
        (_replace("params", 0, lambda t: torch.zeros(20)[::2]), r"params\[0\] is not non-overlapping and dense"),
        (lambda a: a.update(grads=a["grads"][:3]), r"grads must hold R\*N tensors"),
        (lambda a: a.update(duals=a["duals"][:3]), r"duals must hold R\*N = 4 tensors"),
        (_replace("grads", 2, None), r"grads\[2\] \(row 1 of item 0\) is NoneType"),
        (_replace("grads", 1, lambda t: t.half()), r"grads\[1\] must match params\[1\]"),
        (_replace("grads", 3, lambda t: t.reshape(4, 3)), r"grads\[3\] must match params\[1\]"),
        (_replace("grads", 3, lambda t: t.t().contiguous().t()), r"grads\[3\] must match params\[1\]"),
        (_replace("duals", 0, lambda t: t.double()), r"duals\[0\] must be torch.float32"),
        (_replace("duals", 1, lambda t: t.reshape(12)), r"duals\[1\] must be torch.float32 with the shape"),
        (lambda a: a.update(weights=a["weights"][:1]), r"weights must be a \(2,\) torch.float32 tensor"),
        (lambda a: a.update(weights=a["weights"].double()), r"weights must be a \(2,\) torch.float32"),
        (lambda a: a.update(hyper=a["hyper"].float()), r"hyper must be a \(4,\) torch.float64 tensor"),
        (lambda a: a.update(hyper=a["hyper"][:3]), r"hyper must be a \(4,\) torch.float64"),
        (lambda a: a.update(residuals=torch.zeros(2)), r"residuals must be a \(2,\) float64 tensor"),
        (lambda a: a.update(residuals=torch.zeros(3, dtype=torch.float64)), r"residuals must be a \(2,\)"),
        (lambda a: a.update(residuals=torch.zeros(1, dtype=torch.float64).expand(2)), "with a non-zero stride"),
        (lambda a: a.update(found_inf=torch.zeros(1, dtype=torch.float64)), "found_inf must be a one-element float32"),
        (lambda a: a.update(found_inf=torch.zeros(2)), "found_inf must be a one-element float32"),
        (lambda a: a.update(inv_scale=torch.ones(1, dtype=torch.int32)), "inv_scale must be a one-element float32"),
        (lambda a: a.update(block_size=1000), "block_size must be a power of two >= 16, got 1000"),
        (lambda a: a.update(block_size=8), "block_size must be a power of two >= 16, got 8"),
        (lambda a: a.update(num_warps=3), r"num_warps must be a power of two in \[1, 32\], got 3"),
    ],
)
def test_invalid_arguments_raise_and_change_nothing(bt, change, match):
    args = _valid()
    change(args)
    before = cloned({k: v for k, v in args.items() if isinstance(v, (list, torch.Tensor))})
    with pytest.raises(ValueError, match=match):
        kernels.badm_step(**args)
    for name, value in before.items():
        now = args[name]
        for a, b in zip(now, value) if isinstance(value, list) else [(now, value)]:
            assert (a is None and b is None) or bits_equal(a, b), f"{name} changed by a refused call"


def test_cpu_tensors_without_interpreter_raise(bt, monkeypatch):
    monkeypatch.setattr(bt, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        kernels.badm_step(**_valid())
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        kernels.badm_nonfinite_check([torch.zeros(3)], torch.zeros(1))


def test_missing_triton_fails_at_first_use_only(monkeypatch):
    # Importing badm_fast.kernels never needs triton; using a kernel names triton in its error.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(kernels, "_UNAVAILABLE", [])
    assert kernels.TRITON_AVAILABLE is False
    assert "triton is not importable" in kernels.triton_unavailable_reason()
    with pytest.raises(ImportError, match="Triton back end of badm_fast is unavailable: triton is not importable"):
        kernels.badm_step(**_valid())
    for call in (lambda: kernels.badm_nonfinite_check([], torch.zeros(1)), lambda: kernels.badm_copy_check([], [])):
        with pytest.raises(ImportError, match="triton is not importable"):
            call()


def test_import_badm_fast_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; import badm_fast, badm_fast.kernels as k; print(k.TRITON_AVAILABLE)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------
# Non-finite check and checked copy
# ------------------------------------------------------------------------------------------


def _scan_case(seed, dtypes=DTYPES):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, dt in enumerate(dtypes):
        out += [Poisoned(5000, dt, gen), Poisoned(7, dt, gen), None, Poisoned(0, dt, gen), Poisoned(1, dt, gen)]
    strided = Poisoned(64, torch.float32, gen)
    return out, strided


def _scan(ts, flag):
    got = torch.tensor([flag])
    want = got.clone()
    kernels.badm_nonfinite_check(ts, got)
    reference.nonfinite_check_(ts, want)
    assert bits_equal(got, want), (got, want)
    return got.item()


@pytest.mark.parametrize("where", ["none", "first", "tail", "strided", "bf16", "fp64-big"])
@pytest.mark.parametrize("value", [float("nan"), -float("inf")])
def test_nonfinite_check_matches_reference(bt, where, value):
    items, strided = _scan_case(25)
    ts = [p.t if p is not None else None for p in items] + [strided.t[::2]]  # the last one is not dense
    if where == "first":
        ts[0][0] = value
    elif where == "tail":
        ts[0][-1] = value  # in the 5000-element tensor's tail chunk (block 4096)
    elif where == "strided":
        ts[-1][3] = value
    elif where == "bf16":
        ts[2 * 5 + 1][6] = value  # the 7-element bf16 tensor
    elif where == "fp64-big":
        ts[5][10] = 1e300  # finite in fp64 (not a false positive)
    assert _scan(ts, 0.0) == (0.0 if where in ("none", "fp64-big") else 1.0)
    assert all(p.intact() for p in items if p is not None)


def test_nonfinite_check_never_lowers_the_flag(bt):
    clean = [torch.randn(100, generator=torch.Generator().manual_seed(28)), None]
    dirty = clean + [torch.tensor([1.0, float("inf")])]
    assert _scan(clean, 1.0) == 1.0
    assert _scan(dirty, 1.0) == 1.0
    assert _scan(dirty, 3.0) == 3.0
    assert _scan(dirty, 0.5) == 1.0
    assert torch.tensor(_scan(dirty, float("nan"))).isnan()  # the reference's maximum keeps NaN
    assert _scan([], 0.0) == 0.0


def test_nonfinite_check_one_launch_per_dtype(bt, monkeypatch):
    calls = []
    real = bt._launch
    monkeypatch.setattr(bt, "_launch", lambda kernel, *a, **k: (calls.append(kernel), real(kernel, *a, **k)))
    gen = torch.Generator().manual_seed(26)
    ts = [torch.randn(n, generator=gen) for n in range(1, 30)] + [torch.randn(9, generator=gen).double()]
    flag = torch.zeros(1)
    kernels.badm_nonfinite_check(ts, flag)
    assert calls == [bt._badm_nonfinite_kernel] * 2 and flag.item() == 0.0
    with pytest.raises(ValueError, match=r"tensors\[1\] has dtype torch.int64"):
        kernels.badm_nonfinite_check([ts[0], torch.zeros(3, dtype=torch.int64)], flag)
    with pytest.raises(ValueError, match="found_inf must be a one-element float32"):
        kernels.badm_nonfinite_check(ts, torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("with_flag", [False, True])
@pytest.mark.parametrize("bad", [None, "kernel", "fallback"])
def test_copy_check_matches_reference(bt, with_flag, bad):
    # Same-dtype, same-layout pairs go through the Triton kernel (a 5000-element one with a tail
    # chunk, small ones, an unaligned one, a transposed one); a dtype-converting pair and a
    # broadcast through torch's copy_; None sources leave their destination alone.
    gen = torch.Generator().manual_seed(27)
    pairs = []
    for dt in DTYPES:
        pairs.append((Poisoned(5000, dt, gen), Poisoned(5000, dt, gen)))
        pairs.append((Poisoned(7, dt, gen, offset=1), Poisoned(7, dt, gen)))
    pairs.append(
        (Poisoned((6, 5), torch.float32, gen, transpose=True), Poisoned((6, 5), torch.float32, gen, transpose=True))
    )
    pairs.append((Poisoned(9, torch.float32, gen), Poisoned(9, torch.float64, gen)))
    pairs.append((Poisoned((2, 3), torch.float32, gen), Poisoned(3, torch.float32, gen)))
    pairs.append((Poisoned(4, torch.float32, gen), None))
    dst = [d.t for d, _ in pairs]
    src = [s.t if s is not None else None for _, s in pairs]
    if bad == "kernel":
        src[2][4096 + 5] = float("inf")  # fp64 5000-element source, in its tail chunk
    elif bad == "fallback":
        src[-3][2] = 1e300  # fp64 -> fp32: inf after the conversion
    want_dst = [d.clone() for d in dst]
    flag = torch.zeros(1) if with_flag else None
    want_flag = flag.clone() if with_flag else None
    kernels.badm_copy_check(dst, src, flag)
    reference.copy_check_(want_dst, src, want_flag)
    for k, (a, b) in enumerate(zip(dst, want_dst)):
        assert bits_equal(a, b), f"dst[{k}]"
    assert all(d.intact() for d, _ in pairs)
    if with_flag:
        assert bits_equal(flag, want_flag) and flag.item() == (0.0 if bad is None else 1.0)


def test_copy_check_invalid_arguments_change_nothing(bt):
    dst = [torch.zeros(3), torch.zeros(4)]
    src = [torch.ones(3), torch.ones(5)]
    with pytest.raises(ValueError, match=r"src\[1\] of shape \(5,\) cannot be copied into dst\[1\] of shape \(4,\)"):
        kernels.badm_copy_check(dst, src)
    with pytest.raises(ValueError, match="dst and src must have the same length"):
        kernels.badm_copy_check(dst, src[:1])
    with pytest.raises(ValueError, match="found_inf must be a one-element float32"):
        kernels.badm_copy_check(dst[:1], src[:1], torch.zeros(1, dtype=torch.float64))
    assert all(d.eq(0).all() for d in dst)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90
# ------------------------------------------------------------------------------------------

# Compiles the kernels for sm_90 with Triton's own tool chain (no GPU needed) and reports
# their global vector accesses, multiply-adds and shared memory.
_COMPILE_SCRIPT = textwrap.dedent(
    r"""
    import inspect, json, re
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from badm_fast.kernels import badm_triton as bt

    assert not bt.INTERPRETED

    def build(kernel, sig, consts, aligned, **options):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = dict(sig, **{k: "constexpr" for k in consts})
        assert sorted(sig) == sorted(names), (sorted(sig), sorted(names))
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        ptx = k.asm["ptx"]
        count = lambda pat: len(re.findall(pat, ptx))
        return dict(ld_v4=count(r"ld\.global[^\n]*\.v4"), st_v4=count(r"st\.global[^\n]*\.v4"),
                    ld_v2=count(r"ld\.global[^\n]*\.v2"), st_v2=count(r"st\.global[^\n]*\.v2"),
                    fma=ptx.count("fma.rn"), shared=k.metadata.shared, has_cubin=bool(k.asm.get("cubin")))

    DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16, fp64=torch.float64)
    out = {}
    for dt, cdt in [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")]:
        for flags in (0, 1):  # residuals, found_inf and inv_scale all off / all on
            sig = dict(tab_ptr="*i64", z_like_ptr="*" + dt, w_ptr="*" + cdt, hyper_ptr="*fp64", part_ptr="*fp64",
                       found_ptr="*fp32", inv_scale_ptr="*fp32", R="i32")
            consts = dict(HAS_RESIDUALS=bool(flags), HAS_FOUND_INF=bool(flags), HAS_INV_SCALE=bool(flags),
                          BLOCK=bt.default_launch_config(DTYPES[dt])[0])
            out[f"step-{dt}-{flags}"] = build(bt._badm_step_kernel, sig, consts, ["tab_ptr", "w_ptr", "hyper_ptr"],
                                              num_warps=8, enable_fp_fusion=False)
        sig = dict(tab_ptr="*i64", like_ptr="*" + dt, found_ptr="*fp32")
        out[f"check-{dt}"] = build(bt._badm_nonfinite_kernel, sig, dict(BLOCK=bt._CHECK_BLOCK), ["tab_ptr"],
                                   num_warps=8)
        out[f"copy-{dt}"] = build(bt._badm_copy_kernel, sig, dict(HAS_FOUND_INF=True, BLOCK=bt._CHECK_BLOCK),
                                  ["tab_ptr"], num_warps=8)
    sig = dict(part_ptr="*fp64", n="i32", res_ptr="*fp64", res_stride="i32")
    out["reduce"] = build(bt._residual_reduce_kernel, sig, dict(RBLOCK=bt._REDUCE_BLOCK), [], num_warps=4)
    print("RESULT" + json.dumps(out))
    """
)


def test_compiles_for_sm90_with_vector_accesses():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the step kernel must turn fusion off itself
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if "RESULT" not in proc.stdout:
        err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        if "nvidia" in proc.stderr.lower() or "ptxas" in proc.stderr.lower() or "backend" in proc.stderr.lower():
            pytest.skip(f"Triton cannot compile for sm_90 here: {err[0]}")
        raise AssertionError(f"compile script failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert all(r["has_cubin"] for r in out.values()), out
    for key, r in out.items():
        if not key.startswith("step-"):
            continue
        dt = key.split("-")[1]
        assert r["fma"] == 0, f"{key}: contracted multiply-adds (fp fusion must be off)"
        # Full chunks, per thread per row: 8 elements (fp64: 4) of z, of a gradient row and of
        # a dual row loaded, the dual row and z stored, in 16-byte accesses for 4-byte arrays,
        # 8-byte ones for 2-byte arrays, two 16-byte ones per four fp64 elements.
        if dt == "fp32":
            assert (r["ld_v4"], r["st_v4"]) == (6, 4), (key, r)
        elif dt in ("bf16", "fp16"):
            assert (r["ld_v4"], r["st_v4"], r["ld_v2"], r["st_v2"]) == (2, 2, 4, 2), (key, r)
        else:
            assert (r["ld_v2"], r["st_v2"]) == (6, 4), (key, r)
        # One register layout throughout (no conversion through shared memory); only the
        # residual sums use it.
        assert (r["shared"] == 0) == key.endswith("-0"), (key, r)
    # The scan and the copy: 16 elements per thread (4096 / 256 threads) in 16-byte accesses.
    for dt, loads in [("fp32", 4), ("bf16", 2), ("fp16", 2), ("fp64", 8)]:
        check, copy = out[f"check-{dt}"], out[f"copy-{dt}"]
        if dt == "fp64":
            assert check["ld_v2"] == loads and (copy["ld_v2"], copy["st_v2"]) == (loads, loads), (dt, check, copy)
        else:
            assert check["ld_v4"] == loads and (copy["ld_v4"], copy["st_v4"]) == (loads, loads), (dt, check, copy)
