"""attention as sdkern's ONNX Runtime MultiHeadAttention (domain ``sdkern``, CPU EP) against the float64 reference:
separate, packed-QKV and packed-KV forms, unidirectional (causal), and the error paths.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdkern.ops import reference
from tests.ops._harness import assert_close, impls, randn, to64

# ------------------------------------------------------------------------------------------------- ort
# MultiHeadAttention (B, S, N, H, L)
MHA_SHAPES = [(2, 64, 8, 40, 77), (1, 128, 5, 64, 128), (2, 16, 4, 80, 77), (1, 5, 3, 8, 7), (2, 1, 2, 16, 3)]
ORT_DTYPES = (torch.float32, torch.float16)


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", MHA_SHAPES)
def test_mha_separate_ort(impl, shape, dtype):
    ortutil = impl.module
    b, s, n, h, L = shape
    hv = h if s % 2 else h + 8  # value head size may differ
    q, k, v = randn(b, s, n, h, dtype=dtype), randn(b, L, n, h, dtype=dtype), randn(b, L, n, hv, dtype=dtype)
    model = ortutil.make_model(
        "MultiHeadAttention", [("query", dtype), ("key", dtype), ("value", dtype)], [("output", dtype)], num_heads=n
    )
    feeds = {"query": q.reshape(b, s, n * h), "key": k.reshape(b, L, n * h), "value": v.reshape(b, L, n * hv)}
    out = ortutil.run_or_skip(model, feeds, {"output": ((b, s, n * hv), dtype)})["output"]
    assert_close(out.reshape(b, s, n, hv), reference.attention(*to64(q, k, v), None), dtype, what=f"MHA{shape}")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", MHA_SHAPES)
def test_mha_packed_qkv_ort(impl, shape, dtype):
    ortutil = impl.module
    b, s, n, h, _ = shape
    qkv = randn(b, s, n, 3, h, dtype=dtype)
    scale = 0.3 if h == 8 else 0.0  # explicit scale attribute once; 0 = default 1/sqrt(h)
    model = ortutil.make_model("MultiHeadAttention", [("query", dtype)], [("output", dtype)], num_heads=n, scale=scale)
    out = ortutil.run_or_skip(model, {"query": qkv}, {"output": ((b, s, n * h), dtype)})["output"]
    ref = reference.attention(*to64(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]), scale or 1 / math.sqrt(h))
    assert_close(out.reshape(b, s, n, h), ref, dtype, what=f"MHA packed QKV{shape}")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", MHA_SHAPES)
def test_mha_packed_kv_ort(impl, shape, dtype):
    ortutil = impl.module
    b, s, n, h, L = shape
    q, kv = randn(b, s, n, h, dtype=dtype), randn(b, L, n, 2, h, dtype=dtype)
    model = ortutil.make_model(
        "MultiHeadAttention", [("query", dtype), ("key", dtype)], [("output", dtype)], num_heads=n
    )
    feeds = {"query": q.reshape(b, s, n * h), "key": kv}
    out = ortutil.run_or_skip(model, feeds, {"output": ((b, s, n * h), dtype)})
    ref = reference.attention(*to64(q, kv[:, :, :, 0], kv[:, :, :, 1]), None)
    assert_close(out["output"].reshape(b, s, n, h), ref, dtype, what=f"MHA packed KV{shape}")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_mha_error_missing_attribute_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    model = ortutil.make_model("MultiHeadAttention", [("query", f32)], [("output", f32)])
    with pytest.raises(Exception, match="'num_heads' is missing"):
        ortutil.session(model)


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_mha_error_forms_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    make_model, expect_error = ortutil.make_model, ortutil.expect_error
    q = randn(1, 4, 2 * 8)
    # mask input: unsupported, clear error
    model = make_model(
        "MultiHeadAttention",
        [("query", f32), ("key", f32), ("value", f32), None, ("mask", f32)],
        [("output", f32)],
        num_heads=2,
    )
    expect_error(
        model,
        {"query": q, "key": q, "value": q, "mask": randn(1, 4)},
        {"output": (q.shape, f32)},
        "'key_padding_mask' is not supported",
    )
    # query (B, S, N*H) without key
    model = make_model("MultiHeadAttention", [("query", f32)], [("output", f32)], num_heads=2)
    expect_error(model, {"query": q}, {"output": (q.shape, f32)}, "needs key")
    # hidden size not divisible by heads
    model = make_model(
        "MultiHeadAttention", [("query", f32), ("key", f32), ("value", f32)], [("output", f32)], num_heads=3
    )
    expect_error(model, {"query": q, "key": q, "value": q}, {"output": (q.shape, f32)}, "not divisible by num_heads")
    # packed QKV with a key
    model = make_model("MultiHeadAttention", [("query", f32), ("key", f32)], [("output", f32)], num_heads=2)
    expect_error(model, {"query": randn(1, 4, 2, 3, 8), "key": q}, {"output": (q.shape, f32)}, "takes no key")
    # packed KV with wrong head count
    expect_error(model, {"query": q, "key": randn(1, 5, 3, 2, 8)}, {"output": (q.shape, f32)}, "packed KV key must be")
    # present_key output requested
    model = make_model("MultiHeadAttention", [("query", f32)], [("output", f32), ("present_key", f32)], num_heads=2)
    with pytest.raises(Exception, match="'present_key' is not supported"):
        ortutil.session(model)


# unidirectional (causal) MultiHeadAttention, (B, S, N, H, L): CLIP text self-attention (SD 1.x 12 x 64, SDXL
# bigG 20 x 64, 77 tokens), odd sizes, and S < L (query i sees keys j <= i + L - S, as ORT's kernel aligns the
# mask after past keys).
MHA_CAUSAL = [(2, 77, 12, 64, 77), (1, 77, 20, 64, 77), (1, 1, 2, 16, 1), (2, 5, 3, 8, 5), (1, 7, 2, 40, 19)]


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", ORT_DTYPES)
@pytest.mark.parametrize("shape", MHA_CAUSAL, ids=lambda s: "x".join(map(str, s)))
def test_mha_unidirectional_ort(impl, shape, dtype):
    ortutil = impl.module
    b, s, n, h, L = shape
    if s == L:  # packed QKV, CLIP's self-attention form
        qkv = randn(b, s, n, 3, h, dtype=dtype)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        model = ortutil.make_model(
            "MultiHeadAttention", [("query", dtype)], [("output", dtype)], num_heads=n, unidirectional=1
        )
        feeds = {"query": qkv}
    else:
        q, k, v = randn(b, s, n, h, dtype=dtype), randn(b, L, n, h, dtype=dtype), randn(b, L, n, h, dtype=dtype)
        model = ortutil.make_model(
            "MultiHeadAttention",
            [("query", dtype), ("key", dtype), ("value", dtype)],
            [("output", dtype)],
            num_heads=n,
            unidirectional=1,
        )
        feeds = {"query": q.reshape(b, s, n * h), "key": k.reshape(b, L, n * h), "value": v.reshape(b, L, n * h)}
    out = ortutil.run_or_skip(model, feeds, {"output": ((b, s, n * h), dtype)})["output"].reshape(b, s, n, h)
    ref = reference.attention(*to64(q, k, v), None, True)
    # plain PyTorch in the same dtype (fp32 math for fp16 inputs on CPU is what torch does there too)
    mask = reference.causal_mask(s, L)
    base = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    assert_close(out, ref, dtype, baseline=base, what=f"MHA unidirectional{shape}")
    assert (ref - reference.attention(*to64(q, k, v), None, False)).abs().max() > 0 or s == 1


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_mha_error_unidirectional_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    q = randn(1, 6, 2 * 8)
    for attrs, match in [(dict(unidirectional=2), "'unidirectional' must be 0 or 1")]:
        model = ortutil.make_model("MultiHeadAttention", [("query", f32)], [("output", f32)], num_heads=2, **attrs)
        with pytest.raises(Exception, match=match):
            ortutil.session(model)
    model = ortutil.make_model(
        "MultiHeadAttention", [("query", f32), ("key", f32), ("value", f32)], [("output", f32)], num_heads=2,
        unidirectional=1,
    )  # fmt: skip
    k = randn(1, 4, 2 * 8)
    ortutil.expect_error(model, {"query": q, "key": k, "value": k}, {"output": (q.shape, f32)}, "needs query length 6")
