"""skip_group_norm CPU C++ kernel against the float64 reference: s = x + skip + bias, y = GroupNorm(s) (+SiLU).

As in test_group_norm.py, numeric tests call the native launcher directly so that a fallback to the
PyTorch reference cannot pass unnoticed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _launch, reference
from tests.utils import DTYPES, assert_close, fp32_sum, randn, to64

CL, NCHW = torch.channels_last, torch.contiguous_format

# The last one has N * groups = 1: NCHW then takes the per-channel-row path instead of the per-group one.
SHAPES = [
    (2, 320, 16, 16, 32),
    (2, 1280, 8, 8, 32),
    (2, 96, 5, 7, 8),
    (1, 64, 1, 1, 32),
    (2, 24, 3, 3, 24),
    (1, 40, 9, 11, 1),
]
SKIPS = ["full", "nc11", "nc"]


def native_skip_group_norm(x, skip, bias, gamma, beta, groups, eps=1e-5, silu=False):
    from sdkern import _C

    return _launch.skip_group_norm(_C, x, skip, bias, gamma, beta, groups, eps, silu)


def make_skip(kind, n, c, h, w, dtype, fmt):
    if kind == "full":
        return randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    if kind == "nc11":
        return randn(n, c, 1, 1, dtype=dtype)
    return randn(n, c, dtype=dtype)


def torch_baseline(x, skip, bias, gamma, beta, groups, eps, silu):
    """Plain PyTorch in x's dtype: (x + skip + bias) rounded, then group_norm (+silu)."""
    sk = skip if skip.dim() == 4 else skip[:, :, None, None]
    s = x + sk
    if bias is not None:
        s = s + bias.to(x.dtype)[None, :, None, None]
    y = F.group_norm(s, groups, gamma.to(x.dtype), beta.to(x.dtype), eps)
    return (F.silu(y) if silu else y), s


def check(x, skip, bias, gamma, beta, groups, silu, fmt, eps=1e-5, what="", baseline=True):
    y, s = native_skip_group_norm(x, skip, bias, gamma, beta, groups, eps, silu)
    ry, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), groups, eps, silu)
    by, bs = torch_baseline(x, skip, bias, gamma, beta, groups, eps, silu) if baseline else (None, None)
    # float64 GroupNorm of the fp32 sum: the error every correct kernel inherits from rounding it.
    sk = skip if skip.dim() == 4 else skip[:, :, None, None]
    iy = reference.group_norm(*to64(fp32_sum(x, sk, bias, channel_dim=1), gamma, beta), groups, eps, silu)
    for name, t in (("y", y), ("s", s)):
        assert t.is_contiguous(memory_format=fmt), f"{what}: {name} lost the memory format"
    assert_close(s, rs, x.dtype, baseline=bs, what=f"{what} s")
    assert_close(y, ry, x.dtype, baseline=by, what=f"{what} y", inherent=iy)


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", SKIPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_skip_group_norm(shape, kind, dtype, fmt, poison):
    n, c, h, w, groups = shape
    x = randn(n, c, h, w, dtype=dtype, scale=1.5, shift=0.2).contiguous(memory_format=fmt)
    skip = make_skip(kind, n, c, h, w, dtype, fmt)
    with_bias = (c + len(kind)) % 2 == 0 or dtype == torch.float32
    bias = randn(c, dtype=dtype) if with_bias else None
    gamma, beta = randn(c, dtype=dtype, shift=1.0), randn(c, dtype=dtype)
    silu = kind != "nc"
    check(x, skip, bias, gamma, beta, groups, silu, fmt, what=f"{shape} {kind} bias={with_bias} silu={silu}")


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_group_norm_sd_64x64(dtype, fmt, poison):
    x = randn(2, 320, 64, 64, dtype=dtype).contiguous(memory_format=fmt)
    skip = randn(2, 320, 64, 64, dtype=dtype).contiguous(memory_format=fmt)
    bias, gamma, beta = randn(320, dtype=dtype), randn(320, dtype=dtype), randn(320, dtype=dtype)
    check(x, skip, bias, gamma, beta, 32, True, fmt, what="2x320x64x64")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skip_group_norm_fp32_params(dtype, poison):
    """gamma/beta (and bias) in fp32 with half-precision x, as ONNX Runtime keeps them."""
    x = randn(2, 320, 6, 10, dtype=dtype).contiguous(memory_format=CL)
    skip = randn(2, 320, dtype=dtype)
    bias, gamma, beta = randn(320), randn(320, shift=1.0), randn(320)
    check(x, skip, bias, gamma, beta, 32, True, CL, what="fp32 params")


@pytest.mark.parametrize("xfmt,kfmt", [(CL, NCHW), (NCHW, CL)], ids=["x_nhwc-skip_nchw", "x_nchw-skip_nhwc"])
def test_skip_group_norm_mixed_formats(xfmt, kfmt, poison):
    """skip in the other memory format than x: strided skip rows; outputs follow x."""
    x = randn(2, 64, 5, 6, dtype=torch.float16).contiguous(memory_format=xfmt)
    skip = randn(2, 64, 5, 6, dtype=torch.float16).contiguous(memory_format=kfmt)
    bias, gamma, beta = randn(64), randn(64), randn(64)
    check(x, skip, bias, gamma, beta, 16, True, xfmt, what="mixed formats")


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_skip_group_norm_large_mean(dtype, fmt, poison):
    """s around 1000 (x = 1000 + randn, skip and bias O(1)): no catastrophic cancellation in the statistics.

    The kernel normalises the fp32 sum (x + skip) + bias, whose rounding near 1000 alone is ~1e-5 of the
    O(1) spread, so y is compared with the float64 group norm of that same fp32 sum (s still against the
    exact float64 sum).
    """
    x = randn(2, 320, 20, 20, dtype=dtype, shift=1000.0).contiguous(memory_format=fmt)
    skip = randn(2, 320, 20, 20, dtype=dtype).contiguous(memory_format=fmt)
    bias, gamma, beta = randn(320, dtype=dtype), randn(320, dtype=dtype), randn(320, dtype=dtype)
    y, s = native_skip_group_norm(x, skip, bias, gamma, beta, 32, 1e-5, False)
    _, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), 32, 1e-5, False)
    s32 = (x.float() + skip.float()) + bias.float()[None, :, None, None]
    ry = reference.group_norm(*to64(s32, gamma, beta), 32, 1e-5, False)
    assert_close(s, rs, dtype, what="large mean s")
    assert_close(y, ry.to(torch.float64), dtype, what="large mean y")


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
def test_skip_group_norm_public_op(fmt, poison):
    x = randn(2, 320, 10, 10, dtype=torch.float16).contiguous(memory_format=fmt)
    skip, bias, gamma, beta = randn(2, 320, 1, 1, dtype=torch.float16), randn(320), randn(320), randn(320)
    a = sdkern.ops.skip_group_norm(x, skip, gamma, beta, bias=bias, groups=32, eps=1e-5, silu=True)
    b = torch.ops.sdkern.skip_group_norm(x, skip, bias, gamma, beta, 32, 1e-5, True)
    c = native_skip_group_norm(x, skip, bias, gamma, beta, 32, 1e-5, True)
    for u, v, w in zip(a, b, c, strict=True):
        assert torch.equal(u, w) and torch.equal(v, w)
        assert u.is_contiguous(memory_format=fmt)


def test_skip_group_norm_every_isa(poison):
    from sdkern import _C

    active = _C.cpu_isa()
    try:
        for fmt in (CL, NCHW):
            for dtype in DTYPES:
                x = randn(2, 160, 7, 9, dtype=dtype).contiguous(memory_format=fmt)
                skip = randn(2, 160, 7, 9, dtype=dtype).contiguous(memory_format=fmt)
                bias, gamma, beta = randn(160, dtype=dtype), randn(160), randn(160)
                ry, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), 32, 1e-5, True)
                for isa in _C.build_info()["isa_built"]:
                    if _C.set_cpu_isa(isa):
                        y, s = native_skip_group_norm(x, skip, bias, gamma, beta, 32, 1e-5, True)
                        assert_close(s, rs, dtype, what=f"isa {isa} {dtype} s")
                        assert_close(y, ry, dtype, what=f"isa {isa} {dtype} y")
    finally:
        _C.set_cpu_isa(active)


def test_skip_group_norm_bad_inputs():
    x = randn(2, 64, 4, 4)
    g, b = randn(64), randn(64)
    with pytest.raises(ValueError, match="skip"):
        sdkern.ops.skip_group_norm(x, randn(2, 64, 4, 3), g, b, groups=8)
    with pytest.raises(ValueError, match="skip"):
        sdkern.ops.skip_group_norm(x, randn(2, 63), g, b, groups=8)
    with pytest.raises(TypeError, match="skip"):
        sdkern.ops.skip_group_norm(x, x.half(), g, b, groups=8)
    with pytest.raises(ValueError, match="bias"):
        sdkern.ops.skip_group_norm(x, x, g, b, bias=randn(32), groups=8)
    with pytest.raises(ValueError, match="groups"):
        sdkern.ops.skip_group_norm(x, x, g, b, groups=5)
    with pytest.raises(ValueError, match="gamma"):
        sdkern.ops.skip_group_norm(x, x, randn(32), b, groups=8)


def test_skip_group_norm_native_validates():
    """A direct _C call without skip, or with negative strides, raises instead of crashing."""
    from sdkern import _C

    x, g, b = randn(2, 64, 4, 4), randn(64), randn(64)
    y, s = torch.empty_like(x), torch.empty_like(x)
    head = [x.data_ptr()]
    rest = [0, g.data_ptr(), b.data_ptr(), y.data_ptr(), s.data_ptr(), 2, 64, 16, 8, 1e-5, False, 1024, 16, 1]
    with pytest.raises(ValueError, match="skip"):
        _C.skip_group_norm(*head, 0, *rest, 1024, 16, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="skip"):
        _C.skip_group_norm(*head, x.data_ptr(), *rest, -1024, 16, 1, 0, 0, 0)
