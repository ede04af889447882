"""Triton group_norm and skip_group_norm against the float64 reference (NHWC, NCHW and strided inputs)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import sdkern.triton as T
from sdkern.ops import reference
from tests.triton.conftest import DEVICE
from tests.utils import DTYPES, assert_close, randn, to64

# (N, C, H, W, groups): C/groups = 10, 20, 40 (SD), odd 3, groups=1; pixel counts that split and mask.
SHAPES = [
    (2, 320, 5, 7, 32),
    (1, 640, 4, 4, 32),
    (1, 1280, 3, 3, 32),
    (2, 12, 5, 3, 4),
    (1, 40, 17, 13, 4),
    (1, 24, 3, 1, 1),
]
LAYOUTS = ["nhwc", "nchw"]


def _x(n, c, h, w, dtype, layout, shift=0.0):
    x = randn(n, c, h, w, dtype=dtype, device=DEVICE, shift=shift)
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x


def _torch_gn(s, g, b, groups, eps, silu):
    y = F.group_norm(s, groups, g.to(s.dtype), b.to(s.dtype), eps)
    return F.silu(y) if silu else y


def _same_format(y, x):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.is_contiguous(memory_format=torch.channels_last)
    return y.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_group_norm(shape, layout, dtype, poison):
    n, c, h, w, groups = shape
    x = _x(n, c, h, w, dtype, layout, shift=1.0)
    g, b = randn(c, dtype=dtype, device=DEVICE), randn(c, dtype=dtype, device=DEVICE)
    silu = c % 3 == 0
    y = T.group_norm(x, g, b, groups, 1e-5, silu)
    ref = reference.group_norm(*to64(x, g, b), groups, 1e-5, silu)
    assert _same_format(y, x), "output memory format differs from the input's"
    assert_close(y, ref, dtype, baseline=_torch_gn(x, g, b, groups, 1e-5, silu), what=f"gn{shape} {layout}")


def test_group_norm_strided_view_fp32_params(poison):
    base = randn(2, 320, 6, 10, dtype=torch.bfloat16, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x = base[:, :, :, ::2]  # not dense: copied once, result still matches
    g, b = randn(320, device=DEVICE), randn(320, device=DEVICE)
    y = T.group_norm(x, g, b, 32, 1e-6, True)
    assert_close(y, reference.group_norm(*to64(x, g, b), 32, 1e-6, True), torch.bfloat16, what="strided view")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("skip_kind", ["full", "nc11", "nc"])
def test_skip_group_norm(skip_kind, layout, dtype, poison):
    n, c, h, w, groups = (2, 640, 5, 6, 32) if skip_kind != "full" else (1, 320, 9, 7, 32)
    x = _x(n, c, h, w, dtype, layout)
    skip = {
        "full": lambda: _x(n, c, h, w, dtype, layout),
        "nc11": lambda: randn(n, c, 1, 1, dtype=dtype, device=DEVICE),
        "nc": lambda: randn(n, c, dtype=dtype, device=DEVICE),
    }[skip_kind]()
    bias = randn(c, dtype=dtype, device=DEVICE) if skip_kind != "nc11" else None
    g, b = randn(c, dtype=dtype, device=DEVICE), randn(c, dtype=dtype, device=DEVICE)
    y, s = T.skip_group_norm(x, skip, bias, g, b, groups, 1e-5, True)
    y_ref, s_ref = reference.skip_group_norm(*to64(x, skip, bias, g, b), groups, 1e-5, True)
    assert _same_format(y, x) and _same_format(s, x)
    sk = skip[:, :, None, None] if skip.dim() == 2 else skip
    s_torch = x + sk + (bias[None, :, None, None] if bias is not None else 0)
    assert_close(s, s_ref, dtype, baseline=s_torch, what="s")
    assert_close(y, y_ref, dtype, baseline=_torch_gn(s_torch, g, b, groups, 1e-5, True), what="y")


def test_skip_group_norm_large_mean_fp32_bias(poison):
    # Offset data: a naive E[x^2]-E[x]^2 would lose the variance; fp32 bias with fp16 x; pixels split.
    x = _x(1, 40, 17, 13, torch.float16, "nhwc", shift=300.0)
    skip, bias = randn(1, 40, device=DEVICE, dtype=torch.float16), randn(40, device=DEVICE)
    g, b = randn(40, device=DEVICE), randn(40, device=DEVICE)
    y, s = T.skip_group_norm(x, skip, bias, g, b, 4, 1e-5, False)
    y_ref, s_ref = reference.skip_group_norm(*to64(x, skip, bias, g, b), 4, 1e-5, False)
    assert_close(s, s_ref, torch.float16, what="s")
    assert_close(y, y_ref, torch.float16, what="y")


def test_group_norm_validates():
    x = randn(1, 30, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        T.group_norm(x, randn(30, device=DEVICE), randn(30, device=DEVICE), 4, 1e-5, False)
    with pytest.raises(ValueError, match="skip"):
        T.skip_group_norm(x, randn(1, 30, 2, device=DEVICE), None, randn(30), randn(30), 3, 1e-5, False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_wide_offsets_variant(layout, monkeypatch, poison):
    """The 64-bit channel-offset variant (taken for C * P >= 2**31, issue 19) computes the same result.

    The threshold is lowered so small tensors take it; batch 1 and (1, C) skips (Triton specialises 1).
    """
    gn = importlib.import_module("sdkern.triton.group_norm")
    monkeypatch.setattr(gn, "WIDE_OFFSETS", 0)
    n, c, h, w, groups = 1, 64, 5, 3, 8
    x = _x(n, c, h, w, torch.float16, layout, shift=1.0)
    skip, bias = randn(n, c, dtype=torch.float16, device=DEVICE), randn(c, device=DEVICE)
    g, b = randn(c, device=DEVICE), randn(c, device=DEVICE)
    y = T.group_norm(x, g, b, groups, 1e-5, True)
    assert_close(y, reference.group_norm(*to64(x, g, b), groups, 1e-5, True), torch.float16, what="wide gn")
    y, s = T.skip_group_norm(x, skip, bias, g, b, groups, 1e-5, False)
    ry, rs = reference.skip_group_norm(*to64(x, skip, bias, g, b), groups, 1e-5, False)
    assert_close(s, rs, torch.float16, what="wide sgn s")
    assert_close(y, ry, torch.float16, what="wide sgn y")


def test_group_norm_parameter_views(poison):
    """Strided / stride-0 gamma, beta and bias views read as the values they show (issue 19 item 1)."""
    n, c, h, w, groups = 2, 64, 3, 5, 8
    x = _x(n, c, h, w, torch.float32, "nhwc")
    g = randn(2 * c, device=DEVICE)[::2]
    b = torch.tensor([0.25], device=DEVICE).expand(c)
    bias = randn(c, 3, device=DEVICE)[:, 1]
    y = T.group_norm(x, g, b, groups, 1e-5, False)
    assert_close(y, reference.group_norm(*to64(x, g, b), groups, 1e-5, False), torch.float32, what="views")
    skip = randn(n, c, device=DEVICE)
    y, _ = T.skip_group_norm(x, skip, bias, g, b, groups, 1e-5, False)
    ry, _ = reference.skip_group_norm(*to64(x, skip, bias, g, b), groups, 1e-5, False)
    assert_close(y, ry, torch.float32, what="views skip")
