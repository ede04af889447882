"""CUDA C++ skip_layer_norm (sdkern._C_cuda) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import reference
from tests.utils import DTYPES, assert_close, randn, to64

pytestmark = pytest.mark.cuda

# (M rows, C): SD widths, then odd sizes, then rows too long for the shared-memory row cache.
SHAPES = [(4096, 320), (1024, 640), (154, 768), (77, 1024), (256, 1280), (33, 7), (5, 1000), (3, 20000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_skip_layer_norm(shape, dtype, with_bias, poison, cuda_native):
    m, c = shape
    x, skip = randn(m, c, dtype=dtype).cuda(), randn(m, c, dtype=dtype).cuda()
    gamma, beta = randn(c, dtype=dtype).cuda(), randn(c, dtype=dtype).cuda()
    bias = randn(c, dtype=dtype).cuda() if with_bias else None
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta=beta, bias=bias, eps=1e-5)
    assert cuda_native["skip_layer_norm"] == 1
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), 1e-5)
    sb = x + skip + (bias if bias is not None else 0)
    assert_close(s, rs, dtype, what=f"s{shape}")
    # torch in the same dtype tightens the fp16/bf16 bound; fp32 uses the DESIGN.md tolerance (both are
    # within a few ulps there, and 2x-of-torch would only measure summation order)
    base = None if dtype == torch.float32 else F.layer_norm(sb.float(), (c,), gamma.float(), beta.float()).to(dtype)
    assert_close(y, ry, dtype, baseline=base, what=f"y{shape}")


def test_skip_layer_norm_no_beta_fp32_params_strided(poison, cuda_native):
    base = randn(2, 77, 1024 + 8, dtype=torch.bfloat16).cuda()
    x = base[..., :1024]
    skip = randn(2, 77, 1024, dtype=torch.bfloat16).cuda()
    gamma, bias = randn(1024).cuda(), randn(1024).cuda()
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta=None, bias=bias, eps=1e-6)
    assert cuda_native["skip_layer_norm"] == 1
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, None, bias), 1e-6)
    assert_close(y, ry, torch.bfloat16, what="y")
    assert_close(s, rs, torch.bfloat16, what="s")


def test_skip_layer_norm_large_mean(poison, cuda_native):
    # mean far from zero relative to the spread: the two-pass variance must not cancel
    x = randn(64, 640, shift=20.0).cuda()
    skip = randn(64, 640).cuda()
    gamma, beta = randn(640).cuda(), randn(640).cuda()
    y, _ = sdkern.ops.skip_layer_norm(x, skip, gamma, beta=beta)
    ry, _ = reference.skip_layer_norm(*to64(x, skip, gamma, beta, None), 1e-5)
    assert_close(y, ry, torch.float32, what="large mean")
    assert cuda_native["skip_layer_norm"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 77, 768), (2, 77, 1280), (3, 7, 100), (2, 20000)])
def test_layer_norm_no_skip(shape, dtype, poison, cuda_native):
    """skip=None: a plain LayerNorm (vector, scalar and uncached-row kernels)."""
    c = shape[-1]
    x = randn(*shape, dtype=dtype).cuda()
    g, be = randn(c, dtype=dtype).cuda(), randn(c, dtype=dtype).cuda()
    y, s = sdkern.ops.skip_layer_norm(x, None, g, be, None, 1e-5)
    assert cuda_native["skip_layer_norm"] == 1
    ry, _ = reference.skip_layer_norm(*to64(x, None, g, be, None), 1e-5)
    assert_close(y, ry, dtype, baseline=F.layer_norm(x, (c,), g, be, 1e-5), what=f"layer_norm {shape}")
    assert torch.equal(s, x)
