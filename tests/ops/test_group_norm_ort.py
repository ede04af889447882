"""group_norm as sdkern's ONNX Runtime custom op (domain ``sdkern``, CPU EP) against the float64 reference,
NHWC and NCHW, and its error paths.
"""

from __future__ import annotations

import pytest
import torch

from sdkern.ops import reference
from tests.ops._harness import as_nchw, assert_close, impls, ort_input, randn, to64

# ------------------------------------------------------------------------------------------------- ort
# (N, H, W, C, groups)
ORT_SHAPES = [(2, 16, 16, 320, 32), (1, 8, 8, 1280, 32), (2, 32, 32, 64, 32), (1, 3, 5, 12, 3), (3, 7, 1, 6, 2)]


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("channels_last", [1, 0])
@pytest.mark.parametrize("shape", ORT_SHAPES)
def test_group_norm_ort(impl, shape, channels_last, dtype):
    ortutil = impl.module
    n, h, w, c, groups = shape
    silu = (h + c) % 2  # both activations over the shape list
    x = ort_input(n, h, w, c, dtype, channels_last)
    param_dtype = torch.float32 if c % 64 else dtype  # gamma/beta: fp32 or X's type
    gamma, beta = randn(c, dtype=param_dtype), randn(c, dtype=param_dtype)
    model = ortutil.make_model(
        "GroupNorm",
        [("X", dtype), ("gamma", param_dtype), ("beta", param_dtype)],
        [("Y", dtype)],
        groups=groups,
        activation=silu,
        epsilon=1e-5,
        channels_last=channels_last,
    )
    out = ortutil.run_or_skip(model, {"X": x, "gamma": gamma, "beta": beta}, {"Y": (x.shape, dtype)})["Y"]
    ref = reference.group_norm(*to64(as_nchw(x, channels_last), gamma, beta), groups, 1e-5, bool(silu))
    assert_close(as_nchw(out, channels_last), ref, dtype, what=f"GroupNorm{shape} cl={channels_last}")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_group_norm_bf16_ort(impl):
    ortutil, bf16, f32 = impl.module, torch.bfloat16, torch.float32
    x, gamma, beta = randn(2, 8, 8, 320, dtype=bf16), randn(320), randn(320)
    model = ortutil.make_model(
        "GroupNorm", [("X", bf16), ("gamma", f32), ("beta", f32)], [("Y", bf16)], groups=32, activation=1
    )
    out = ortutil.run_or_skip(model, {"X": x, "gamma": gamma, "beta": beta}, {"Y": (x.shape, bf16)})["Y"]
    ref = reference.group_norm(*to64(as_nchw(x, True), gamma, beta), 32, 1e-5, True)
    assert_close(as_nchw(out, True), ref, bf16, what="GroupNorm bf16")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_group_norm_error_missing_attribute_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    model = ortutil.make_model("GroupNorm", [("X", f32), ("gamma", f32), ("beta", f32)], [("Y", f32)], activation=0)
    with pytest.raises(Exception, match="required int attribute 'groups' is missing"):
        ortutil.session(model)


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_group_norm_error_bad_attribute_values_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    for attrs, match in [
        (dict(groups=0, activation=0), "'groups' must be positive"),
        (dict(groups=2, activation=3), "'activation' must be 0"),
        (dict(groups=2, activation=0, channels_last=2), "'channels_last' must be 0 or 1"),
    ]:
        model = ortutil.make_model("GroupNorm", [("X", f32), ("gamma", f32), ("beta", f32)], [("Y", f32)], **attrs)
        with pytest.raises(Exception, match=match):
            ortutil.session(model)


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_group_norm_error_inputs_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    model = ortutil.make_model(
        "GroupNorm", [("X", f32), ("gamma", f32), ("beta", f32)], [("Y", f32)], groups=3, activation=0
    )
    x, g = randn(1, 4, 4, 8), randn(8)
    feeds, outs = {"X": x, "gamma": g, "beta": g}, {"Y": (x.shape, f32)}
    ortutil.expect_error(model, feeds, outs, "C=8 are not divisible by groups=3")
    x3 = randn(1, 16, 6)
    ortutil.expect_error(model, {"X": x3, "gamma": randn(6), "beta": randn(6)}, {"Y": (x3.shape, f32)}, "must be 4-D")
    x = randn(1, 4, 4, 6)
    feeds, outs = {"X": x, "gamma": randn(5), "beta": randn(6)}, {"Y": (x.shape, f32)}
    ortutil.expect_error(model, feeds, outs, r"gamma must have shape \[6\]")
