"""attention on the CUDA C++ implementation (``sdkern._C_cuda``) against the float64 reference, on SD sizes.

The fp32 cases use DESIGN.md's tolerance (their baseline is None); fp16/bf16 are held to 2x the error of
torch's SDPA computed in fp32 from the same rounded inputs. Skipped without a GPU (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from sdkern.ops import reference
from tests.ops._harness import DTYPES, assert_close, impls, to64

# fp16/bf16 with D == Dv, D % 8 == 0, D <= 160 run the tensor-core flash kernel (head dims 40, 64, 80,
# 128, 160, and 72 which is padded); fp32, other head dims and odd strides run the simple kernel.
# (B, Sq, Sk, H, D): SD self-attention, text cross-attention (Sk = 77), odd lengths.
CUDA_SHAPES = [
    (2, 1024, 1024, 8, 40),
    (2, 4096, 77, 8, 40),
    (2, 256, 256, 16, 80),
    (2, 64, 77, 8, 160),
    (2, 1024, 1024, 10, 64),
    (1, 300, 300, 4, 128),
    (3, 100, 33, 2, 72),
    (1, 17, 5, 3, 64),
    (2, 65, 129, 2, 24),
    (1, 7, 9, 1, 20),
]


def _naive(q, k, v, scale):
    """The same computation in the same dtype with plain torch (baseline for the fp16/bf16 error bound).

    None for fp32: there the DESIGN.md tolerance applies (a 2x-of-torch bound would only measure
    summation order and exp rounding, both at the ulp level)."""
    if q.dtype == torch.float32:
        return None
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_attention_cuda(impl, shape, dtype, poison):
    b, sq, sk, h, d = shape
    q, k, v = impl.randn(b, sq, h, d, dtype=dtype), impl.randn(b, sk, h, d, dtype=dtype)
    v = impl.randn(b, sk, h, d, dtype=dtype)
    out = impl.run("attention", q, k, v, None)
    ref = reference.attention(*to64(q, k, v))
    assert_close(out, ref, dtype, baseline=_naive(q, k, v, 1 / math.sqrt(d)), what=f"{shape}")


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_qkv_views_and_scale_cuda(impl, dtype, poison):
    b, s, h, d = 2, 333, 8, 64
    qkv = impl.randn(b, s, 3, h, d, dtype=dtype)  # one fused projection, viewed without copies
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert q.stride() == (s * 3 * h * d, 3 * h * d, d, 1)
    out = impl.run("attention", q, k, v, 0.3)
    assert_close(out, reference.attention(*to64(q, k, v), 0.3), dtype, baseline=_naive(q, k, v, 0.3), what="qkv")


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_kv_cross_cuda(impl, dtype, poison):
    b, sq, sk, h, d = 2, 1024, 77, 8, 40
    q = impl.randn(b, sq, h * d, dtype=dtype).view(b, sq, h, d)
    kv = impl.randn(b, sk, 2, h, d, dtype=dtype)
    k, v = kv[:, :, 0], kv[:, :, 1]
    out = impl.run("attention", q, k, v, None)
    ref = reference.attention(*to64(q, k, v))
    assert_close(out, ref, dtype, baseline=_naive(q, k, v, 1 / math.sqrt(d)), what="kv")


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
def test_dv_differs_and_odd_stride_cuda(impl, poison):
    # Dv != D and a stride that is not a multiple of 8 elements: the simple kernel
    q = impl.randn(2, 50, 3, 40, dtype=torch.float16)
    kb = impl.randn(2, 61, 3, 43, dtype=torch.float16)
    k = kb[..., :40]
    v = impl.randn(2, 61, 3, 24, dtype=torch.float16)
    out = impl.run("attention", q, k, v, None)
    assert out.shape == (2, 50, 3, 24)
    assert_close(out, reference.attention(*to64(q, k, v)), torch.float16, what="dv")


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
def test_large_scores_cuda(impl, poison):
    # peaked softmax (large logits): the online max rescaling must keep it exact
    q = impl.randn(1, 128, 2, 64, dtype=torch.float16, scale=4.0)
    k = impl.randn(1, 200, 2, 64, dtype=torch.float16, scale=4.0)
    v = impl.randn(1, 200, 2, 64, dtype=torch.float16)
    out = impl.run("attention", q, k, v, None)
    assert_close(out, reference.attention(*to64(q, k, v)), torch.float16, what="peaked")


# Causal (CLIP text self-attention: 77 tokens, 12 / 20 heads of 64), odd lengths, Sq < Sk (bottom-right).
# fp16/bf16 at D = 64 run the tensor-core kernel (diagonal tiles masked), fp32 and D = 24 the simple one.
CUDA_CAUSAL = [(2, 77, 77, 12, 64), (2, 77, 77, 20, 64), (1, 1, 1, 2, 64), (2, 5, 5, 3, 64), (1, 200, 333, 2, 24)]


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_CAUSAL)
def test_causal_cuda(impl, shape, dtype, poison):
    b, sq, sk, h, d = shape
    q, k = impl.randn(b, sq, h, d, dtype=dtype), impl.randn(b, sk, h, d, dtype=dtype)
    v = impl.randn(b, sk, h, d, dtype=dtype)
    out = impl.run("attention", q, k, v, None, True)
    ref = reference.attention(*to64(q, k, v), None, True)
    base = None
    if dtype != torch.float32:
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        s = s.masked_fill(~reference.causal_mask(sq, sk, q.device), float("-inf"))
        base = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    assert_close(out, ref, dtype, baseline=base, what=f"causal {shape}")
