"""bias_add (CPU C++ kernel) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import sdkern
from sdkern.ops import reference
from tests.utils import DTYPES, assert_close, randn, to64

SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 64, 1280), (3, 77, 768), (5, 7, 96), (1, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_add(shape, dtype, poison):
    x, skip = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    bias = randn(shape[-1], dtype=dtype)
    out = sdkern.ops.bias_add(x, bias, skip)
    ref = reference.bias_add(*to64(x, bias, skip))
    assert_close(out, ref, dtype, baseline=x + bias + skip, what=f"bias_add{shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_add_fp32_bias(dtype, poison):
    x, skip = randn(2, 33, 320, dtype=dtype), randn(2, 33, 320, dtype=dtype)
    bias = randn(320)
    out = sdkern.ops.bias_add(x, bias, skip)
    assert_close(out, reference.bias_add(*to64(x, bias, skip)), dtype, what="fp32 bias")


def test_bias_add_strided_rows(poison):
    base = randn(2, 50, 640)
    x = base[:, :, :320]  # rows 640 apart, last dim contiguous
    skip = randn(2, 50, 320)
    bias = randn(320)
    out = sdkern.ops.bias_add(x, bias, skip)
    assert out.is_contiguous()
    assert_close(out, reference.bias_add(*to64(x, bias, skip)), torch.float32, what="strided rows")


def test_bias_add_every_isa(poison):
    from sdkern import _C

    x, skip, bias = randn(3, 17, 1280, dtype=torch.float16), randn(3, 17, 1280, dtype=torch.float16), randn(1280)
    ref = reference.bias_add(*to64(x, bias, skip))
    active = _C.cpu_isa()
    try:
        for isa in _C.build_info()["isa_built"]:
            if _C.set_cpu_isa(isa):
                assert_close(sdkern.ops.bias_add(x, bias, skip), ref, torch.float16, what=f"isa {isa}")
    finally:
        _C.set_cpu_isa(active)


def test_bias_add_bad_inputs():
    x = randn(2, 8, 16)
    with pytest.raises(ValueError, match="bias"):
        sdkern.ops.bias_add(x, randn(15), x)
    with pytest.raises(ValueError, match="skip"):
        sdkern.ops.bias_add(x, randn(16), randn(2, 8, 15))
    with pytest.raises(TypeError, match="skip"):
        sdkern.ops.bias_add(x, randn(16), x.half())
    with pytest.raises(TypeError, match="x"):
        sdkern.ops.bias_add(x.to(torch.int32), randn(16), x.to(torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        sdkern.ops.bias_add(randn(16, 8).t(), randn(16), randn(8, 16))
