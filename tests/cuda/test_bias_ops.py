"""CUDA C++ bias_add and bias_split_gelu (sdkern._C_cuda) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import reference
from tests.utils import DTYPES, assert_close, randn, to64

pytestmark = pytest.mark.cuda

ADD_SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (3, 77, 768), (5, 7, 96), (1, 1, 3), (4, 9, 13)]
GELU_SHAPES = [(2, 4096, 2560), (2, 1024, 5120), (2, 64, 10240), (3, 77, 14), (1, 1, 2), (5, 3, 66)]


def _gpu(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ADD_SHAPES)
def test_bias_add(shape, dtype, poison, cuda_native):
    x, skip, bias = _gpu(randn(*shape, dtype=dtype), randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype))
    out = sdkern.ops.bias_add(x, bias, skip)
    assert cuda_native["bias_add"] == 1
    assert_close(out, reference.bias_add(*to64(x, bias, skip)), dtype, baseline=x + bias + skip, what=f"{shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_add_fp32_bias_and_strided_rows(dtype, poison, cuda_native):
    base = randn(2, 50, 640, dtype=dtype).cuda()
    x = base[:, :, 8:328]  # rows 640 apart, 16-byte aligned
    xo = base[:, :, 3:323]  # rows 640 apart, misaligned: scalar path
    skip, bias = randn(2, 50, 320, dtype=dtype).cuda(), randn(320).cuda()
    for xi in (x, xo):
        out = sdkern.ops.bias_add(xi, bias, skip)
        assert out.is_contiguous()
        assert_close(out, reference.bias_add(*to64(xi, bias, skip)), dtype, what="strided rows")
    assert cuda_native["bias_add"] == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GELU_SHAPES)
def test_bias_split_gelu(shape, dtype, poison, cuda_native):
    x, bias = _gpu(randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype))
    out = sdkern.ops.bias_split_gelu(x, bias)
    assert cuda_native["bias_split_gelu"] == 1
    h = x + bias
    a, g = h.chunk(2, dim=-1)
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), dtype, baseline=a * F.gelu(g), what=f"{shape}")


def test_bias_split_gelu_strided_fp32_bias(poison, cuda_native):
    base = randn(3, 40, 2 * 1280 + 16, dtype=torch.float16).cuda()
    x = base[..., : 2 * 1280]
    bias = randn(2 * 1280).cuda()
    out = sdkern.ops.bias_split_gelu(x, bias)
    assert cuda_native["bias_split_gelu"] == 1
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), torch.float16, what="strided")
