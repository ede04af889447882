"""bias_add on every implementation (cpu, triton, cuda, ort) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import sdkern
from sdkern.ops import reference
from tests.ops._harness import DTYPES, assert_close, cases, grid, impls, randn, to64

# cpu: SD widths and odd ones; triton: few rows (the interpreter runs a program per row); cuda: SD sizes.
SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 64, 1280), (3, 77, 768), (5, 7, 96), (1, 1, 3)]
TRITON_SHAPES = [(2, 33, 320), (3, 7, 96), (1, 1, 3), (2, 5, 1280), (4, 77, 768)]
CUDA_SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (3, 77, 768), (5, 7, 96), (1, 1, 3), (4, 9, 13)]


@pytest.mark.parametrize(
    "impl,shape,dtype",
    cases(cpu=grid(SHAPES, DTYPES), triton=grid(TRITON_SHAPES, DTYPES), cuda=grid(CUDA_SHAPES, DTYPES)),
    indirect=["impl"],
)
def test_bias_add(impl, shape, dtype, poison):
    x, skip = impl.randn(*shape, dtype=dtype), impl.randn(*shape, dtype=dtype)
    bias = impl.randn(shape[-1], dtype=dtype)
    out = impl.run("bias_add", x, bias, skip)
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


# ---------------------------------------------------------------------------------------------- triton


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_bias_add_strided_fp32_bias_triton(impl, poison):
    base = impl.randn(2, 19, 640, dtype=torch.float16)
    x, skip, bias = base[:, :, 320:], impl.randn(2, 19, 320, dtype=torch.float16), impl.randn(320)
    out = impl.run("bias_add", x, bias, skip)
    assert out.is_contiguous()
    assert_close(out, reference.bias_add(*to64(x, bias, skip)), torch.float16, what="strided rows, fp32 bias")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_bias_add_parameter_views_triton(impl, poison):
    """A strided bias view reads as the values it shows (issue 19 item 1)."""
    m, c = 5, 96
    x, skip = impl.randn(m, c), impl.randn(m, c)
    bias = impl.randn(2 * c)[::2]
    out = impl.run("bias_add", x, bias, skip)
    assert_close(out, reference.bias_add(*to64(x, bias, skip)), torch.float32, what="bias_add")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_bias_add_launcher_validates_triton(impl):
    x = impl.randn(2, 8, 16)
    with pytest.raises(ValueError, match="bias"):
        impl.module.bias_add(x, impl.randn(15), x)


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_bias_add_refuses_cpu_without_interpreter_triton(impl, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = randn(2, 16)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        impl.module.bias_add(x, randn(16), x)


# ------------------------------------------------------------------------------------------------ cuda


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_add_fp32_bias_and_strided_rows_cuda(impl, dtype, poison):
    base = impl.randn(2, 50, 640, dtype=dtype)
    x = base[:, :, 8:328]  # rows 640 apart, 16-byte aligned
    xo = base[:, :, 3:323]  # rows 640 apart, misaligned: scalar path
    skip, bias = impl.randn(2, 50, 320, dtype=dtype), impl.randn(320)
    for xi in (x, xo):
        out = impl.run("bias_add", xi, bias, skip)
        assert out.is_contiguous()
        assert_close(out, reference.bias_add(*to64(xi, bias, skip)), dtype, what="strided rows")
    assert impl.calls["bias_add"] == 2


# ------------------------------------------------------------------------------------------------- ort


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 1024, 320), (2, 256, 1280), (3, 77, 768), (5, 7, 96), (1, 1, 3)])
def test_bias_add_ort(impl, shape, dtype):
    ortutil = impl.module
    x, skip = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    bias_dtype = torch.float32 if shape[-1] % 320 else dtype
    bias = randn(shape[-1], dtype=bias_dtype)
    model = ortutil.make_model("BiasAdd", [("X", dtype), ("bias", bias_dtype), ("skip", dtype)], [("Y", dtype)])
    out = ortutil.run(model, {"X": x, "bias": bias, "skip": skip}, {"Y": (shape, dtype)})["Y"]
    baseline = (x + bias.to(dtype) + skip) if bias_dtype == dtype else None
    assert_close(out, reference.bias_add(*to64(x, bias, skip)), dtype, baseline=baseline, what=f"BiasAdd{shape}")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_bias_add_error_mismatch_ort(impl):
    ortutil = impl.module
    f32 = torch.float32
    model = ortutil.make_model("BiasAdd", [("X", f32), ("bias", f32), ("skip", f32)], [("Y", f32)])
    x = randn(2, 3, 8)
    feeds = {"X": x, "bias": randn(8), "skip": randn(2, 4, 8)}
    ortutil.expect_error(model, feeds, {"Y": (x.shape, f32)}, "skip must have")
