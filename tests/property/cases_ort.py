"""Hypothesis cases for every ORT custom op (CPU EP): run by test_property.py in a subprocess, one op each.

ORT hands custom ops dense tensors, so the layout dimension here is the op's own: NHWC or NCHW
(``channels_last``), broadcast skip forms, packed QKV/KV attention inputs. Random shapes (empty ones
included), dtypes, NaN/Inf at random places, parameters fp32 or X's type; valid input must match the
float64 reference (same NaN / ±Inf pattern, finite values within the dtype's bound), invalid input
(shapes, types, attributes) must fail with an ORT error naming ``sdkern.<Op>``, never crash. Each
example's arguments are written to $SDKERN_PROPERTY_LOG first (see cases_ops.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sdkern.ops import reference
from tests.property.cases_ops import SETTINGS, SPECIALS, _special, close, record, same_pattern

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from tests.ort.ortutil import make_model, run

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ORT_DTYPES = st.sampled_from([F32, F16])


def rnd(shape, dtype, gen, special=None):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return _special(t, special, gen)


def nhwc_to_nchw(t):
    return t.permute(0, 3, 1, 2)


@SETTINGS
@given(data=st.data())
def test_ort_group_norm(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(st.sampled_from([F32, F16, BF16]))
    pd = data.draw(st.sampled_from([F32, dtype]))
    groups = data.draw(st.integers(1, 4))
    c = groups * data.draw(st.integers(1, 5))
    n, h, w = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5)), data.draw(st.integers(1, 5))
    cl, silu, special = data.draw(st.booleans()), data.draw(st.booleans()), data.draw(SPECIALS)
    record(op="GroupNorm", seed=seed, dtype=dtype, pd=pd, nhwc=(n, h, w, c), groups=groups, cl=cl, silu=silu,
           special=special)  # fmt: skip
    x = rnd((n, h, w, c) if cl else (n, c, h, w), dtype, gen, special)
    g, b = rnd((c,), pd, gen), rnd((c,), pd, gen)
    model = make_model(
        "GroupNorm", [("X", dtype), ("gamma", pd), ("beta", pd)], [("Y", dtype)],
        groups=groups, activation=int(silu), epsilon=1e-5, channels_last=int(cl),
    )  # fmt: skip
    y = run(model, {"X": x, "gamma": g, "beta": b}, {"Y": (x.shape, dtype)})["Y"]
    xn = nhwc_to_nchw(x) if cl else x
    ref = reference.group_norm(xn.double(), g.double(), b.double(), groups, 1e-5, silu)
    close(nhwc_to_nchw(y) if cl else y, ref, dtype, "GroupNorm")


@SETTINGS
@given(data=st.data())
def test_ort_skip_group_norm(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(ORT_DTYPES)
    groups = data.draw(st.integers(1, 3))
    c = groups * data.draw(st.integers(1, 4))
    n, h, w = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    cl, kind, has_bias = (
        data.draw(st.booleans()),
        data.draw(st.sampled_from(["full", "n11", "nc"])),
        data.draw(st.booleans()),
    )
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["X", "skip"]))
    record(op="SkipGroupNorm", seed=seed, dtype=dtype, nhwc=(n, h, w, c), groups=groups, cl=cl, kind=kind,
           bias=has_bias, special=(special, where))  # fmt: skip
    xshape = (n, h, w, c) if cl else (n, c, h, w)
    x = rnd(xshape, dtype, gen, special if where == "X" else None)
    kshape = {"full": xshape, "n11": (n, 1, 1, c) if cl else (n, c, 1, 1), "nc": (n, c)}[kind]
    skip = rnd(kshape, dtype, gen, special if where == "skip" else None)
    g, b = rnd((c,), F32, gen), rnd((c,), F32, gen)
    bias = rnd((c,), dtype, gen) if has_bias else None
    model = make_model(
        "SkipGroupNorm",
        [("X", dtype), ("gamma", F32), ("beta", F32), ("skip", dtype), ("bias", dtype) if has_bias else None],
        [("Y", dtype), ("S", dtype)],
        groups=groups, activation=1, channels_last=int(cl),
    )  # fmt: skip
    feeds = {"X": x, "gamma": g, "beta": b, "skip": skip} | ({"bias": bias} if has_bias else {})
    got = run(model, feeds, {"Y": (xshape, dtype), "S": (xshape, dtype)})
    to_nchw = nhwc_to_nchw if cl else (lambda t: t)
    sk = skip if skip.dim() == 2 else to_nchw(skip)
    ry, rs = reference.skip_group_norm(
        to_nchw(x).double(), sk.double(), None if bias is None else bias.double(), g.double(), b.double(),
        groups, 1e-5, True,
    )  # fmt: skip
    close(to_nchw(got["S"]), rs, dtype, "SkipGroupNorm S")
    close(to_nchw(got["Y"]), ry, dtype, "SkipGroupNorm Y")


def _lead(data):
    return tuple(data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))


@SETTINGS
@given(data=st.data())
def test_ort_bias_add(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(st.sampled_from([F32, F16, BF16]))
    pd = data.draw(st.sampled_from([F32, dtype]))
    shape = (*_lead(data), data.draw(st.integers(1, 40)))
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["X", "bias", "skip"]))
    record(op="BiasAdd", seed=seed, dtype=dtype, pd=pd, shape=shape, special=(special, where))
    x = rnd(shape, dtype, gen, special if where == "X" else None)
    skip = rnd(shape, dtype, gen, special if where == "skip" else None)
    bias = rnd(shape[-1:], pd, gen, special if where == "bias" else None)
    model = make_model("BiasAdd", [("X", dtype), ("bias", pd), ("skip", dtype)], [("Y", dtype)])
    y = run(model, {"X": x, "bias": bias, "skip": skip}, {"Y": (shape, dtype)})["Y"]
    close(y, reference.bias_add(x.double(), bias.double(), skip.double()), dtype, "BiasAdd")


@SETTINGS
@given(data=st.data())
def test_ort_bias_split_gelu(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(ORT_DTYPES)
    pd = data.draw(st.sampled_from([F32, dtype]))
    shape = (*_lead(data), 2 * data.draw(st.integers(1, 30)))
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["X", "bias"]))
    record(op="BiasSplitGelu", seed=seed, dtype=dtype, pd=pd, shape=shape, special=(special, where))
    x = rnd(shape, dtype, gen, special if where == "X" else None)
    bias = rnd(shape[-1:], pd, gen, special if where == "bias" else None)
    model = make_model("BiasSplitGelu", [("X", dtype), ("bias", pd)], [("Y", dtype)])
    y = run(model, {"X": x, "bias": bias}, {"Y": ((*shape[:-1], shape[-1] // 2), dtype)})["Y"]
    close(y, reference.bias_split_gelu(x.double(), bias.double()), dtype, "BiasSplitGelu")


@SETTINGS
@given(data=st.data())
def test_ort_skip_layer_norm(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(ORT_DTYPES)
    shape = (data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5)), data.draw(st.integers(1, 40)))
    has_beta, has_bias, bcast = data.draw(st.booleans()), data.draw(st.booleans()), data.draw(st.booleans())
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["input", "skip", "gamma"]))
    record(op="SkipLayerNormalization", seed=seed, dtype=dtype, shape=shape, beta=has_beta, bias=has_bias,
           bcast=bcast, special=(special, where))  # fmt: skip
    c = shape[-1]
    x = rnd(shape, dtype, gen, special if where == "input" else None)
    skip = rnd(shape[1:] if bcast else shape, dtype, gen, special if where == "skip" else None)
    g = rnd((c,), dtype, gen, special if where == "gamma" else None)
    beta = rnd((c,), dtype, gen) if has_beta else None
    bias = rnd((c,), dtype, gen) if has_bias else None
    model = make_model(
        "SkipLayerNormalization",
        [("input", dtype), ("skip", dtype), ("gamma", dtype), ("beta", dtype) if has_beta else None,
         ("bias", dtype) if has_bias else None],
        [("output", dtype), None, None, ("sum", dtype)],
        epsilon=1e-5,
    )  # fmt: skip
    feeds = {"input": x, "skip": skip, "gamma": g}
    feeds |= ({"beta": beta} if has_beta else {}) | ({"bias": bias} if has_bias else {})
    got = run(model, feeds, {"output": (shape, dtype), "sum": (shape, dtype)})
    d = [None if t is None else t.double() for t in (x, skip.expand(shape), g, beta, bias)]
    ry, rs = reference.skip_layer_norm(*d, 1e-5)
    close(got["sum"], rs, dtype, "SkipLayerNormalization sum")
    close(got["output"], ry, dtype, "SkipLayerNormalization output")


@SETTINGS
@given(data=st.data())
def test_ort_mha(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = data.draw(ORT_DTYPES)
    b, s, L, n = (
        data.draw(st.integers(0, 2)),
        data.draw(st.integers(0, 40)),
        data.draw(st.integers(1, 90)),
        data.draw(st.integers(1, 3)),
    )
    h = data.draw(st.sampled_from([8, 16, 40]))
    form = data.draw(st.sampled_from(["separate", "qkv", "kv"]))
    scale = data.draw(st.sampled_from([0.0, 0.2, -1.0]))
    special, where = data.draw(SPECIALS), data.draw(st.sampled_from(["q", "k", "v"]))
    record(op="MultiHeadAttention", seed=seed, dtype=dtype, b=b, s=s, L=L, n=n, h=h, form=form, scale=scale,
           special=(special, where))  # fmt: skip
    if form == "qkv":
        L = s
    q = rnd((b, s, n, h), dtype, gen, special if where == "q" else None)
    k = rnd((b, L, n, h), dtype, gen, special if where == "k" else None)
    v = rnd((b, L, n, h), dtype, gen, special if where == "v" else None)
    if form == "separate":
        ins = [("query", dtype), ("key", dtype), ("value", dtype)]
        feeds = {"query": q.reshape(b, s, n * h), "key": k.reshape(b, L, n * h), "value": v.reshape(b, L, n * h)}
    elif form == "kv":
        ins, feeds = (
            [("query", dtype), ("key", dtype)],
            {"query": q.reshape(b, s, n * h), "key": torch.stack([k, v], 3)},
        )
    else:
        ins, feeds = [("query", dtype)], {"query": torch.stack([q, k, v], 3)}
    model = make_model("MultiHeadAttention", ins, [("output", dtype)], num_heads=n, scale=scale)
    out = run(model, feeds, {"output": ((b, s, n * h), dtype)})["output"].reshape(b, s, n, h)
    sc = scale if scale != 0.0 else 1 / math.sqrt(h)
    if special is not None:
        same_pattern(out, reference.attention(q.float(), k.float(), v.float(), sc), "MHA specials")
    close(out, reference.attention(q.double(), k.double(), v.double(), sc), dtype, "MHA", pattern=special is None)


INVALID = [
    ("GroupNorm", "gamma_len"),
    ("GroupNorm", "groups_attr_float"),
    ("GroupNorm", "rank3"),
    ("GroupNorm", "groups3"),
    ("GroupNorm", "gamma_f16_for_f32"),
    ("SkipGroupNorm", "skip_permuted"),
    ("SkipGroupNorm", "skip_type"),
    ("BiasAdd", "skip_shape"),
    ("BiasAdd", "bias_len"),
    ("BiasSplitGelu", "odd"),
    ("SkipLayerNormalization", "gamma_len"),
    ("SkipLayerNormalization", "eps_int"),
    ("MultiHeadAttention", "heads_mismatch"),
    ("MultiHeadAttention", "scale_nan"),
    ("MultiHeadAttention", "kv_shape"),
    ("MultiHeadAttention", "unidirectional_float"),
]


@SETTINGS
@given(case=st.sampled_from(INVALID), c=st.integers(2, 12).map(lambda v: 2 * v))
def test_ort_invalid(case, c):
    op, what = case
    record(op=op, invalid=what, c=c)
    x = torch.randn(2, 3, 4, c)
    if op == "GroupNorm":
        attrs = dict(groups=2, activation=0)
        g = torch.randn(c)
        feeds = {"X": x, "gamma": g, "beta": g}
        types = {"gamma": F32, "beta": F32}
        if what == "gamma_len":
            feeds["gamma"] = torch.randn(c + 1)
        elif what == "groups_attr_float":
            attrs["groups"] = 2.0
        elif what == "rank3":
            feeds["X"] = torch.randn(2, 3, c)
        elif what == "groups3":
            attrs["groups"] = c + 1
        else:
            feeds["gamma"], types["gamma"] = g.half(), F16
        model = make_model(op, [("X", F32), ("gamma", types["gamma"]), ("beta", F32)], [("Y", F32)], **attrs)
        outs = {"Y": (tuple(feeds["X"].shape), F32)}
    elif op == "SkipGroupNorm":
        g = torch.randn(c)
        skip = torch.randn(2, 4, 3, c) if what == "skip_permuted" else torch.randn(2, 3, 4, c).half()
        model = make_model(
            op, [("X", F32), ("gamma", F32), ("beta", F32), ("skip", skip.dtype)], [("Y", F32)], groups=2, activation=0
        )
        feeds, outs = {"X": x, "gamma": g, "beta": g, "skip": skip}, {"Y": (x.shape, F32)}
    elif op == "BiasAdd":
        skip = torch.randn(2, 3, 4, c + 1) if what == "skip_shape" else x
        bias = torch.randn(c + 1 if what == "bias_len" else c)
        model = make_model(op, [("X", F32), ("bias", F32), ("skip", F32)], [("Y", F32)])
        feeds, outs = {"X": x, "bias": bias, "skip": skip}, {"Y": (x.shape, F32)}
    elif op == "BiasSplitGelu":
        xo = torch.randn(2, c + 1)
        model = make_model(op, [("X", F32), ("bias", F32)], [("Y", F32)])
        feeds, outs = {"X": xo, "bias": torch.randn(c + 1)}, {"Y": ((2, c // 2), F32)}
    elif op == "SkipLayerNormalization":
        attrs = dict(epsilon=1) if what == "eps_int" else {}
        g = torch.randn(c - 1 if what == "gamma_len" else c)
        model = make_model(op, [("input", F32), ("skip", F32), ("gamma", F32)], [("output", F32)], **attrs)
        feeds, outs = {"input": x, "skip": x, "gamma": g}, {"output": (x.shape, F32)}
    else:
        attrs = dict(num_heads=2)
        q, k = torch.randn(1, 5, c), torch.randn(1, 7, c)
        if what == "heads_mismatch":
            attrs["num_heads"] = c + 1
        elif what == "scale_nan":
            attrs["scale"] = float("nan")
        elif what == "kv_shape":
            k = torch.randn(1, 7, c + 2)
        else:
            attrs["unidirectional"] = 1.0
        model = make_model(op, [("query", F32), ("key", F32), ("value", F32)], [("output", F32)], **attrs)
        feeds, outs = {"query": q, "key": k, "value": k}, {"output": ((1, 5, c), F32)}
    try:
        run(model, feeds, outs)
    except Exception as e:  # noqa: BLE001  (ORT's own exception types)
        msg = str(e)
        # ours name the op; a type the op's schema excludes is refused by ORT before the kernel runs
        schema = f"Op ({op})" in msg and "no kernel def matches" in msg
        assert f"sdkern.{op}" in msg or schema, f"error without sdkern.{op}: {e}"
    else:
        raise AssertionError(f"{op}: invalid case {what} accepted")
