"""bias_split_gelu on every implementation (cpu, triton, cuda, ort) against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _dispatch, reference
from tests.ops._harness import DTYPES, assert_close, cases, grid, impls, randn, to64

# (rows..., 2D): SD GEGLU widths with fewer rows than a real U-Net (the kernel is row-parallel, the
# row count only changes the work split), plus odd ones: D = 48, D = 3, 2D not a multiple of 16,
# odd row counts.
SHAPES = [(2, 64, 2560), (2, 16, 5120), (3, 10240), (2, 77, 2560), (5, 7, 96), (35, 6), (3, 13, 26), (1, 1282)]
# triton: few rows for the interpreter; cuda: SD sizes (2D = 2560 / 5120 / 10240) and odd ones.
TRITON_SHAPES = [(2, 9, 2 * 320), (3, 5, 2 * 37), (1, 2560), (2, 3, 2 * 1280)]
CUDA_SHAPES = [(2, 4096, 2560), (2, 1024, 5120), (2, 64, 10240), (3, 77, 14), (1, 1, 2), (5, 3, 66)]


@pytest.fixture(autouse=True)
def _native_only(monkeypatch):
    """Fail instead of silently falling back to the PyTorch reference: these tests are for the kernels."""

    def fail(key, msg, *args, **kwargs):
        raise AssertionError("sdkern fell back: " + msg % args)

    monkeypatch.setattr(_dispatch, "log_once", fail)


def _torch_same_dtype(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    a, g = (x + bias.to(x.dtype)).chunk(2, dim=-1)
    return a * F.gelu(g)


@pytest.mark.parametrize(
    "impl,shape,dtype,scale",
    cases(
        cpu=grid(SHAPES, DTYPES, [2.0]),
        triton=grid(TRITON_SHAPES, DTYPES, [1.0]),
        cuda=grid(CUDA_SHAPES, DTYPES, [1.0]),
    ),
    indirect=["impl"],
)
def test_bias_split_gelu(impl, shape, dtype, scale, poison):
    x, bias = impl.randn(*shape, dtype=dtype, scale=scale), impl.randn(shape[-1], dtype=dtype)
    out = impl.run("bias_split_gelu", x, bias)
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


# ---------------------------------------------------------------------------------------------- triton


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_strided_triton(impl, poison):
    base = impl.randn(3, 11, 700)
    x, bias = base[..., 10:650], impl.randn(640, dtype=torch.float32)
    out = impl.run("bias_split_gelu", x, bias)
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), torch.float32, what="strided")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_parameter_views_triton(impl, poison):
    """A strided bias view reads as the values it shows (issue 19 item 1)."""
    m, c = 5, 96
    x = impl.randn(m, c)
    bias = impl.randn(2 * c)[::2]
    y = impl.run("bias_split_gelu", x, bias)
    assert_close(y, reference.bias_split_gelu(*to64(x, bias)), torch.float32, what="bias_split_gelu")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_launcher_validates_triton(impl):
    with pytest.raises(ValueError, match="even"):
        impl.module.bias_split_gelu(impl.randn(2, 7), impl.randn(7))


# ------------------------------------------------------------------------------------------------ cuda


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
def test_strided_fp32_bias_cuda(impl, poison):
    base = impl.randn(3, 40, 2 * 1280 + 16, dtype=torch.float16)
    x = base[..., : 2 * 1280]
    bias = impl.randn(2 * 1280)
    out = impl.run("bias_split_gelu", x, bias)
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), torch.float16, what="strided")


# ------------------------------------------------------------------------------------------------- ort


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("shape", [(2, 64, 2560), (2, 64, 5120), (1, 77, 10240), (3, 5, 6), (1, 1, 2)])
def test_bias_split_gelu_ort(impl, shape, dtype):
    ortutil = impl.module
    x = randn(*shape, dtype=dtype)
    bias_dtype = torch.float32 if shape[-1] % 5 else dtype
    bias = randn(shape[-1], dtype=bias_dtype)
    model = ortutil.make_model("BiasSplitGelu", [("X", dtype), ("bias", bias_dtype)], [("Y", dtype)])
    out_shape = (*shape[:-1], shape[-1] // 2)
    out = ortutil.run_or_skip(model, {"X": x, "bias": bias}, {"Y": (out_shape, dtype)})["Y"]
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), dtype, what=f"BiasSplitGelu{shape}")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_bias_split_gelu_error_odd_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    model = ortutil.make_model("BiasSplitGelu", [("X", f32), ("bias", f32)], [("Y", f32)])
    x = randn(2, 3, 7)
    ortutil.expect_error(model, {"X": x, "bias": randn(7)}, {"Y": ((2, 3, 3), f32)}, "must be even, got 7")
    x = randn(2, 3, 8)
    ortutil.expect_error(model, {"X": x, "bias": randn(6)}, {"Y": ((2, 3, 4), f32)}, r"bias must have shape \[8\]")
