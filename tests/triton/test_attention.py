"""Triton flash attention against the float64 reference: SD head dims, Sk=77, strided views, all dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sdkern.triton as T
from sdkern.ops import reference
from tests.triton.conftest import DEVICE
from tests.utils import DTYPES, assert_close, randn, to64


def _sdpa(q, k, v, scale):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "sq", "sk"), [(40, 45, 77), (64, 70, 70), (80, 33, 77), (128, 20, 77), (160, 37, 50)])
def test_attention(d, sq, sk, dtype, poison):
    b, h = 2, 2
    q = randn(b, sq, h, d, dtype=dtype, device=DEVICE)
    k = randn(b, sk, h, d, dtype=dtype, device=DEVICE)
    v = randn(b, sk, h, d, dtype=dtype, device=DEVICE)
    out = T.attention(q, k, v, None)
    ref = reference.attention(*to64(q, k, v), None)
    assert_close(out, ref, dtype, baseline=_sdpa(q, k, v, 1.0 / math.sqrt(d)), what=f"attn d={d} {sq}x{sk}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_packed_qkv_views(dtype, poison):
    # Packed projections: q, k, v are strided views of one (B, S, 3, H, D) buffer; no copies.
    b, s, h, d = 1, 50, 3, 40
    qkv = randn(b, s, 3, h, d, dtype=dtype, device=DEVICE, scale=2.0)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = T.attention(q, k, v, 0.3)
    ref = reference.attention(*to64(q, k, v), 0.3)
    assert_close(out, ref, dtype, baseline=_sdpa(q, k, v, 0.3), what="packed qkv")


def test_attention_cross_kv_views_dv(poison):
    # Cross-attention with packed KV (B, 77, 2, H, D) and a different value head dim.
    q = randn(2, 17, 2, 64, dtype=torch.float16, device=DEVICE)
    kv = randn(2, 77, 2, 2, 64, dtype=torch.float16, device=DEVICE)
    k, v = kv[:, :, 0], kv[:, :, 1, :, :24]
    out = T.attention(q, k, v, None)
    assert out.shape == (2, 17, 2, 24)
    assert_close(out, reference.attention(*to64(q, k, v), None), torch.float16, what="kv views, Dv=24")


def test_attention_validates():
    q = randn(1, 4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="k"):
        T.attention(q, randn(1, 4, 3, 8, device=DEVICE), q, None)
    with pytest.raises(TypeError, match="v"):
        T.attention(q, q, q.half(), None)


def _sdpa_causal(q, k, v, scale):
    sq, sk = q.shape[1], k.shape[1]
    mask = None if sq == sk else reference.causal_mask(sq, sk, q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=sq == sk, scale=scale
    )
    return o.transpose(1, 2)


# (B, Sq, Sk, H, D): CLIP text self-attention per head (77 tokens, head dim 64; SD 1.x has 12 heads, SDXL's
# bigG encoder 20: every (batch, head) is its own program, so 2 heads keep the interpreter quick and cover
# the same per-program work; the CPU tests run the full head counts), odd lengths, Sq < Sk (bottom-right
# aligned), one query.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 77, 77, 2, 64), (1, 1, 1, 2, 64), (2, 5, 5, 2, 40), (1, 20, 45, 2, 80)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_attention_causal(shape, dtype, poison):
    b, sq, sk, h, d = shape
    qkv = randn(b, sq, 3, h, d, dtype=dtype, device=DEVICE)  # packed QKV views when Sq == Sk
    q = qkv[:, :, 0]
    if sq == sk:
        k, v = qkv[:, :, 1], qkv[:, :, 2]
    else:
        k, v = randn(b, sk, h, d, dtype=dtype, device=DEVICE), randn(b, sk, h, d, dtype=dtype, device=DEVICE)
    out = T.attention(q, k, v, None, True)
    ref = reference.attention(*to64(q, k, v), None, True)
    assert_close(out, ref, dtype, baseline=_sdpa_causal(q, k, v, 1.0 / math.sqrt(d)), what=f"causal {shape}")


def test_attention_causal_refuses_sq_over_sk():
    q = randn(1, 6, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="causal"):
        T.attention(q, q[:, :4], q[:, :4], None, True)
