"""sdkern's ORT custom ops (domain sdkern, CPU execution provider) against the float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from sdkern.ops import reference
from tests.ort.ortutil import make_model, run, run_or_skip, session
from tests.utils import assert_close, randn, to64

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ORT_DTYPES = (F32, F16)


def nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def nchw_to_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


# ---------------------------------------------------------------- GroupNorm / SkipGroupNorm

# (N, H, W, C, groups)
GN_SHAPES = [(2, 16, 16, 320, 32), (1, 8, 8, 1280, 32), (2, 32, 32, 64, 32), (1, 3, 5, 12, 3), (3, 7, 1, 6, 2)]


def _gn_input(n, h, w, c, dtype, channels_last):
    x = randn(n, h, w, c, dtype=dtype, scale=2.0, shift=0.5)
    return x if channels_last else nhwc_to_nchw(x).contiguous()


def _as_nchw(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return nhwc_to_nchw(t) if channels_last else t


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("channels_last", [1, 0])
@pytest.mark.parametrize("shape", GN_SHAPES)
def test_group_norm(shape, channels_last, dtype):
    n, h, w, c, groups = shape
    silu = (h + c) % 2  # both activations over the shape list
    x = _gn_input(n, h, w, c, dtype, channels_last)
    param_dtype = F32 if c % 64 else dtype  # gamma/beta: fp32 or X's type
    gamma, beta = randn(c, dtype=param_dtype), randn(c, dtype=param_dtype)
    model = make_model(
        "GroupNorm",
        [("X", dtype), ("gamma", param_dtype), ("beta", param_dtype)],
        [("Y", dtype)],
        groups=groups,
        activation=silu,
        epsilon=1e-5,
        channels_last=channels_last,
    )
    out = run_or_skip(model, {"X": x, "gamma": gamma, "beta": beta}, {"Y": (x.shape, dtype)})["Y"]
    ref = reference.group_norm(*to64(_as_nchw(x, channels_last), gamma, beta), groups, 1e-5, bool(silu))
    assert_close(_as_nchw(out, channels_last), ref, dtype, what=f"GroupNorm{shape} cl={channels_last}")


def test_group_norm_bf16():
    x, gamma, beta = randn(2, 8, 8, 320, dtype=BF16), randn(320), randn(320)
    model = make_model(
        "GroupNorm", [("X", BF16), ("gamma", F32), ("beta", F32)], [("Y", BF16)], groups=32, activation=1
    )
    out = run_or_skip(model, {"X": x, "gamma": gamma, "beta": beta}, {"Y": (x.shape, BF16)})["Y"]
    ref = reference.group_norm(*to64(nhwc_to_nchw(x), gamma, beta), 32, 1e-5, True)
    assert_close(nhwc_to_nchw(out), ref, BF16, what="GroupNorm bf16")


SKIP_KINDS = ["full", "n11c", "nc"]


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("channels_last", [1, 0])
@pytest.mark.parametrize("skip_kind", SKIP_KINDS)
@pytest.mark.parametrize("shape", [(2, 16, 16, 320, 32), (1, 3, 5, 12, 3)])
def test_skip_group_norm(shape, skip_kind, channels_last, dtype):
    n, h, w, c, groups = shape
    with_bias = skip_kind != "n11c"
    want_s = skip_kind != "nc"
    x = _gn_input(n, h, w, c, dtype, channels_last)
    if skip_kind == "full":
        skip = _gn_input(n, h, w, c, dtype, channels_last)
    elif skip_kind == "n11c":
        skip = randn(n, 1, 1, c, dtype=dtype) if channels_last else randn(n, c, 1, 1, dtype=dtype)
    else:
        skip = randn(n, c, dtype=dtype)
    gamma, beta = randn(c), randn(c)
    bias = randn(c, dtype=dtype) if with_bias else None
    model = make_model(
        "SkipGroupNorm",
        [("X", dtype), ("gamma", F32), ("beta", F32), ("skip", dtype), ("bias", dtype) if with_bias else None],
        [("Y", dtype), ("S", dtype) if want_s else None],
        groups=groups,
        activation=1,
        channels_last=channels_last,
    )
    feeds = {"X": x, "gamma": gamma, "beta": beta, "skip": skip}
    if with_bias:
        feeds["bias"] = bias
    outs = {"Y": (x.shape, dtype)}
    if want_s:
        outs["S"] = (x.shape, dtype)
    got = run_or_skip(model, feeds, outs)
    skip_nchw = skip if skip.dim() == 2 else _as_nchw(skip, channels_last)
    y_ref, s_ref = reference.skip_group_norm(
        *to64(_as_nchw(x, channels_last), skip_nchw, bias, gamma, beta), groups, 1e-5, True
    )
    what = f"SkipGroupNorm{shape} {skip_kind} cl={channels_last}"
    assert_close(_as_nchw(got["Y"], channels_last), y_ref, dtype, what=what + " Y")
    if want_s:
        assert_close(_as_nchw(got["S"], channels_last), s_ref, dtype, what=what + " S")


# ---------------------------------------------------------------- BiasSplitGelu / BiasAdd


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 64, 2560), (2, 64, 5120), (1, 77, 10240), (3, 5, 6), (1, 1, 2)])
def test_bias_split_gelu(shape, dtype):
    x = randn(*shape, dtype=dtype)
    bias_dtype = F32 if shape[-1] % 5 else dtype
    bias = randn(shape[-1], dtype=bias_dtype)
    model = make_model("BiasSplitGelu", [("X", dtype), ("bias", bias_dtype)], [("Y", dtype)])
    out_shape = (*shape[:-1], shape[-1] // 2)
    out = run_or_skip(model, {"X": x, "bias": bias}, {"Y": (out_shape, dtype)})["Y"]
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), dtype, what=f"BiasSplitGelu{shape}")


@pytest.mark.parametrize("dtype", (F32, F16, BF16))
@pytest.mark.parametrize("shape", [(2, 1024, 320), (2, 256, 1280), (3, 77, 768), (5, 7, 96), (1, 1, 3)])
def test_bias_add(shape, dtype):
    x, skip = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    bias_dtype = F32 if shape[-1] % 320 else dtype
    bias = randn(shape[-1], dtype=bias_dtype)
    model = make_model("BiasAdd", [("X", dtype), ("bias", bias_dtype), ("skip", dtype)], [("Y", dtype)])
    out = run(model, {"X": x, "bias": bias, "skip": skip}, {"Y": (shape, dtype)})["Y"]
    baseline = (x + bias.to(dtype) + skip) if bias_dtype == dtype else None
    assert_close(out, reference.bias_add(*to64(x, bias, skip)), dtype, baseline=baseline, what=f"BiasAdd{shape}")


# ---------------------------------------------------------------- SkipLayerNormalization


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize(
    "shape,beta,bias,extras,bcast",
    [
        ((2, 77, 768), True, True, True, False),
        ((2, 256, 320), True, False, False, False),
        ((1, 256, 1280), False, True, True, False),
        ((2, 5, 7), True, True, True, True),
        ((3, 1, 3), False, False, True, False),
    ],
)
def test_skip_layer_norm(shape, beta, bias, extras, bcast, dtype):
    c = shape[-1]
    x = randn(*shape, dtype=dtype)
    skip = randn(*shape[1:], dtype=dtype) if bcast else randn(*shape, dtype=dtype)
    gamma = randn(c, dtype=dtype)
    b = randn(c, dtype=dtype) if beta else None
    bi = randn(c, dtype=dtype) if bias else None
    eps = 1e-5
    model = make_model(
        "SkipLayerNormalization",
        [
            ("input", dtype),
            ("skip", dtype),
            ("gamma", dtype),
            ("beta", dtype) if beta else None,
            ("bias", dtype) if bias else None,
        ],
        [
            ("output", dtype),
            ("mean", F32) if extras else None,
            ("inv_std_var", F32) if extras else None,
            ("sum", dtype) if extras else None,
        ],
        epsilon=eps,
    )
    feeds = {"input": x, "skip": skip, "gamma": gamma}
    if beta:
        feeds["beta"] = b
    if bias:
        feeds["bias"] = bi
    stat = (*shape[:-1], 1)
    outs = {"output": (shape, dtype)}
    if extras:
        outs.update(mean=(stat, F32), inv_std_var=(stat, F32), sum=(shape, dtype))
    got = run_or_skip(model, feeds, outs)
    x64, skip64, g64, b64, bi64 = to64(x, skip.expand(shape), gamma, b, bi)
    y_ref, s_ref = reference.skip_layer_norm(x64, skip64, g64, b64, bi64, eps)
    what = f"SkipLayerNormalization{shape}"
    assert_close(got["output"], y_ref, dtype, what=what)
    if extras:
        s64 = x64 + skip64 + (bi64 if bi64 is not None else 0)
        mean = s64.mean(-1, keepdim=True)
        inv_std = torch.rsqrt(s64.var(-1, unbiased=False, keepdim=True) + eps)
        # Statistics of the fp32 sum of the (rounded) inputs: fp32-level accuracy in every dtype.
        assert_close(got["mean"], mean, F32, what=what + " mean")
        assert_close(got["inv_std_var"], inv_std, F32, what=what + " inv_std_var")
        assert_close(got["sum"], s_ref, dtype, what=what + " sum")


# ---------------------------------------------------------------- MultiHeadAttention

# (B, S, N, H, L)
MHA_SHAPES = [(2, 64, 8, 40, 77), (1, 128, 5, 64, 128), (2, 16, 4, 80, 77), (1, 5, 3, 8, 7), (2, 1, 2, 16, 3)]


def _mha_ref(q, k, v, scale=None):
    return reference.attention(*to64(q, k, v), scale)


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", MHA_SHAPES)
def test_mha_separate(shape, dtype):
    b, s, n, h, L = shape
    hv = h if s % 2 else h + 8  # value head size may differ
    q, k, v = randn(b, s, n, h, dtype=dtype), randn(b, L, n, h, dtype=dtype), randn(b, L, n, hv, dtype=dtype)
    model = make_model(
        "MultiHeadAttention", [("query", dtype), ("key", dtype), ("value", dtype)], [("output", dtype)], num_heads=n
    )
    feeds = {"query": q.reshape(b, s, n * h), "key": k.reshape(b, L, n * h), "value": v.reshape(b, L, n * hv)}
    out = run_or_skip(model, feeds, {"output": ((b, s, n * hv), dtype)})["output"]
    assert_close(out.reshape(b, s, n, hv), _mha_ref(q, k, v), dtype, what=f"MHA{shape}")


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", MHA_SHAPES)
def test_mha_packed_qkv(shape, dtype):
    b, s, n, h, _ = shape
    qkv = randn(b, s, n, 3, h, dtype=dtype)
    scale = 0.3 if h == 8 else 0.0  # explicit scale attribute once; 0 = default 1/sqrt(h)
    model = make_model("MultiHeadAttention", [("query", dtype)], [("output", dtype)], num_heads=n, scale=scale)
    out = run_or_skip(model, {"query": qkv}, {"output": ((b, s, n * h), dtype)})["output"]
    ref = _mha_ref(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], scale or 1 / math.sqrt(h))
    assert_close(out.reshape(b, s, n, h), ref, dtype, what=f"MHA packed QKV{shape}")


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", MHA_SHAPES)
def test_mha_packed_kv(shape, dtype):
    b, s, n, h, L = shape
    q, kv = randn(b, s, n, h, dtype=dtype), randn(b, L, n, 2, h, dtype=dtype)
    model = make_model("MultiHeadAttention", [("query", dtype), ("key", dtype)], [("output", dtype)], num_heads=n)
    out = run_or_skip(model, {"query": q.reshape(b, s, n * h), "key": kv}, {"output": ((b, s, n * h), dtype)})
    ref = _mha_ref(q, kv[:, :, :, 0], kv[:, :, :, 1])
    assert_close(out["output"].reshape(b, s, n, h), ref, dtype, what=f"MHA packed KV{shape}")


# ---------------------------------------------------------------- bad inputs: ORT errors, never crashes


def _expect_error(model, feeds, outs, match):
    with pytest.raises(Exception, match=match) as ei:
        run(model, feeds, outs)
    assert "sdkern" in str(ei.value) or "ONNXRuntimeError" in str(ei.value)


def test_error_missing_attribute():
    model = make_model("GroupNorm", [("X", F32), ("gamma", F32), ("beta", F32)], [("Y", F32)], activation=0)
    with pytest.raises(Exception, match="required int attribute 'groups' is missing"):
        session(model)
    model = make_model("MultiHeadAttention", [("query", F32)], [("output", F32)])
    with pytest.raises(Exception, match="'num_heads' is missing"):
        session(model)


def test_error_bad_attribute_values():
    for attrs, match in [
        (dict(groups=0, activation=0), "'groups' must be positive"),
        (dict(groups=2, activation=3), "'activation' must be 0"),
        (dict(groups=2, activation=0, channels_last=2), "'channels_last' must be 0 or 1"),
    ]:
        model = make_model("GroupNorm", [("X", F32), ("gamma", F32), ("beta", F32)], [("Y", F32)], **attrs)
        with pytest.raises(Exception, match=match):
            session(model)


def test_error_group_norm_inputs():
    model = make_model("GroupNorm", [("X", F32), ("gamma", F32), ("beta", F32)], [("Y", F32)], groups=3, activation=0)
    x, g = randn(1, 4, 4, 8), randn(8)
    _expect_error(model, {"X": x, "gamma": g, "beta": g}, {"Y": (x.shape, F32)}, "C=8 are not divisible by groups=3")
    x3 = randn(1, 16, 6)
    _expect_error(model, {"X": x3, "gamma": randn(6), "beta": randn(6)}, {"Y": (x3.shape, F32)}, "must be 4-D")
    x = randn(1, 4, 4, 6)
    _expect_error(
        model, {"X": x, "gamma": randn(5), "beta": randn(6)}, {"Y": (x.shape, F32)}, r"gamma must have shape \[6\]"
    )


def test_error_skip_group_norm_skip_shape():
    model = make_model(
        "SkipGroupNorm",
        [("X", F32), ("gamma", F32), ("beta", F32), ("skip", F32)],
        [("Y", F32)],
        groups=2,
        activation=1,
    )
    x, g = randn(2, 4, 4, 8), randn(8)
    _expect_error(
        model, {"X": x, "gamma": g, "beta": g, "skip": randn(2, 4, 8)}, {"Y": (x.shape, F32)}, "skip has shape"
    )


def test_error_bias_split_gelu_odd():
    model = make_model("BiasSplitGelu", [("X", F32), ("bias", F32)], [("Y", F32)])
    x = randn(2, 3, 7)
    _expect_error(model, {"X": x, "bias": randn(7)}, {"Y": ((2, 3, 3), F32)}, "must be even, got 7")
    x = randn(2, 3, 8)
    _expect_error(model, {"X": x, "bias": randn(6)}, {"Y": ((2, 3, 4), F32)}, r"bias must have shape \[8\]")


def test_error_bias_add_mismatch():
    model = make_model("BiasAdd", [("X", F32), ("bias", F32), ("skip", F32)], [("Y", F32)])
    x = randn(2, 3, 8)
    _expect_error(model, {"X": x, "bias": randn(8), "skip": randn(2, 4, 8)}, {"Y": (x.shape, F32)}, "skip must have")


def test_error_skip_layer_norm_mismatch():
    model = make_model("SkipLayerNormalization", [("input", F32), ("skip", F32), ("gamma", F32)], [("output", F32)])
    x = randn(2, 3, 8)
    _expect_error(model, {"input": x, "skip": randn(2, 3, 7), "gamma": randn(8)}, {"output": (x.shape, F32)}, "skip")
    _expect_error(model, {"input": x, "skip": x, "gamma": randn(9)}, {"output": (x.shape, F32)}, "gamma")


def test_error_mha_forms():
    q = randn(1, 4, 2 * 8)
    # mask input: unsupported, clear error
    model = make_model(
        "MultiHeadAttention",
        [("query", F32), ("key", F32), ("value", F32), None, ("mask", F32)],
        [("output", F32)],
        num_heads=2,
    )
    _expect_error(
        model,
        {"query": q, "key": q, "value": q, "mask": randn(1, 4)},
        {"output": (q.shape, F32)},
        "'key_padding_mask' is not supported",
    )
    # query (B, S, N*H) without key
    model = make_model("MultiHeadAttention", [("query", F32)], [("output", F32)], num_heads=2)
    _expect_error(model, {"query": q}, {"output": (q.shape, F32)}, "needs key")
    # hidden size not divisible by heads
    model = make_model(
        "MultiHeadAttention", [("query", F32), ("key", F32), ("value", F32)], [("output", F32)], num_heads=3
    )
    _expect_error(model, {"query": q, "key": q, "value": q}, {"output": (q.shape, F32)}, "not divisible by num_heads")
    # packed QKV with a key
    model = make_model("MultiHeadAttention", [("query", F32), ("key", F32)], [("output", F32)], num_heads=2)
    _expect_error(model, {"query": randn(1, 4, 2, 3, 8), "key": q}, {"output": (q.shape, F32)}, "takes no key")
    # packed KV with wrong head count
    _expect_error(model, {"query": q, "key": randn(1, 5, 3, 2, 8)}, {"output": (q.shape, F32)}, "packed KV key must be")
    # present_key output requested
    model = make_model("MultiHeadAttention", [("query", F32)], [("output", F32), ("present_key", F32)], num_heads=2)
    with pytest.raises(Exception, match="'present_key' is not supported"):
        session(model)


# ---------------------------------------------------------------- unidirectional (causal) MultiHeadAttention
# (B, S, N, H, L): CLIP text self-attention (SD 1.x 12 x 64, SDXL bigG 20 x 64, 77 tokens), odd sizes, and
# S < L (query i sees keys j <= i + L - S, as ORT's kernel aligns the mask after past keys).
MHA_CAUSAL = [(2, 77, 12, 64, 77), (1, 77, 20, 64, 77), (1, 1, 2, 16, 1), (2, 5, 3, 8, 5), (1, 7, 2, 40, 19)]


@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", MHA_CAUSAL, ids=lambda s: "x".join(map(str, s)))
def test_mha_unidirectional(shape, dtype):
    b, s, n, h, L = shape
    if s == L:  # packed QKV, CLIP's self-attention form
        qkv = randn(b, s, n, 3, h, dtype=dtype)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        model = make_model("MultiHeadAttention", [("query", dtype)], [("output", dtype)], num_heads=n, unidirectional=1)
        feeds = {"query": qkv}
    else:
        q, k, v = randn(b, s, n, h, dtype=dtype), randn(b, L, n, h, dtype=dtype), randn(b, L, n, h, dtype=dtype)
        model = make_model(
            "MultiHeadAttention",
            [("query", dtype), ("key", dtype), ("value", dtype)],
            [("output", dtype)],
            num_heads=n,
            unidirectional=1,
        )
        feeds = {"query": q.reshape(b, s, n * h), "key": k.reshape(b, L, n * h), "value": v.reshape(b, L, n * h)}
    out = run_or_skip(model, feeds, {"output": ((b, s, n * h), dtype)})["output"].reshape(b, s, n, h)
    ref = reference.attention(*to64(q, k, v), None, True)
    # plain PyTorch in the same dtype (fp32 math for fp16 inputs on CPU is what torch does there too)
    mask = reference.causal_mask(s, L)
    base = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    assert_close(out, ref, dtype, baseline=base, what=f"MHA unidirectional{shape}")
    assert (ref - reference.attention(*to64(q, k, v), None, False)).abs().max() > 0 or s == 1


def test_error_mha_unidirectional():
    q = randn(1, 6, 2 * 8)
    for attrs, match in [(dict(unidirectional=2), "'unidirectional' must be 0 or 1")]:
        model = make_model("MultiHeadAttention", [("query", F32)], [("output", F32)], num_heads=2, **attrs)
        with pytest.raises(Exception, match=match):
            session(model)
    model = make_model(
        "MultiHeadAttention", [("query", F32), ("key", F32), ("value", F32)], [("output", F32)], num_heads=2,
        unidirectional=1,
    )  # fmt: skip
    k = randn(1, 4, 2 * 8)
    _expect_error(model, {"query": q, "key": k, "value": k}, {"output": (q.shape, F32)}, "needs query length 6")
