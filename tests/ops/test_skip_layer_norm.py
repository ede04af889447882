"""skip_layer_norm (CPU C++ kernel) against the float64 reference, including the native-only
mean / inv_std outputs (ONNX Runtime's optional outputs) through sdkern._C."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _dispatch, reference
from tests.utils import DTYPES, assert_close, fp32_sum, randn, to64

# SD transformer widths (tokens x C) and odd ones: M = 35 rows of 96, C = 3, a single row, and C = 4500
# (longer than the kernel's row buffer: the recompute path).
SHAPES = [
    (2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 77, 768), (2, 77, 1024),
    (35, 96), (3, 7, 3), (1, 1, 5), (3, 4500),
]  # fmt: skip
EPS = 1e-5


@pytest.fixture(autouse=True)
def _native_only(monkeypatch):
    """Fail instead of silently falling back to the PyTorch reference: these tests are for the C++ kernel."""

    def fail(key, msg, *args, **kwargs):
        raise AssertionError("sdkern fell back: " + msg % args)

    monkeypatch.setattr(_dispatch, "log_once", fail)


def _torch_same_dtype(x, skip, gamma, beta, bias):
    s = x + skip
    if bias is not None:
        s = s + bias.to(x.dtype)
    b = beta.to(x.dtype) if beta is not None else None
    return F.layer_norm(s, (s.shape[-1],), gamma.to(x.dtype), b, EPS), s


def _check(x, skip, gamma, beta, bias, dtype, what, shift=0.0):
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, EPS)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), EPS)
    by, bs = _torch_same_dtype(x, skip, gamma, beta, bias)
    # float64 LayerNorm of the fp32 sum (x + skip) + bias the kernel normalises: its inherited error.
    v = fp32_sum(x, skip, bias)
    iy, _ = reference.skip_layer_norm(*to64(v, torch.zeros_like(v), gamma, beta, None), EPS)
    assert_close(y, ry, dtype, baseline=by, what=f"{what} y", inherent=iy)
    assert_close(s, rs, dtype, baseline=bs, what=f"{what} s")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_skip_layer_norm(shape, dtype, poison):
    c = shape[-1]
    x, skip = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    gamma, beta, bias = randn(c, dtype=dtype), randn(c, dtype=dtype), randn(c, dtype=dtype)
    _check(x, skip, gamma, beta, bias, dtype, f"skip_layer_norm{shape}")


@pytest.mark.parametrize("with_beta", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optional_params(with_beta, with_bias, dtype, poison):
    x, skip = randn(3, 21, 640, dtype=dtype), randn(3, 21, 640, dtype=dtype)
    gamma = randn(640, dtype=dtype)
    beta = randn(640, dtype=dtype) if with_beta else None
    bias = randn(640, dtype=dtype) if with_bias else None
    _check(x, skip, gamma, beta, bias, dtype, f"beta={with_beta} bias={with_bias}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_params(dtype, poison):
    x, skip = randn(2, 33, 768, dtype=dtype), randn(2, 33, 768, dtype=dtype)
    gamma, beta, bias = randn(768), randn(768), randn(768)
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, EPS)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), EPS)
    assert_close(y, ry, dtype, what="fp32 params y")
    assert_close(s, rs, dtype, what="fp32 params s")


def test_strided_rows(poison):
    xb, kb = randn(2, 50, 1000), randn(2, 50, 700)
    x, skip = xb[:, :, 17:337], kb[:, :, 300:620]  # rows 1000 / 700 apart, last dim contiguous
    gamma, beta, bias = randn(320), randn(320), randn(320)
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, EPS)
    assert y.is_contiguous() and s.is_contiguous()
    _check(x, skip, gamma, beta, bias, torch.float32, "strided rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_mean(dtype, poison):
    """Rows with a large mean and std ~1: a one-pass E[s^2] - E[s]^2 variance would lose everything.

    The inputs are quantised so that s = x + skip is exact in fp32 (as the op's semantics round s to
    fp32, an inexact s would put the rounding of s itself, not the kernel, into the comparison).
    """
    mean, q = (1000.0, 1024.0) if dtype == torch.float32 else (96.0, 2.0)
    x = (torch.randn(4, 64, 640, dtype=torch.float64) * q).round() / q + mean
    skip = (torch.randn(4, 64, 640, dtype=torch.float64) * 0.5 * q).round() / q
    x, skip = x.to(dtype), skip.to(dtype)
    assert torch.equal(x.double() + skip.double(), (x.float() + skip.float()).double())
    gamma, beta = randn(640), randn(640)
    y, _ = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, None, EPS)
    ry, _ = reference.skip_layer_norm(*to64(x, skip, gamma, beta, None), EPS)
    assert_close(y, ry, dtype, what="large mean")


def test_every_isa(poison):
    from sdkern import _C

    x, skip = randn(3, 17, 1280, dtype=torch.float16), randn(3, 17, 1280, dtype=torch.float16)
    gamma, beta, bias = randn(1280), randn(1280), randn(1280)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), EPS)
    active = _C.cpu_isa()
    ran = []
    try:
        for isa in _C.build_info()["isa_built"]:
            if _C.set_cpu_isa(isa):
                ran.append(isa)
                y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, EPS)
                assert_close(y, ry, torch.float16, what=f"isa {isa} y")
                assert_close(s, rs, torch.float16, what=f"isa {isa} s")
    finally:
        _C.set_cpu_isa(active)
    assert "baseline" in ran


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_mean_inv_std(dtype, poison):
    """sdkern._C.skip_layer_norm with the optional fp32 mean / inv_std outputs, no s, beta or bias."""
    from sdkern import _C

    m, c = 37, 320
    x, skip = randn(m, c, dtype=dtype, shift=3.0), randn(m, c, dtype=dtype, scale=2.0)
    gamma = randn(c, dtype=dtype)
    y = torch.empty(m, c, dtype=dtype)
    mean, inv_std = torch.empty(m), torch.empty(m)
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    _C.skip_layer_norm(
        x.data_ptr(), skip.data_ptr(), gamma.data_ptr(), 0, 0, y.data_ptr(), 0, m, c, c, c, EPS, code, code,
        mean=mean.data_ptr(), inv_std=inv_std.data_ptr(),
    )  # fmt: skip
    x64, k64, g64 = to64(x, skip, gamma)
    s64 = x64 + k64
    mu = s64.mean(-1)
    var = (s64 - mu[:, None]).square().mean(-1)
    istd = (var + EPS).rsqrt()
    assert_close(mean, mu, torch.float32, what="mean")
    assert_close(inv_std, istd, torch.float32, what="inv_std")
    ry, _ = reference.skip_layer_norm(x64, k64, g64, None, None, EPS)
    assert_close(y, ry, dtype, what="y without s")


def test_bad_inputs():
    x = randn(2, 8, 16)
    g = randn(16)
    with pytest.raises(ValueError, match="gamma"):
        sdkern.ops.skip_layer_norm(x, x, randn(15), None, None, EPS)
    with pytest.raises(ValueError, match="beta"):
        sdkern.ops.skip_layer_norm(x, x, g, randn(8), None, EPS)
    with pytest.raises(ValueError, match="bias"):
        sdkern.ops.skip_layer_norm(x, x, g, None, randn(17), EPS)
    with pytest.raises(ValueError, match="skip"):
        sdkern.ops.skip_layer_norm(x, randn(2, 8, 15), g, None, None, EPS)
    with pytest.raises(TypeError, match="skip"):
        sdkern.ops.skip_layer_norm(x, x.half(), g, None, None, EPS)
    with pytest.raises(TypeError, match="gamma"):
        sdkern.ops.skip_layer_norm(x.half(), x.half(), g.bfloat16(), None, None, EPS)
    with pytest.raises(ValueError, match="eps"):
        sdkern.ops.skip_layer_norm(x, x, g, None, None, -1.0)
    with pytest.raises(ValueError, match="contiguous"):
        sdkern.ops.skip_layer_norm(randn(16, 8).t(), randn(8, 16), g, None, None, EPS)


def test_native_rejects_bad_sizes():
    from sdkern import _C

    x, g, y = randn(4, 16), randn(16), randn(4, 16)
    args = [x.data_ptr(), x.data_ptr(), g.data_ptr(), 0, 0, y.data_ptr(), 0, 4, 16]
    with pytest.raises(ValueError, match="stride"):
        _C.skip_layer_norm(*args, 8, 16, EPS, 0, 0)
    with pytest.raises(ValueError, match="eps"):
        _C.skip_layer_norm(*args, 16, 16, -1.0, 0, 0)
    with pytest.raises(ValueError, match="null"):
        _C.skip_layer_norm(0, *args[1:], 16, 16, EPS, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.skip_layer_norm(*args, 16, 16, EPS, 0, 5)


# ---------------------------------------------------------------------------------------------
# skip=None: a plain LayerNorm (CLIP layer_norm1 / final_layer_norm, the transformer blocks' norm1)
# CLIP widths: SD 1.x (768), SDXL text_encoder_2 (1280); odd ones and the recompute path (C > the
# kernel's row buffer). (A U-Net block's norm1 width, 640, is in test_layer_norm_no_skip_variants.)
PLAIN_SHAPES = [(2, 77, 768), (2, 77, 1280), (35, 96), (1, 1, 5), (3, 4500)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PLAIN_SHAPES)
def test_layer_norm_no_skip(shape, dtype, poison):
    c = shape[-1]
    x = randn(*shape, dtype=dtype, shift=0.5)
    gamma, beta = randn(c, dtype=dtype), randn(c, dtype=dtype)
    y, s = sdkern.ops.skip_layer_norm(x, None, gamma, beta, None, EPS)
    ry, _ = reference.skip_layer_norm(*to64(x, None, gamma, beta, None), EPS)
    torch.testing.assert_close(ry, F.layer_norm(*to64(x), (c,), *to64(gamma, beta), EPS), rtol=1e-12, atol=1e-12)
    assert_close(y, ry, dtype, baseline=F.layer_norm(x, (c,), gamma, beta, EPS), what=f"layer_norm{shape}")
    assert torch.equal(s, x)  # s = x without skip and bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_no_skip_variants(dtype, poison):
    """fp32 params on half input, no beta, a bias, strided rows (a view of a wider tensor)."""
    base = randn(3, 21, 700, dtype=dtype)
    x = base[..., 30:670]
    gamma, bias = randn(640), randn(640)
    y, s = sdkern.ops.skip_layer_norm(x, None, gamma, None, bias, EPS)
    ry, rs = reference.skip_layer_norm(*to64(x, None, gamma, None, bias), EPS)
    assert_close(y, ry, dtype, what="layer_norm strided, bias, no beta")
    assert_close(s, rs, dtype, what="s = x + bias")


def test_layer_norm_no_skip_checks():
    x = randn(2, 8, 16)
    with pytest.raises(ValueError, match="gamma"):
        sdkern.ops.skip_layer_norm(x, None, randn(15), None, None, EPS)
    y, _ = sdkern.ops.skip_layer_norm(x[:, :0], None, randn(16), None, None, EPS)
    assert y.shape == (2, 0, 16)
