"""The C++ CPU ops of the extension (torch.ops.badm_fast.*) against badm_fast.reference.

fused_step_ext must give the same bits as reference.fused_step_ (every dtype, every list
mix), nonfinite_check_ext and copy_check_ext the same results as reference.nonfinite_check_ and
reference.copy_check_. Inputs are fresh random data per case; tensors the op must not write
(skipped items, untouched destinations) are poisoned with NaN first. Skipped, with the reason,
when badm_fast._C is not built (e.g. BADM_FAST_NO_EXTENSION=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from badm_fast import reference

try:
    import badm_fast._C  # noqa: F401  (registers the torch.ops.badm_fast ops)
except ModuleNotFoundError as err:  # not built; a built but broken extension fails loudly
    if err.name != "badm_fast._C":
        raise
    _reason = "badm_fast._C is not built (pure-Python install); build it with `pip install --no-build-isolation -e .`"
    if os.environ.get("BADM_FAST_REQUIRE_EXTENSION") == "1":
        pytest.fail(f"BADM_FAST_REQUIRE_EXTENSION=1 but {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

OP = torch.ops.badm_fast.fused_step_ext
NONFINITE = torch.ops.badm_fast.nonfinite_check_ext
COPY_CHECK = torch.ops.badm_fast.copy_check_ext
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ROWS = [1, 2, 3, 8]

# (rtol, atol) of the residual sums against the reference, per storage dtype: the per-element
# terms are the same bits, only the float64 summation order differs.
RESIDUAL_TOL = {
    torch.float32: (1e-12, 1e-300),
    torch.float64: (1e-12, 1e-300),
    torch.bfloat16: (1e-12, 1e-300),
    torch.float16: (1e-12, 1e-300),
}

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and dtype and every element the same bit pattern (whatever the strides)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = _INT_VIEW[a.element_size()]
    return torch.equal(a.view(view), b.view(view))


# ---------------------------------------------------------------------------------------------
# Cases


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in memory order."""
    return t.as_strided((t.numel(),), (1,))


def _rand(shape, gen, dtype, scale=1.0, channels_last=False):
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def make_case(shapes, R, dtype, seed, skip=(), weight_decay=0.01, maximize=False, inv_scale=False,
              residuals=False, channels_last=()):
    """Random params (shapes), R rows of grads and duals, weights, hyper (lr and momentum not exact
    in float32), optional inv_scale and residuals. Items in ``skip`` get None grads and NaN params
    and duals (the poison). Items in ``channels_last`` (4-D) are channels_last tensors, their
    grads and duals too."""
    gen = torch.Generator().manual_seed(seed)
    cdt = reference.compute_dtype(dtype)
    n = len(shapes)
    params, grads, duals = [], [None] * (R * n), [None] * (R * n)
    for i, shape in enumerate(shapes):
        cl = i in channels_last
        params.append(_rand(shape, gen, dtype, channels_last=cl))
        for r in range(R):
            if i not in skip:
                grads[r * n + i] = _rand(shape, gen, dtype, scale=2.0, channels_last=cl)
            duals[r * n + i] = _rand(shape, gen, cdt, scale=0.5, channels_last=cl)
        if i in skip:
            params[i].fill_(float("nan"))
            for r in range(R):
                duals[r * n + i].fill_(float("nan"))
    w = torch.rand(R, generator=gen, dtype=torch.float64) + 0.1
    lr = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.1 + 1e-3
    mu = float(torch.rand((), generator=gen, dtype=torch.float64)) * 0.9 + 0.05
    for v in (lr, mu):
        assert float(torch.tensor(v, dtype=torch.float32)) != v, "a hyperparameter is exact in fp32"
    case = dict(
        params=params,
        grads=grads,
        duals=duals,
        weights=(w / w.sum()).to(cdt),
        hyper=reference.hyper_tensor(lr, mu, weight_decay, maximize),
        residuals=torch.tensor([0.25, -0.5], dtype=torch.float64) if residuals else None,
        found_inf=None,
        inv_scale=torch.tensor([0.73], dtype=torch.float32) if inv_scale else None,
    )
    return case


def clone_case(case):
    out = dict(case)
    for key in ("params", "duals"):
        out[key] = [t.clone() for t in case[key]]  # clone() keeps dense strides (channels_last)
    if case["residuals"] is not None:
        out["residuals"] = case["residuals"].clone()
    return out


def call(fn, case):
    fn(case["params"], case["grads"], case["duals"], case["weights"], case["hyper"], case["residuals"],
       case["found_inf"], case["inv_scale"])


def check_parity(fn, case, skip=()):
    """Runs ``fn`` (the op's signature) and reference.fused_step_ on copies of ``case``: params
    and duals must be the same bits, the poisoned (skipped) items still NaN, the grads unchanged,
    the residuals within RESIDUAL_TOL. Raises AssertionError otherwise."""
    grads_before = [None if g is None else g.clone() for g in case["grads"]]
    want, got = clone_case(case), clone_case(case)
    reference.fused_step_(want["params"], want["grads"], want["duals"], want["weights"], want["hyper"],
                          want["residuals"], want["found_inf"], want["inv_scale"])
    call(fn, got)
    n = len(case["params"])
    for i in range(n):
        if i in skip:
            assert torch.isnan(got["params"][i]).all(), f"skipped params[{i}] was written"
            continue
        assert got["params"][i].stride() == case["params"][i].stride()
        assert same_bits(got["params"][i], want["params"][i]), f"params[{i}] differs from the reference"
    for k, (g, w) in enumerate(zip(got["duals"], want["duals"])):
        if k % n in skip:
            assert torch.isnan(g).all(), f"duals[{k}] of a skipped item was written"
        else:
            assert same_bits(g, w), f"duals[{k}] differs from the reference"
    for k, (g, b) in enumerate(zip(case["grads"], grads_before)):
        assert (g is None and b is None) or same_bits(g, b), f"grads[{k}] was modified"
    if case["residuals"] is not None:
        rtol, atol = RESIDUAL_TOL[case["params"][0].dtype if n else torch.float32]
        torch.testing.assert_close(got["residuals"], want["residuals"], rtol=rtol, atol=atol)
    return got


def _mixes():
    """(name, shapes, skipped items, channels_last items) of the list mixes."""
    gen = torch.Generator().manual_seed(1234)
    many = [tuple(int(x) for x in torch.randint(1, 40, (int(torch.randint(1, 3, (1,), generator=gen)),),
                                                   generator=gen)) for _ in range(300)]
    return [
        ("empty", [], (), ()),
        ("zero_size", [(0,), (5,), (3, 0), (1,)], (), ()),
        ("sizes", [(1,), (7,), (4097,), (100003,)], (), ()),
        ("many_small", many, (), ()),
        ("channels_last", [(2, 6, 5, 7), (33,), (3, 4, 1, 9)], (), (0, 2)),
        ("skipped", [(7,), (4097,), (100003,), (1,), (64,)], (1, 3), ()),
    ]


MIXES = _mixes()


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: m[0])
@pytest.mark.parametrize("R", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(dtype, R, mix):
    """Same bits as the reference for every dtype, row count and list mix; the options vary
    with R (weight decay, maximize, inv_scale, residuals each on in some cases)."""
    _, shapes, skip, cl = mix
    case = make_case(shapes, R, dtype, seed=R * 7 + len(shapes), skip=skip, channels_last=cl,
                     weight_decay=0.0 if R == 3 else 0.0137, maximize=R % 2 == 1, inv_scale=R >= 2,
                     residuals=R in (1, 3, 8))
    check_parity(OP, case, skip=skip)


VARIANTS = {
    "plain": dict(weight_decay=0.0),
    "weight_decay": dict(weight_decay=0.021),
    "maximize": dict(weight_decay=0.0, maximize=True),
    "inv_scale": dict(weight_decay=0.0, inv_scale=True),
    "residuals": dict(weight_decay=0.0, residuals=True),
    "all": dict(weight_decay=0.021, maximize=True, inv_scale=True, residuals=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options(dtype, variant):
    """Each option on its own (and all together), over sizes that cover the vector body, the scalar
    tail and several work items."""
    case = make_case([(7,), (4097,), (40000,), (3, 5)], 2, dtype, seed=list(VARIANTS).index(variant),
                     **VARIANTS[variant])
    check_parity(OP, case)


def test_options_change_the_result():
    """weight_decay, maximize and inv_scale each change params, so the options tests compare
    results that depend on them."""
    outs = {}
    for name, kw in [("base", {}), ("wd", dict(weight_decay=0.05)), ("max", dict(maximize=True)),
                     ("inv", dict(inv_scale=True))]:
        kw = dict(dict(weight_decay=0.0), **kw)
        case = make_case([(257,)], 2, torch.float32, seed=3, **kw)  # the same data every time
        call(OP, case)
        outs[name] = case["params"][0]
    for name in ("wd", "max", "inv"):
        assert not torch.equal(outs[name], outs["base"]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residuals_are_added(dtype):
    """The residual terms are added to the given values, not assigned, and match the reference."""
    case = make_case([(100003,), (5,)], 3, dtype, seed=9, residuals=True)
    start = case["residuals"].clone()
    got = check_parity(OP, case)
    zero = clone_case(case)
    zero["residuals"] = torch.zeros(2, dtype=torch.float64)
    call(OP, zero)
    assert (zero["residuals"] > 0).all()
    torch.testing.assert_close(got["residuals"] - start, zero["residuals"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flag", [1.0, float("nan"), float("inf"), -2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_set_changes_nothing(dtype, flag):
    case = make_case([(7,), (4097,), (100003,)], 2, dtype, seed=5, residuals=True, inv_scale=True)
    case["found_inf"] = torch.tensor([flag], dtype=torch.float32)
    got = clone_case(case)
    call(OP, got)
    for a, b in zip(got["params"] + got["duals"], case["params"] + case["duals"]):
        assert same_bits(a, b)
    assert same_bits(got["residuals"], case["residuals"])
    assert same_bits(got["found_inf"], case["found_inf"])
    check_parity(OP, case)  # the reference agrees: nothing changes


@pytest.mark.parametrize("shape", [(1,), ()])
def test_found_inf_zero_steps(shape):
    case = make_case([(4097,), (3,)], 2, torch.float32, seed=6)
    case["found_inf"] = torch.zeros(shape, dtype=torch.float32)
    got = check_parity(OP, case)
    assert not same_bits(got["params"][0], case["params"][0])


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_thread_count_does_not_change_the_bits(dtype, restore_threads):
    """One thread and two or three threads: identical params, duals and residuals (the residual
    partial sums are per work item, summed in item order)."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(100003,), (4097,)] + [(int(s),) for s in torch.randint(1, 600, (200,), generator=gen)] + [(70001,)]
    case = make_case(shapes, 3, dtype, seed=8, residuals=True, inv_scale=True)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        got = clone_case(case)
        call(OP, got)
        outs.append(got)
    for other in outs[1:]:
        for a, b in zip(outs[0]["params"] + outs[0]["duals"], other["params"] + other["duals"]):
            assert same_bits(a, b)
        assert same_bits(outs[0]["residuals"], other["residuals"])
    torch.set_num_threads(2)
    check_parity(OP, case)


def test_items_are_independent():
    """Items are independent: one call over [a, b] equals two calls over [a] and [b]."""
    case = make_case([(4097,), (33,)], 2, torch.float32, seed=12)
    both = clone_case(case)
    call(OP, both)
    for i in range(2):
        single = clone_case(case)
        OP([single["params"][i]], [single["grads"][i], single["grads"][2 + i]],
           [single["duals"][i], single["duals"][2 + i]], case["weights"], case["hyper"])
        assert same_bits(single["params"][i], both["params"][i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_many_rows_and_strided_weights(dtype):
    """More rows than the kernel gathers on its stack (64), and weights that are a strided view."""
    case = make_case([(33,), (70,), (5,)], 70, dtype, seed=40, residuals=True)
    check_parity(OP, case)
    case = make_case([(4097,), (3,)], 3, dtype, seed=41, residuals=True)
    wide = torch.zeros(6, dtype=case["weights"].dtype)
    wide[::2] = case["weights"]
    case["weights"] = wide[::2]
    assert case["weights"].stride() == (2,)
    check_parity(OP, case)


def test_calls_from_python_threads():
    """Concurrent calls from Python threads (each on its own tensors) give the same bits as the
    same calls made one after another (the op releases the GIL while it runs and takes it back
    to drop its references to the arguments)."""
    import threading

    cases = [make_case([(4097,), (33,), (20000,)], 2, torch.float32, seed=30 + j, residuals=True) for j in range(4)]
    got = [clone_case(c) for c in cases]
    errors = []

    def work(c):
        try:
            for _ in range(5):
                call(OP, c)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(c,)) for c in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for c, g in zip(cases, got):
        want = clone_case(c)
        for _ in range(5):
            call(OP, want)
        for a, b in zip(g["params"] + g["duals"], want["params"] + want["duals"]):
            assert same_bits(a, b)
        assert same_bits(g["residuals"], want["residuals"])


def test_schemas():
    assert str(OP.default._schema) == (
        "badm_fast::fused_step_ext(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] duals, Tensor weights, "
        "Tensor hyper, Tensor(c!)? residuals=None, Tensor? found_inf=None, Tensor? inv_scale=None) -> ()"
    )
    assert str(NONFINITE.default._schema) == (
        "badm_fast::nonfinite_check_ext(Tensor?[] tensors, Tensor(a!) found_inf) -> ()"
    )
    assert str(COPY_CHECK.default._schema) == (
        "badm_fast::copy_check_ext(Tensor(a!)[] dst, Tensor?[] src, Tensor(b!)? found_inf=None) -> ()"
    )


# ---------------------------------------------------------------------------------------------
# The parity check is able to fail


def _weights_reversed(params, grads, duals, weights, hyper, *rest):
    """Wrong: each weight applied to another row."""
    OP(params, grads, duals, weights.flip(0), hyper, *rest)


def _last_element_skipped(params, grads, duals, weights, hyper, *rest):
    """Wrong: the last element of every tensor left as it was."""
    def cut(t):
        return None if t is None else flat(t)[:-1]

    OP([cut(p) for p in params], [cut(g) for g in grads], [cut(d) for d in duals], weights, hyper, *rest)


def _python_step(params, grads, duals, weights, hyper, residuals, found_inf, inv_scale, bug):
    """The contract written out in Python with one deliberate deviation (no residuals)."""
    n, R = len(params), weights.numel()
    cdt = reference.compute_dtype(params[0].dtype)
    k = reference.step_constants(hyper, cdt)
    alpha = weights.to(cdt)
    inv = inv_scale.reshape(()).to(cdt)
    for i, z in enumerate(params):
        if grads[i] is None:
            continue
        zc = z.to(cdt)
        wz = k["wd"] * zc
        delta = torch.zeros_like(zc)
        for r in range(R):
            g = grads[r * n + i].to(cdt)
            p = duals[r * n + i]
            if bug == "late_inv_scale":  # inv_scale applied after the sign and the weight decay
                g = (g * k["sign"] + wz) * inv
                new_p = k["a"] * p - k["b"] * g
                delta = delta + alpha[r] * (k["c"] * g + k["d"] * p)
            else:  # reassociated: alpha folded into c and d, b/a factored out of the dual update
                g = (g * inv) * k["sign"] + wz
                new_p = k["a"] * (p - (k["b"] / k["a"]) * g)
                delta = delta + (alpha[r] * k["c"]) * g + (alpha[r] * k["d"]) * p
            p.copy_(new_p)
        z.copy_((zc + delta).to(z.dtype))


def _late_inv_scale(*args):
    _python_step(*args, bug="late_inv_scale")


def _reassociated(*args):
    _python_step(*args, bug="reassociated")


WRONG = [_weights_reversed, _last_element_skipped, _late_inv_scale, _reassociated]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrong", WRONG, ids=lambda f: f.__name__)
def test_parity_check_catches_wrong_kernels(wrong, dtype):
    case = make_case([(4097,), (300,)], 3, dtype, seed=11, weight_decay=0.03, inv_scale=True)
    with pytest.raises(AssertionError):
        check_parity(wrong, case)


# ---------------------------------------------------------------------------------------------
# nonfinite_check_ext and copy_check_ext


def _scan_tensors(seed, dtypes=DTYPES):
    """A mixed list: every dtype, a None, empty and 0-size tensors, sizes covering the vector body,
    the tail and several work items, a channels_last tensor."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j, dtype in enumerate(dtypes):
        out += [_rand((7,), gen, dtype), None, torch.empty(0, dtype=dtype), _rand((4097,), gen, dtype),
                _rand((40000 + j,), gen, dtype), _rand((2, 3, 4, 5), gen, dtype, channels_last=True)]
    return out


BAD_VALUES = [float("nan"), float("inf"), float("-inf")]
# (list index, flat element) places for the bad value: vector body, tail, a later work item
BAD_PLACES = [(0, 3), (3, 4096), (4, 5), (4, 39999), (5, 17), (9, 4090), (16, 20000), (22, 40002)]


@pytest.mark.parametrize("place", BAD_PLACES)
@pytest.mark.parametrize("bad", BAD_VALUES, ids=str)
def test_nonfinite_finds_each_value(bad, place):
    tensors = _scan_tensors(seed=1)
    idx, elem = place
    flat(tensors[idx])[elem] = bad
    before = [None if t is None else t.clone() for t in tensors]
    got = torch.zeros(1)
    NONFINITE(tensors, got)
    want = torch.zeros(1)
    reference.nonfinite_check_(tensors, want)
    assert got.item() == 1.0 and same_bits(got, want)
    for t, b in zip(tensors, before):
        assert (t is None and b is None) or same_bits(t, b)


@pytest.mark.parametrize("start", [0.0, 1.0, 0.5, 3.0])
def test_nonfinite_all_finite_and_flag_values(start):
    tensors = _scan_tensors(seed=2)
    got = torch.tensor([start])
    NONFINITE(tensors, got)
    assert got.item() == start  # never cleared, never raised without cause
    flat(tensors[4])[7] = float("nan")
    want = torch.tensor([start])
    reference.nonfinite_check_(tensors, want)
    NONFINITE(tensors, got)
    assert same_bits(got, want)  # max(flag, 1)


def test_nonfinite_empty_and_none_lists():
    flag = torch.zeros(())
    NONFINITE([], flag)
    NONFINITE([None, torch.empty(0), None], flag)
    assert flag.item() == 0.0


@pytest.mark.parametrize("with_flag", [False, True])
def test_copy_check_matches_reference(with_flag):
    src = _scan_tensors(seed=3)
    src[10] = None
    dst = [torch.full_like(s, float("nan")) if s is not None else torch.full((3,), float("nan"))
           for s in _scan_tensors(seed=3)]  # NaN poison; untouched entries must not raise the flag
    want_dst = [d.clone() for d in dst]
    flag = torch.zeros(1) if with_flag else None
    want_flag = torch.zeros(1) if with_flag else None
    COPY_CHECK(dst, src, flag)
    reference.copy_check_(want_dst, src, want_flag)
    for i, (d, w) in enumerate(zip(dst, want_dst)):
        if src[i] is None:
            assert torch.isnan(d).all(), f"dst[{i}] written from a None src"
        else:
            assert same_bits(d, w) and d.stride() == src[i].stride(), f"dst[{i}]"
    if with_flag:
        assert flag.item() == 0.0 and same_bits(flag, want_flag)


@pytest.mark.parametrize("place", BAD_PLACES[:5])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=str)
def test_copy_check_raises_flag_and_copies(bad, place):
    src = _scan_tensors(seed=4)
    idx, elem = place
    flat(src[idx])[elem] = bad
    dst = [torch.zeros(2) if s is None else torch.zeros_like(s) for s in src]
    flag = torch.zeros(1)
    COPY_CHECK(dst, src, flag)
    assert flag.item() == 1.0
    for d, s in zip(dst, src):
        if s is not None:
            assert same_bits(d, s)


def test_copy_check_other_dtypes_without_flag():
    src = [torch.arange(5000, dtype=torch.int64), torch.tensor([True, False]), torch.randn(3, dtype=torch.complex64)]
    dst = [torch.zeros_like(s) for s in src]
    COPY_CHECK(dst, src)
    for d, s in zip(dst, src):
        assert torch.equal(d, s)


# ---------------------------------------------------------------------------------------------
# Invalid inputs: a clear RuntimeError and nothing written


def _valid(dtype=torch.float32, R=2):
    return make_case([(33,), (2, 6, 5, 7), (4097,)], R, dtype, seed=21, residuals=True,
                     inv_scale=True, channels_last=(1,))


def _bad_step_cases():
    """(name, function of a valid case that breaks one rule, expected message)."""
    def sub(key, i, value):
        def f(c):
            c[key][i] = value

        return f

    def put(key, value):
        def f(c):
            c[key] = value

        return f

    f32 = torch.float32
    return [
        ("grads one short", lambda c: c.__setitem__("grads", c["grads"][:-1]), r"grads must have R\*N = 2\*3 = 6"),
        ("duals one more", lambda c: c["duals"].append(torch.zeros(33)), r"duals must have R\*N = 2\*3 = 6 .* got 7"),
        ("weights 2-D", put("weights", torch.full((1, 2), 0.5)), r"weights must have shape \(R,\)"),
        ("weights empty", put("weights", torch.zeros(0)), r"R >= 1"),
        ("weights float64", put("weights", torch.full((2,), 0.5, dtype=torch.float64)),
         r"weights must have dtype Float"),
        ("int params", sub("params", 0, torch.zeros(33, dtype=torch.int32)), r"params must be float32, float64"),
        ("mixed params dtypes", sub("params", 2, torch.zeros(4097, dtype=torch.float64)),
         r"params\[2\] has dtype Double, params\[0\] has Float"),
        ("non-dense param", sub("params", 2, torch.zeros(8194)[::2]), r"params\[2\] must be non-overlapping and dense"),
        ("grads dtype", sub("grads", 5, torch.zeros(4097, dtype=torch.float64)), r"grads\[5\] must have params' dtype"),
        ("grads shape", sub("grads", 3, torch.zeros(34)), r"grads\[3\] must have the sizes and strides of params\[0\]"),
        ("grads strides", sub("grads", 4, torch.zeros(2, 6, 5, 7)), r"grads\[4\] must have the sizes and strides"),
        ("grads row None", sub("grads", 5, None), r"grads\[5\] \(row 1 of params\[2\]\) is None but grads\[2\]"),
        ("duals dtype", sub("duals", 5, torch.zeros(4097, dtype=torch.bfloat16)), r"duals\[5\] must have dtype Float"),
        ("duals strides", sub("duals", 1, torch.zeros(2, 6, 5, 7)), r"duals\[1\] must have the sizes and strides"),
        ("duals shape", sub("duals", 5, torch.zeros(4096)), r"duals\[5\] must have the sizes and strides"),
        ("hyper 3", put("hyper", torch.zeros(3, dtype=torch.float64)), r"hyper must have shape \(4,\)"),
        ("hyper float32", put("hyper", torch.zeros(4)), r"hyper must be float64"),
        ("hyper strided", put("hyper", torch.zeros(8, dtype=torch.float64)[::2]), r"hyper must be contiguous"),
        ("residuals 3", put("residuals", torch.zeros(3, dtype=torch.float64)), r"residuals must have shape \(2,\)"),
        ("residuals float32", put("residuals", torch.zeros(2)), r"residuals must be float64"),
        ("found_inf float64", put("found_inf", torch.zeros(1, dtype=torch.float64)), r"found_inf must be float32"),
        ("found_inf 2", put("found_inf", torch.zeros(2, dtype=f32)), r"found_inf must have one element"),
        ("inv_scale float64", put("inv_scale", torch.ones(1, dtype=torch.float64)), r"inv_scale must be float32"),
        ("inv_scale 0", put("inv_scale", torch.ones(0)), r"inv_scale must have one element"),
    ]


BAD_STEP = _bad_step_cases()


@pytest.mark.parametrize("bad", BAD_STEP, ids=lambda b: b[0])
def test_fused_step_rejects_and_changes_nothing(bad):
    name, breaker, message = bad
    case = _valid()
    breaker(case)
    tensors = [t for key in ("params", "grads", "duals") for t in case[key] if t is not None]
    tensors += [case[k] for k in ("weights", "hyper", "residuals", "found_inf", "inv_scale") if case[k] is not None]
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=r"badm_fast::fused_step_ext: .*" + message):
        call(OP, case)
    for t, b in zip(tensors, before):
        assert same_bits(t, b), f"{name}: an input was modified"


def test_fp64_params_need_fp64_duals():
    case = _valid(torch.float64)
    case["duals"][0] = case["duals"][0].float()
    message = r"duals\[0\] must have dtype Double \(the compute dtype of params' Double\)"
    with pytest.raises(RuntimeError, match=message):
        call(OP, case)


def test_empty_list_is_validated():
    hyper = reference.hyper_tensor(0.1, 0.5)
    OP([], [], [], torch.ones(3), hyper)
    with pytest.raises(RuntimeError, match="grads must have R\\*N = 3\\*0 = 0 entries"):
        OP([], [None], [], torch.ones(3), hyper)
    with pytest.raises(RuntimeError, match="hyper must be float64"):
        OP([], [], [], torch.ones(3), hyper.float())


def _bad_scan_cases():
    ok = [torch.randn(10), None, torch.randn(3, 3)]
    return [
        ("nonfinite flag float64", lambda: NONFINITE(ok, torch.zeros(1, dtype=torch.float64)),
         r"nonfinite_check_ext: found_inf must be float32"),
        ("nonfinite flag 2", lambda: NONFINITE(ok, torch.zeros(2)),
         r"nonfinite_check_ext: found_inf must have one element"),
        ("nonfinite int", lambda: NONFINITE([ok[0], torch.zeros(3, dtype=torch.int64)], torch.zeros(1)),
         r"nonfinite_check_ext: tensors\[1\] must be float32, float64, bfloat16 or float16"),
        ("nonfinite strided", lambda: NONFINITE([ok[0], torch.zeros(10)[::2]], torch.zeros(1)),
         r"nonfinite_check_ext: tensors\[1\] must be non-overlapping and dense"),
        ("copy lengths", lambda: COPY_CHECK([torch.zeros(10)], [None, None]), r"copy_check_ext: src must have as many"),
        ("copy dtype", lambda: COPY_CHECK([torch.zeros(10), torch.zeros(3)], [ok[0], torch.zeros(3).double()]),
         r"copy_check_ext: src\[1\] must have dst\[1\]'s dtype"),
        ("copy shape", lambda: COPY_CHECK([torch.zeros(10), torch.zeros(3)], [ok[0], torch.zeros(4)]),
         r"copy_check_ext: src\[1\] must have the sizes and strides of dst\[1\]"),
        ("copy strides", lambda: COPY_CHECK([torch.zeros(3, 3)], [torch.zeros(3, 3).t()]),
         r"copy_check_ext: src\[0\] must have the sizes and strides"),
        ("copy strided dst", lambda: COPY_CHECK([torch.zeros(10)[::2]], [torch.zeros(10)[::2]]),
         r"copy_check_ext: dst\[0\] must be non-overlapping and dense"),
        ("copy flag", lambda: COPY_CHECK([torch.zeros(3)], [torch.ones(3)], torch.zeros(1, dtype=torch.float64)),
         r"copy_check_ext: found_inf must be float32"),
        ("copy int with flag",
         lambda: COPY_CHECK([torch.zeros(3, dtype=torch.int32)], [torch.ones(3, dtype=torch.int32)], torch.zeros(1)),
         r"copy_check_ext: dst\[0\] must be float32"),
    ]


@pytest.mark.parametrize("bad", _bad_scan_cases(), ids=lambda b: b[0])
def test_scan_ops_reject(bad):
    _, fn, message = bad
    with pytest.raises(RuntimeError, match=message):
        fn()


def test_copy_check_rejects_late_and_copies_nothing():
    """An invalid last entry: the earlier entries are not copied either (validated first)."""
    src = [torch.randn(100), torch.randn(5000), torch.zeros(4)]
    dst = [torch.zeros(100), torch.zeros(5000), torch.zeros(4, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match=r"src\[2\] must have dst\[2\]'s dtype"):
        COPY_CHECK(dst, src, torch.zeros(1))
    assert all(torch.count_nonzero(d) == 0 for d in dst)


# ---------------------------------------------------------------------------------------------
# The builds for the other instruction sets

_ISA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import test_cpp_kernel as t
    assert torch.backends.cpu.get_cpu_capability() == {cap!r}, torch.backends.cpu.get_cpu_capability()
    for dtype in t.DTYPES:
        for R, mix in ((1, t.MIXES[2]), (3, t.MIXES[4]), (2, t.MIXES[5])):
            _, shapes, skip, cl = mix
            case = t.make_case(shapes, R, dtype, seed=R, skip=skip, channels_last=cl, maximize=R == 3,
                               inv_scale=R > 1, residuals=True)
            t.check_parity(t.OP, case, skip=skip)
    tensors = t._scan_tensors(seed=1)
    flag = torch.zeros(1)
    t.NONFINITE(tensors, flag)
    assert flag.item() == 0.0
    t.flat(tensors[4])[39999] = float("inf")
    t.NONFINITE(tensors, flag)
    assert flag.item() == 1.0
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
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
