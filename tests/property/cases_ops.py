"""Hypothesis cases for every torch op (CPU): run by test_property.py in a subprocess, one op each.

Random shapes (empty ones included), dtypes (fp32/fp16/bf16, parameters fp32 or x's dtype), memory
layouts (contiguous, channels-last, sliced, stride-0 expanded, storage offsets; for inputs and
parameters), NaN/Inf at random places, and invalid arguments. Valid input must match the float64
reference within the project's bound (DESIGN.md tolerance per dtype) with the same NaN / ±Inf
pattern; invalid input must raise TypeError/ValueError whose message starts with ``sdkern.<op>:``.

Values come from torch.randn with a seed Hypothesis draws: Hypothesis explores shapes, layouts and
special values; the numbers themselves stay well conditioned. Before each example the drawn
arguments are written to $SDKERN_PROPERTY_LOG, so a crash (which kills this process) still leaves
its reproducer for the parent test to show.
"""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdkern.ops  # noqa: F401  (registers torch.ops.sdkern)
from sdkern.ops import reference

EXAMPLES = int(os.environ.get("SDKERN_PROPERTY_EXAMPLES", "40"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LAYOUTS = st.sampled_from(["contiguous", "reversed", "sliced", "expanded", "offset"])
SPECIALS = st.sampled_from([None, None, "nan", "inf", "-inf"])


def record(**kw) -> None:
    path = os.environ.get("SDKERN_PROPERTY_LOG")
    if path:
        with open(path, "w") as f:
            f.write(repr(kw) + "\n")


def make(shape, dtype, layout: str, gen: torch.Generator, special: str | None = None) -> torch.Tensor:
    """A tensor of logical ``shape`` in ``dtype`` laid out as ``layout``; ``special`` puts a NaN/Inf in it."""
    n = len(shape)
    if layout == "expanded" and n > 0:
        # stride 0 along the first dim of size > 1 (a broadcast view)
        dims = [i for i, s in enumerate(shape) if s > 1]
        if dims:
            small = list(shape)
            small[dims[0]] = 1
            t = torch.randn(small, generator=gen, dtype=torch.float64).to(dtype).expand(*shape)
            return _special(t, special, gen)
    if layout == "reversed" and n > 1:
        perm = list(range(n))[::-1]
        t = torch.randn([shape[p] for p in perm], generator=gen, dtype=torch.float64).to(dtype).permute(*perm)
        return _special(t, special, gen)
    if layout == "sliced" and n > 0:
        big = list(shape)
        big[0] = 2 * shape[0]
        t = torch.randn(big, generator=gen, dtype=torch.float64).to(dtype)[::2]
        return _special(t, special, gen)
    if layout == "offset":
        numel = math.prod(shape)
        t = torch.randn(numel + 3, generator=gen, dtype=torch.float64).to(dtype)[3:].view(shape)
        return _special(t, special, gen)
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return _special(t, special, gen)


def _special(t: torch.Tensor, special: str | None, gen: torch.Generator) -> torch.Tensor:
    if special is None or t.numel() == 0:
        return t
    t = t.clone()  # own memory (an expanded view cannot take a single-element write)
    i = int(torch.randint(t.numel(), (1,), generator=gen))
    t[tuple(int(j) for j in torch.unravel_index(torch.tensor(i), t.shape))] = float(special)
    return t


def same_pattern(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    o, r = out.double(), ref.double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.equal(o.isnan(), r.isnan()), (
        f"{what}: NaN pattern differs ({int(o.isnan().sum())} vs {int(r.isnan().sum())})"
    )
    ri = r.isinf()
    assert torch.equal(o.isinf(), ri), f"{what}: Inf pattern differs"
    assert torch.equal(o[ri], r[ri]), f"{what}: Inf signs differ"


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, pattern: bool = True) -> None:
    """Same NaN/±Inf pattern; finite elements within the dtype's bound (relative L2 over them).

    The bound is the DESIGN.md tolerance, or twice the error of rounding the exact result to the
    dtype when that is larger (results that round to a few values, e.g. one-element groups)."""
    if pattern:
        same_pattern(out, ref, what)
    fin = ref.isfinite() & out.isfinite()
    if not fin.any():
        return
    o, r = out.double()[fin], ref.double()[fin]
    rn = r.norm()
    if rn == 0:
        assert o.abs().max() <= TOL[dtype], f"{what}: expected zeros"
        return
    err = ((o - r).norm() / rn).item()
    floor = 2 * ((r.to(dtype).double() - r).norm() / rn).item()
    assert err <= max(TOL[dtype], floor), f"{what}: rel L2 {err:.3e} > {max(TOL[dtype], floor):.3e} ({dtype})"


def clean_error(e: Exception, op: str) -> None:
    assert isinstance(e, (TypeError, ValueError)), f"{type(e).__name__}: {e}"
    assert str(e).startswith(f"sdkern.{op}:"), f"message without the sdkern.{op}: prefix: {e}"


def last_dim_ok(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1


def param_dtype(data, dtype):
    return data.draw(st.sampled_from([torch.float32, dtype]))


# ------------------------------------------------------------------------------------ group norms
@SETTINGS
@given(data=st.data())
def test_group_norm(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(DTYPES)
    groups = data.draw(st.integers(1, 4))
    c = groups * data.draw(st.integers(1, 5))
    n, h, w = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 6)), data.draw(st.integers(1, 6))
    xl, gl, bl = data.draw(LAYOUTS), data.draw(LAYOUTS), data.draw(LAYOUTS)
    cl = data.draw(st.booleans())
    special, silu = data.draw(SPECIALS), data.draw(st.booleans())
    pd = param_dtype(data, dtype)
    record(op="group_norm", seed=seed, dtype=dtype, shape=(n, c, h, w), layouts=(xl, gl, bl), channels_last=cl,
           groups=groups, special=special, silu=silu, param_dtype=pd)  # fmt: skip
    x = make((n, c, h, w), dtype, xl, gen, special)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    g, b = make((c,), pd, gl, gen), make((c,), pd, bl, gen)
    out = torch.ops.sdkern.group_norm(x, g, b, groups, 1e-5, silu)
    ref = reference.group_norm(x.double(), g.double(), b.double(), groups, 1e-5, silu)
    close(out, ref, dtype, "group_norm")


@SETTINGS
@given(data=st.data())
def test_group_norm_invalid(data):
    x = torch.randn(2, 8, 3, 3)
    g, b = torch.randn(8), torch.randn(8)
    case = data.draw(st.sampled_from(["groups0", "groups3", "gamma_len", "x3d", "int_x", "f64_gamma", "eps", "none"]))
    record(op="group_norm", invalid=case)
    args = [x, g, b, 4, 1e-5, False]
    if case == "groups0":
        args[3] = data.draw(st.integers(-5, 0))
    elif case == "groups3":
        args[3] = 3
    elif case == "gamma_len":
        args[1] = torch.randn(data.draw(st.sampled_from([0, 7, 9])))
    elif case == "x3d":
        args[0] = torch.randn(2, 8, 9)
    elif case == "int_x":
        args[0] = torch.ones(2, 8, 3, 3, dtype=torch.int32)
    elif case == "f64_gamma":
        args[1] = g.double()
    elif case == "eps":
        args[4] = data.draw(st.sampled_from([-1.0, float("nan")]))
    else:
        args[data.draw(st.sampled_from([0, 1, 2]))] = None
    try:
        torch.ops.sdkern.group_norm(*args)
    except Exception as e:  # noqa: BLE001
        clean_error(e, "group_norm")
    else:
        raise AssertionError(f"invalid case {case} accepted")


@SETTINGS
@given(data=st.data())
def test_skip_group_norm(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(DTYPES)
    groups = data.draw(st.integers(1, 4))
    c = groups * data.draw(st.integers(1, 4))
    n, h, w = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    skip_kind = data.draw(st.sampled_from(["full", "nc11", "nc"]))
    xl, kl, pl = data.draw(LAYOUTS), data.draw(LAYOUTS), data.draw(LAYOUTS)
    has_bias, silu = data.draw(st.booleans()), data.draw(st.booleans())
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["x", "skip"]))
    pd = param_dtype(data, dtype)
    record(op="skip_group_norm", seed=seed, dtype=dtype, shape=(n, c, h, w), skip=skip_kind, layouts=(xl, kl, pl),
           groups=groups, bias=has_bias, silu=silu, special=(special, where), param_dtype=pd)  # fmt: skip
    x = make((n, c, h, w), dtype, xl, gen, special if where == "x" else None)
    kshape = {"full": (n, c, h, w), "nc11": (n, c, 1, 1), "nc": (n, c)}[skip_kind]
    skip = make(kshape, dtype, kl, gen, special if where == "skip" else None)
    g, b = make((c,), pd, pl, gen), make((c,), pd, "contiguous", gen)
    bias = make((c,), pd, pl, gen) if has_bias else None
    y, s = torch.ops.sdkern.skip_group_norm(x, skip, bias, g, b, groups, 1e-5, silu)
    ry, rs = reference.skip_group_norm(
        x.double(), skip.double(), None if bias is None else bias.double(), g.double(), b.double(), groups, 1e-5, silu
    )
    close(s, rs, dtype, "skip_group_norm s")
    close(y, ry, dtype, "skip_group_norm y")


# ------------------------------------------------------------------------------------ row ops
def _rows_shape(data, even: bool = False):
    lead = data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    c = data.draw(st.integers(1, 40))
    return (*lead, 2 * c if even else c)


@SETTINGS
@given(data=st.data())
def test_bias_add(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(DTYPES)
    shape = _rows_shape(data)
    xl, kl, bl = data.draw(LAYOUTS), data.draw(LAYOUTS), data.draw(LAYOUTS)
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["x", "skip", "bias"]))
    pd = param_dtype(data, dtype)
    record(op="bias_add", seed=seed, dtype=dtype, shape=shape, layouts=(xl, kl, bl), special=(special, where), pd=pd)
    x = make(shape, dtype, xl, gen, special if where == "x" else None)
    skip = make(shape, dtype, kl, gen, special if where == "skip" else None)
    bias = make(shape[-1:], pd, bl, gen, special if where == "bias" else None)
    try:
        out = torch.ops.sdkern.bias_add(x, bias, skip)
    except ValueError as e:
        assert not (last_dim_ok(x) and last_dim_ok(skip)), f"valid input refused: {e}"
        clean_error(e, "bias_add")
        return
    assert last_dim_ok(x) and last_dim_ok(skip), "a last dimension that is not contiguous was accepted"
    close(out, reference.bias_add(x.double(), bias.double(), skip.double()), dtype, "bias_add")


@SETTINGS
@given(data=st.data())
def test_bias_split_gelu(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(DTYPES)
    shape = _rows_shape(data, even=True)
    xl, bl = data.draw(LAYOUTS), data.draw(LAYOUTS)
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["x", "bias"]))
    pd = param_dtype(data, dtype)
    record(op="bias_split_gelu", seed=seed, dtype=dtype, shape=shape, layouts=(xl, bl), special=(special, where), pd=pd)
    x = make(shape, dtype, xl, gen, special if where == "x" else None)
    bias = make(shape[-1:], pd, bl, gen, special if where == "bias" else None)
    try:
        out = torch.ops.sdkern.bias_split_gelu(x, bias)
    except ValueError as e:
        assert not last_dim_ok(x), f"valid input refused: {e}"
        clean_error(e, "bias_split_gelu")
        return
    assert last_dim_ok(x), "a last dimension that is not contiguous was accepted"
    close(out, reference.bias_split_gelu(x.double(), bias.double()), dtype, "bias_split_gelu")


@SETTINGS
@given(data=st.data())
def test_skip_layer_norm(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(DTYPES)
    shape = _rows_shape(data)
    xl, kl, pl = data.draw(LAYOUTS), data.draw(LAYOUTS), data.draw(LAYOUTS)
    has_beta, has_bias = data.draw(st.booleans()), data.draw(st.booleans())
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["x", "skip", "gamma"]))
    pd = param_dtype(data, dtype)
    record(op="skip_layer_norm", seed=seed, dtype=dtype, shape=shape, layouts=(xl, kl, pl), beta=has_beta,
           bias=has_bias, special=(special, where), pd=pd)  # fmt: skip
    c = shape[-1]
    x = make(shape, dtype, xl, gen, special if where == "x" else None)
    skip = make(shape, dtype, kl, gen, special if where == "skip" else None)
    g = make((c,), pd, pl, gen, special if where == "gamma" else None)
    beta = make((c,), pd, pl, gen) if has_beta else None
    bias = make((c,), pd, "expanded", gen) if has_bias else None
    try:
        y, s = torch.ops.sdkern.skip_layer_norm(x, skip, g, beta, bias, 1e-5)
    except ValueError as e:
        assert not (last_dim_ok(x) and last_dim_ok(skip)), f"valid input refused: {e}"
        clean_error(e, "skip_layer_norm")
        return
    assert last_dim_ok(x) and last_dim_ok(skip), "a last dimension that is not contiguous was accepted"
    d = [None if t is None else t.double() for t in (x, skip, g, beta, bias)]
    ry, rs = reference.skip_layer_norm(*d, 1e-5)
    close(s, rs, dtype, "skip_layer_norm s")
    close(y, ry, dtype, "skip_layer_norm y")


@SETTINGS
@given(data=st.data())
def test_row_ops_invalid(data):
    op = data.draw(st.sampled_from(["bias_add", "bias_split_gelu", "skip_layer_norm"]))
    case = data.draw(st.sampled_from(["bias_len", "int", "f64_param", "skip_shape", "skip_dtype", "none", "scalar"]))
    record(op=op, invalid=case)
    x, skip, v = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    if op == "bias_add":
        args = [x, v, skip]
        slots = {"x": 0, "param": 1, "skip": 2}
    elif op == "bias_split_gelu":
        args = [x, v]
        slots = {"x": 0, "param": 1}
    else:
        args = [x, skip, v, None, None, 1e-5]
        slots = {"x": 0, "skip": 1, "param": 2}
    if case == "bias_len":
        args[slots["param"]] = torch.randn(data.draw(st.sampled_from([0, 7, 9, 16])))
    elif case == "int":
        args[0] = x.to(torch.int64)
    elif case == "f64_param":
        args[slots["param"]] = v.double()
    elif case == "skip_shape" and "skip" in slots:
        args[slots["skip"]] = torch.randn(3, 9)
    elif case == "skip_dtype" and "skip" in slots:
        args[slots["skip"]] = skip.half()
    elif case == "scalar":
        args[0] = torch.tensor(1.0)
    elif case == "none":  # skip_layer_norm's skip may be None (a plain LayerNorm): not an invalid case
        required = [i for k, i in slots.items() if not (op == "skip_layer_norm" and k == "skip")]
        args[data.draw(st.sampled_from(required))] = None
    else:  # bias_split_gelu has no skip: an odd last dim instead
        args[0] = torch.randn(3, 7)
        args[1] = torch.randn(7)
    try:
        getattr(torch.ops.sdkern, op)(*args)
    except Exception as e:  # noqa: BLE001
        clean_error(e, op)
    else:
        raise AssertionError(f"{op}: invalid case {case} accepted")


# ------------------------------------------------------------------------------------ attention
@SETTINGS
@given(data=st.data())
def test_attention(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(DTYPES)
    b, sq, sk, h = (data.draw(st.integers(lo, hi)) for lo, hi in ((0, 2), (0, 70), (1, 140), (1, 3)))
    d = data.draw(st.sampled_from([1, 8, 17, 40, 64]))
    dv = data.draw(st.sampled_from([d, 8, 24]))
    ql, kl, vl = data.draw(LAYOUTS), data.draw(LAYOUTS), data.draw(LAYOUTS)
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["q", "k", "v"]))
    scale = data.draw(st.sampled_from([None, 0.05, 1.0, -0.3, 0.0]))
    record(op="attention", seed=seed, dtype=dtype, b=b, sq=sq, sk=sk, h=h, d=d, dv=dv, layouts=(ql, kl, vl),
           special=(special, where), scale=scale)  # fmt: skip
    q = make((b, sq, h, d), dtype, ql, gen, special if where == "q" else None)
    k = make((b, sk, h, d), dtype, kl, gen, special if where == "k" else None)
    v = make((b, sk, h, dv), dtype, vl, gen, special if where == "v" else None)
    ok = all(last_dim_ok(t) for t in (q, k, v))
    try:
        out = torch.ops.sdkern.attention(q, k, v, scale)
    except ValueError as e:
        assert not ok, f"valid input refused: {e}"
        clean_error(e, "attention")
        return
    assert ok, "a last dimension that is not contiguous was accepted"
    # NaN/Inf: the pattern of the same computation in fp32 (what torch and the op do); values vs float64.
    if special is not None:
        same_pattern(out, reference.attention(q.float(), k.float(), v.float(), scale), "attention specials")
    ref = reference.attention(q.double(), k.double(), v.double(), scale)
    close(out, ref, dtype, "attention", pattern=special is None)


@SETTINGS
@given(data=st.data())
def test_attention_invalid(data):
    case = data.draw(st.sampled_from(["3d", "k_heads", "v_len", "dtype_mix", "sk0", "nan_scale", "none", "int"]))
    record(op="attention", invalid=case)
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    args = [q, k, v, None]
    if case == "3d":
        args[0] = torch.randn(4, 2, 8)
    elif case == "k_heads":
        args[1] = torch.randn(1, 5, 3, 8)
    elif case == "v_len":
        args[2] = torch.randn(1, 6, 2, 8)
    elif case == "dtype_mix":
        args[1] = k.half()
    elif case == "sk0":
        args[1], args[2] = torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8)
    elif case == "nan_scale":
        args[3] = float("nan")
    elif case == "int":
        args[0] = q.to(torch.int32)
    else:
        args[data.draw(st.sampled_from([0, 1, 2]))] = None
    try:
        torch.ops.sdkern.attention(*args)
    except Exception as e:  # noqa: BLE001
        clean_error(e, "attention")
    else:
        raise AssertionError(f"invalid case {case} accepted")
