"""group_norm (+SiLU) CPU C++ kernel against the float64 reference.

The numeric tests call the native launcher directly (``sdkern.ops._launch`` with ``sdkern._C``), so a
kernel that reports "unsupported" fails instead of silently falling back to the PyTorch reference;
``test_group_norm_public_op`` checks that the public op gives the same bits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _launch, reference
from tests.utils import DTYPES, assert_close, randn, to64

CL, NCHW = torch.channels_last, torch.contiguous_format

# (N, C, H, W, groups): SD shapes (32 groups; the largest kept to a few cases) and odd ones.
SD_SHAPES = [(2, 320, 8, 8, 32), (2, 640, 16, 16, 32), (2, 1280, 8, 8, 32), (2, 320, 32, 32, 32)]
ODD_SHAPES = [
    (2, 96, 5, 7, 8),  # C=96, H*W = 35
    (1, 64, 1, 1, 32),  # one pixel
    (3, 24, 4, 5, 1),  # one group
    (2, 24, 3, 3, 24),  # groups = C
    (1, 6, 11, 13, 3),  # C smaller than a vector
    (1, 40, 9, 11, 1),  # N * groups = 1: NCHW takes the per-channel-row path, not the per-group one
    (1, 64, 32, 32, 1),  # the same with two threads at work
]


def native_group_norm(x, gamma, beta, groups, eps=1e-5, silu=False):
    """Run the C++ kernel (no fallback possible: NotImplementedError would propagate)."""
    from sdkern import _C

    return _launch.group_norm(_C, x, gamma, beta, groups, eps, silu)


def torch_baseline(x, gamma, beta, groups, eps, silu):
    """Plain PyTorch in x's dtype (the error the fused kernel is allowed to double)."""
    y = F.group_norm(x, groups, gamma.to(x.dtype), beta.to(x.dtype), eps)
    return F.silu(y) if silu else y


def check(x, gamma, beta, groups, silu, eps=1e-5, what=""):
    fmt = CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else NCHW
    out = native_group_norm(x, gamma, beta, groups, eps, silu)
    ref = reference.group_norm(*to64(x, gamma, beta), groups, eps, silu)
    assert out.is_contiguous(memory_format=fmt), f"{what}: output lost the memory format"
    assert_close(out, ref, x.dtype, baseline=torch_baseline(x, gamma, beta, groups, eps, silu), what=what)
    return out


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SD_SHAPES + ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm(shape, dtype, fmt, poison):
    n, c, h, w, groups = shape
    x = randn(n, c, h, w, dtype=dtype, scale=1.5, shift=0.3).contiguous(memory_format=fmt)
    gamma, beta = randn(c, dtype=dtype, shift=1.0), randn(c, dtype=dtype)
    silu = (c + h) % 2 == 0 or dtype == torch.float32  # both settings covered across the grid
    check(x, gamma, beta, groups, silu, what=f"group_norm{shape} silu={silu}")


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
def test_group_norm_sd_64x64(fmt, silu, poison):
    x = randn(2, 640, 64, 64, dtype=torch.bfloat16).contiguous(memory_format=fmt)
    gamma, beta = randn(640, dtype=torch.bfloat16), randn(640, dtype=torch.bfloat16)
    check(x, gamma, beta, 32, silu, what="group_norm 2x640x64x64 bf16")


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_fp32_params(dtype, fmt, poison):
    x = randn(2, 320, 9, 7, dtype=dtype).contiguous(memory_format=fmt)
    gamma, beta = randn(320, shift=1.0), randn(320)
    check(x, gamma, beta, 32, True, what="fp32 gamma/beta")


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_large_mean(dtype, fmt, poison):
    """1000 + randn: sums of squares about zero would cancel catastrophically in fp32."""
    x = randn(2, 320, 24, 24, dtype=dtype, shift=1000.0).contiguous(memory_format=fmt)
    gamma, beta = randn(320, dtype=dtype), randn(320, dtype=dtype)
    out = native_group_norm(x, gamma, beta, 32, 1e-5, False)
    ref = reference.group_norm(*to64(x, gamma, beta), 32, 1e-5, False)
    assert_close(out, ref, dtype, what="large mean")  # DESIGN.md tolerance (torch itself misses it in fp32)


def test_group_norm_eps_matters(poison):
    """Nearly constant groups (variance 1e-6 << eps = 1e-2): the result depends on eps being applied."""
    x = randn(2, 64, 4, 4, scale=1e-3, shift=3.0).contiguous(memory_format=CL)
    gamma, beta = randn(64), randn(64)
    check(x, gamma, beta, 8, False, eps=1e-2, what="eps")


def test_group_norm_non_dense_input(poison):
    """A strided (non-dense) view is accepted; the result is exact against the reference."""
    base = randn(2, 320, 12, 20).contiguous(memory_format=CL)
    x = base[:, :, :, ::2]
    gamma, beta = randn(320), randn(320)
    out = sdkern.ops.group_norm(x, gamma, beta, groups=32, eps=1e-5, silu=True)
    ref = reference.group_norm(*to64(x, gamma, beta), 32, 1e-5, True)
    assert_close(out, ref, torch.float32, what="non-dense")


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
def test_group_norm_public_op(fmt, poison):
    x = randn(2, 320, 10, 10, dtype=torch.bfloat16).contiguous(memory_format=fmt)
    gamma, beta = randn(320), randn(320)
    a = sdkern.ops.group_norm(x, gamma, beta, groups=32, eps=1e-5, silu=True)
    b = torch.ops.sdkern.group_norm(x, gamma, beta, 32, 1e-5, True)
    c = native_group_norm(x, gamma, beta, 32, 1e-5, True)
    assert torch.equal(a, c) and torch.equal(b, c)
    assert a.is_contiguous(memory_format=fmt)


def test_group_norm_every_isa(poison):
    from sdkern import _C

    active = _C.cpu_isa()
    try:
        for fmt in (CL, NCHW):
            for dtype in DTYPES:
                x = randn(2, 160, 7, 9, dtype=dtype).contiguous(memory_format=fmt)
                gamma, beta = randn(160), randn(160)
                ref = reference.group_norm(*to64(x, gamma, beta), 32, 1e-5, True)
                for isa in _C.build_info()["isa_built"]:
                    if _C.set_cpu_isa(isa):
                        out = native_group_norm(x, gamma, beta, 32, 1e-5, True)
                        assert_close(out, ref, dtype, what=f"isa {isa} {dtype} {fmt}")
    finally:
        _C.set_cpu_isa(active)


def test_group_norm_bad_inputs():
    x = randn(2, 64, 4, 4)
    g, b = randn(64), randn(64)
    with pytest.raises(ValueError, match="groups"):
        sdkern.ops.group_norm(x, g, b, groups=7)
    with pytest.raises(ValueError, match="groups"):
        sdkern.ops.group_norm(x, g, b, groups=0)
    with pytest.raises(ValueError, match="x"):
        sdkern.ops.group_norm(randn(2, 64, 16), g, b, groups=8)
    with pytest.raises(ValueError, match="gamma"):
        sdkern.ops.group_norm(x, randn(63), b, groups=8)
    with pytest.raises(ValueError, match="beta"):
        sdkern.ops.group_norm(x, g, randn(65), groups=8)
    with pytest.raises(TypeError, match="x"):
        sdkern.ops.group_norm(x.to(torch.int32), g, b, groups=8)
    with pytest.raises(TypeError, match="gamma"):
        sdkern.ops.group_norm(x.half(), g.bfloat16(), b.bfloat16(), groups=8)
    with pytest.raises(ValueError, match="eps"):
        sdkern.ops.group_norm(x, g, b, groups=8, eps=-1.0)


def test_group_norm_native_validates():
    """The C++ launcher re-validates: bad sizes from a direct _C call raise, never crash."""
    from sdkern import _C

    x, g, b = randn(2, 64, 4, 4), randn(64), randn(64)
    y = torch.empty_like(x)
    args = [x.data_ptr(), g.data_ptr(), b.data_ptr(), y.data_ptr(), 2, 64, 16]
    tail = [1e-5, False, 64 * 16, 16, 1, 0, 0]
    with pytest.raises(ValueError, match="divisible"):
        _C.group_norm(*args, 7, *tail)
    with pytest.raises(ValueError, match="groups"):
        _C.group_norm(*args, 0, *tail)
    with pytest.raises(ValueError, match="null"):
        _C.group_norm(0, g.data_ptr(), b.data_ptr(), y.data_ptr(), 2, 64, 16, 8, *tail)
