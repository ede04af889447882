"""skip_layer_norm as sdkern's ONNX Runtime custom op (domain ``sdkern``, CPU EP) against the float64 reference,
and its error paths.
"""

from __future__ import annotations

import pytest
import torch

from sdkern.ops import reference
from tests.ops._harness import assert_close, impls, randn, to64

# ------------------------------------------------------------------------------------------------- ort


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize(
    "shape,beta,bias,extras,bcast",
    [
        ((2, 77, 768), True, True, True, False),
        ((2, 256, 320), True, False, False, False),
        ((1, 256, 1280), False, True, True, False),
        ((2, 5, 7), True, True, True, True),
        ((3, 1, 3), False, False, True, False),
    ],
)
def test_skip_layer_norm_ort(impl, shape, beta, bias, extras, bcast, dtype):
    ortutil, f32 = impl.module, torch.float32
    c = shape[-1]
    x = randn(*shape, dtype=dtype)
    skip = randn(*shape[1:], dtype=dtype) if bcast else randn(*shape, dtype=dtype)
    gamma = randn(c, dtype=dtype)
    b = randn(c, dtype=dtype) if beta else None
    bi = randn(c, dtype=dtype) if bias else None
    eps = 1e-5
    model = ortutil.make_model(
        "SkipLayerNormalization",
        [
            ("input", dtype),
            ("skip", dtype),
            ("gamma", dtype),
            ("beta", dtype) if beta else None,
            ("bias", dtype) if bias else None,
        ],
        [
            ("output", dtype),
            ("mean", f32) if extras else None,
            ("inv_std_var", f32) if extras else None,
            ("sum", dtype) if extras else None,
        ],
        epsilon=eps,
    )
    feeds = {"input": x, "skip": skip, "gamma": gamma}
    if beta:
        feeds["beta"] = b
    if bias:
        feeds["bias"] = bi
    stat = (*shape[:-1], 1)
    outs = {"output": (shape, dtype)}
    if extras:
        outs.update(mean=(stat, f32), inv_std_var=(stat, f32), sum=(shape, dtype))
    got = ortutil.run_or_skip(model, feeds, outs)
    x64, skip64, g64, b64, bi64 = to64(x, skip.expand(shape), gamma, b, bi)
    y_ref, s_ref = reference.skip_layer_norm(x64, skip64, g64, b64, bi64, eps)
    what = f"SkipLayerNormalization{shape}"
    assert_close(got["output"], y_ref, dtype, what=what)
    if extras:
        s64 = x64 + skip64 + (bi64 if bi64 is not None else 0)
        mean = s64.mean(-1, keepdim=True)
        inv_std = torch.rsqrt(s64.var(-1, unbiased=False, keepdim=True) + eps)
        # Statistics of the fp32 sum of the (rounded) inputs: fp32-level accuracy in every dtype.
        assert_close(got["mean"], mean, f32, what=what + " mean")
        assert_close(got["inv_std_var"], inv_std, f32, what=what + " inv_std_var")
        assert_close(got["sum"], s_ref, dtype, what=what + " sum")


@pytest.mark.parametrize("impl", impls("ort"), indirect=True)
def test_skip_layer_norm_error_mismatch_ort(impl):
    ortutil, f32 = impl.module, torch.float32
    model = ortutil.make_model(
        "SkipLayerNormalization", [("input", f32), ("skip", f32), ("gamma", f32)], [("output", f32)]
    )
    x = randn(2, 3, 8)
    outs = {"output": (x.shape, f32)}
    ortutil.expect_error(model, {"input": x, "skip": randn(2, 3, 7), "gamma": randn(8)}, outs, "skip")
    ortutil.expect_error(model, {"input": x, "skip": x, "gamma": randn(9)}, outs, "gamma")
