"""skip_group_norm as sdkern's ONNX Runtime custom op (domain ``sdkern``, CPU EP) against the float64 reference,
and its error paths.
"""

from __future__ import annotations

import pytest
import torch

from sdkern.ops import reference
from tests.ops._harness import as_nchw, assert_close, impls, ort_input, randn, to64

# ------------------------------------------------------------------------------------------------- ort


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("channels_last", [1, 0])
@pytest.mark.parametrize("skip_kind", ["full", "n11c", "nc"])
@pytest.mark.parametrize("shape", [(2, 16, 16, 320, 32), (1, 3, 5, 12, 3)])  # (N, H, W, C, groups)
def test_skip_group_norm_ort(impl, shape, skip_kind, channels_last, dtype):
    ortutil, f32 = impl.module, torch.float32
    n, h, w, c, groups = shape
    with_bias = skip_kind != "n11c"
    want_s = skip_kind != "nc"
    x = ort_input(n, h, w, c, dtype, channels_last)
    if skip_kind == "full":
        skip = ort_input(n, h, w, c, dtype, channels_last)
    elif skip_kind == "n11c":
        skip = randn(n, 1, 1, c, dtype=dtype) if channels_last else randn(n, c, 1, 1, dtype=dtype)
    else:
        skip = randn(n, c, dtype=dtype)
    gamma, beta = randn(c), randn(c)
    bias = randn(c, dtype=dtype) if with_bias else None
    model = ortutil.make_model(
        "SkipGroupNorm",
        [("X", dtype), ("gamma", f32), ("beta", f32), ("skip", dtype), ("bias", dtype) if with_bias else None],
        [("Y", dtype), ("S", dtype) if want_s else None],
        groups=groups,
        activation=1,
        channels_last=channels_last,
    )
    feeds = {"X": x, "gamma": gamma, "beta": beta, "skip": skip}
    if with_bias:
        feeds["bias"] = bias
    outs = {"Y": (x.shape, dtype)}
    if want_s:
        outs["S"] = (x.shape, dtype)
    got = ortutil.run_or_skip(model, feeds, outs)
    skip_nchw = skip if skip.dim() == 2 else as_nchw(skip, channels_last)
    y_ref, s_ref = reference.skip_group_norm(
        *to64(as_nchw(x, channels_last), skip_nchw, bias, gamma, beta), groups, 1e-5, True
    )
    what = f"SkipGroupNorm{shape} {skip_kind} cl={channels_last}"
    assert_close(as_nchw(got["Y"], channels_last), y_ref, dtype, what=what + " Y")
    if want_s:
        assert_close(as_nchw(got["S"], channels_last), s_ref, dtype, what=what + " S")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_skip_group_norm_error_skip_shape_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    model = ortutil.make_model(
        "SkipGroupNorm",
        [("X", f32), ("gamma", f32), ("beta", f32), ("skip", f32)],
        [("Y", f32)],
        groups=2,
        activation=1,
    )
    x, g = randn(2, 4, 4, 8), randn(8)
    feeds = {"X": x, "gamma": g, "beta": g, "skip": randn(2, 4, 8)}
    ortutil.expect_error(model, feeds, {"Y": (x.shape, f32)}, "skip has shape")
