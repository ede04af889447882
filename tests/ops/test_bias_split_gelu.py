"""bias_split_gelu (CPU C++ kernel) against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _dispatch, reference
from tests.utils import DTYPES, assert_close, randn, to64

# (rows..., 2D): SD GEGLU widths with fewer rows than a real U-Net (the kernel is row-parallel, the
# row count only changes the work split), plus odd ones: D = 48, D = 3, 2D not a multiple of 16,
# odd row counts.
SHAPES = [(2, 64, 2560), (2, 16, 5120), (3, 10240), (2, 77, 2560), (5, 7, 96), (35, 6), (3, 13, 26), (1, 1282)]


@pytest.fixture(autouse=True)
def _native_only(monkeypatch):
    """Fail instead of silently falling back to the PyTorch reference: these tests are for the C++ kernel."""

    def fail(key, msg, *args, **kwargs):
        raise AssertionError("sdkern fell back: " + msg % args)

    monkeypatch.setattr(_dispatch, "log_once", fail)


def _torch_same_dtype(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    a, g = (x + bias.to(x.dtype)).chunk(2, dim=-1)
    return a * F.gelu(g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_split_gelu(shape, dtype, poison):
    x, bias = randn(*shape, dtype=dtype, scale=2.0), randn(shape[-1], dtype=dtype)
    out = sdkern.ops.bias_split_gelu(x, bias)
    ref = reference.bias_split_gelu(*to64(x, bias))
    assert_close(out, ref, dtype, baseline=_torch_same_dtype(x, bias), what=f"bias_split_gelu{shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_bias(dtype, poison):
    x, bias = randn(2, 33, 1280, dtype=dtype), randn(1280)
    out = sdkern.ops.bias_split_gelu(x, bias)
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), dtype, what="fp32 bias")


def test_strided_rows(poison):
    base = randn(2, 50, 1024)
    x = base[:, :, 100:740]  # rows 1024 apart, last dim contiguous, 2D = 640
    bias = randn(640)
    out = sdkern.ops.bias_split_gelu(x, bias)
    assert out.shape == (2, 50, 320) and out.is_contiguous()
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), torch.float32, what="strided rows")


def test_gelu_accuracy_elementwise(poison):
    """The vectorised erf/exp (kernels/cpu/vec_math.h) element by element: y = 1 * gelu(g) on a dense
    grid of g in [-12, 12] must match float64 to a few fp32 ulp (relative), tails included."""
    n = 4096
    g = torch.linspace(-12.0, 12.0, n, dtype=torch.float64) + torch.rand(n, dtype=torch.float64) * 1e-3
    g = g.float()
    x = torch.cat([torch.ones(1, n), g[None]], dim=1)
    out = sdkern.ops.bias_split_gelu(x, torch.zeros(2 * n))[0].double()
    g64 = g.double()
    exact = 0.5 * g64 * torch.special.erfc(-g64 / math.sqrt(2.0))
    keep = exact.abs() > 1e-30  # below this fp32 subnormals limit the relative precision
    rel = ((out - exact).abs() / exact.abs())[keep]
    assert rel.max().item() < 1e-6, f"max relative error {rel.max().item():.3e}"
    assert torch.equal(out[~keep].abs() < 1e-30, torch.ones_like(out[~keep], dtype=torch.bool))


def test_every_isa(poison):
    from sdkern import _C

    x, bias = randn(3, 17, 2 * 520, dtype=torch.bfloat16), randn(2 * 520)
    ref = reference.bias_split_gelu(*to64(x, bias))
    active = _C.cpu_isa()
    ran = []
    try:
        for isa in _C.build_info()["isa_built"]:
            if _C.set_cpu_isa(isa):
                ran.append(isa)
                assert_close(sdkern.ops.bias_split_gelu(x, bias), ref, torch.bfloat16, what=f"isa {isa}")
                x32 = x.float()
                assert_close(sdkern.ops.bias_split_gelu(x32, bias), ref, torch.float32, what=f"isa {isa} fp32")
    finally:
        _C.set_cpu_isa(active)
    assert "baseline" in ran


def test_bad_inputs():
    x = randn(2, 8, 16)
    with pytest.raises(ValueError, match="bias"):
        sdkern.ops.bias_split_gelu(x, randn(8))
    with pytest.raises(ValueError, match="even"):
        sdkern.ops.bias_split_gelu(randn(2, 8, 15), randn(15))
    with pytest.raises(TypeError, match="bias"):
        sdkern.ops.bias_split_gelu(x.half(), randn(16).bfloat16())
    with pytest.raises(TypeError, match="x"):
        sdkern.ops.bias_split_gelu(x.to(torch.int32), randn(16))
    with pytest.raises(ValueError, match="contiguous"):
        sdkern.ops.bias_split_gelu(randn(16, 8).t(), randn(16))


def test_native_rejects_bad_sizes():
    from sdkern import _C

    x, b, y = randn(4, 16), randn(16), randn(4, 8)
    with pytest.raises(ValueError, match="stride"):
        _C.bias_split_gelu(x.data_ptr(), b.data_ptr(), y.data_ptr(), 4, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="null"):
        _C.bias_split_gelu(0, b.data_ptr(), y.data_ptr(), 4, 8, 16, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.bias_split_gelu(x.data_ptr(), b.data_ptr(), y.data_ptr(), 4, 8, 16, 7, 0)
