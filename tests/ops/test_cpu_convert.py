"""Storage conversions of the CPU kernels (kernels/cpu/simd.h), exercised through bias_add:
fp16/bf16 loads and round-to-nearest-even stores must match torch bit for bit, including
subnormals, overflow to inf, inf and NaN."""

from __future__ import annotations

import pytest
import torch

import sdkern
from sdkern.ops import _dispatch


@pytest.fixture(autouse=True)
def _native_only(monkeypatch):
    def fail(key, msg, *args, **kwargs):
        raise AssertionError("sdkern fell back: " + msg % args)

    monkeypatch.setattr(_dispatch, "log_once", fail)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_store_every_bit_pattern(dtype, poison):
    """y = x + 0 + 0 returns every non-NaN 16-bit pattern unchanged (NaN stays NaN)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    zero = torch.zeros_like(x)
    nan = torch.isnan(x)
    from sdkern import _C

    active = _C.cpu_isa()
    try:
        for isa in _C.build_info()["isa_built"]:
            if _C.set_cpu_isa(isa):
                y = sdkern.ops.bias_add(x, torch.zeros(256, dtype=dtype), zero)
                assert torch.equal(torch.isnan(y), nan), isa
                assert torch.equal(y[~nan].view(torch.int16), (x + zero)[~nan].view(torch.int16)), isa
    finally:
        _C.set_cpu_isa(active)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_rounding(dtype, poison):
    """fp32 sums rounded to fp16/bf16 as torch rounds them, across the whole exponent range."""
    m, c = 64, 512
    mant = torch.rand(m, c, dtype=torch.float64) + 1.0
    expo = torch.randint(-30, 20, (m, c)).double() if dtype == torch.float16 else torch.randint(-140, 130, (m, c))
    sign = torch.where(torch.rand(m, c) < 0.5, -1.0, 1.0).double()
    x = (sign * mant * torch.pow(2.0, expo.double())).float()  # fp32 values, many not representable in dtype
    bias = x[0].clone()
    x[0] = 0.0
    # y = x16 + bias32 + 0 with x16 = 0 in row 0 (pure rounding of bias) and x16 = round(x) elsewhere.
    x16 = x.to(dtype)
    expect = (x16.float() + bias + torch.zeros_like(x16).float()).to(dtype)
    nan = torch.isnan(expect)
    from sdkern import _C

    active = _C.cpu_isa()
    try:
        for isa in _C.build_info()["isa_built"]:
            if _C.set_cpu_isa(isa):
                y = sdkern.ops.bias_add(x16, bias, torch.zeros_like(x16))
                assert torch.equal(torch.isnan(y), nan), isa
                assert torch.equal(y[~nan].view(torch.int16), expect[~nan].view(torch.int16)), isa
    finally:
        _C.set_cpu_isa(active)
