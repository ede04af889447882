"""Winograd F(2x2,3x3) transforms (CPU C++ kernels, sdkern/patch/winograd.py's custom ops) vs the torch reference.

The fused kernels do the torch reference's additions in the same order, so they must match it bit for bit, on
SD shapes and odd ones, on every ISA level built, with every output element written (NaN-poisoned allocations).
The convolution as a whole (vs float64) is tested in tests/patch/test_winograd.py.
"""

from __future__ import annotations

import pytest
import torch

from sdkern.patch import winograd

pytestmark = pytest.mark.skipif(
    winograd.transforms_unavailable_reason() is not None,
    reason=f"fused Winograd transforms unavailable: {winograd.transforms_unavailable_reason()}",
)


# (C, N, H, W): SD shapes (64x64 latents: 640 channels at 32x32, 1280 at 16x16 and 8x8; batch 2) and odd ones
# (H or W of 1, 2, 3, odd sizes = partial tiles, channel counts off the 16-lane vectors and the 64-channel blocks)
TRANSFORM_SHAPES = [
    (640, 2, 32, 32),
    (1280, 2, 16, 16),
    (1280, 2, 8, 8),
    (24, 1, 1, 1),
    (40, 1, 1, 2),
    (17, 1, 2, 3),
    (33, 1, 3, 1),
    (70, 1, 3, 3),
    (130, 1, 7, 9),
    (8, 3, 5, 4),
]


def _nhwc(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("c, n, h, w", TRANSFORM_SHAPES)
def test_fused_transforms_equal_torch_reference(c, n, h, w, poison):
    """The C++ transforms do the reference's additions in its order: bit-identical, every element written."""
    x = _nhwc(n, c, h, w)
    v = winograd.input_transform(x)
    assert v.shape == (16, winograd.tiles(n, h, w), c) and v.is_contiguous()
    torch.testing.assert_close(v, winograd.input_transform_torch(x), rtol=0, atol=0)
    k = c + 3  # a different channel count on the way out
    prod = torch.randn(16, winograd.tiles(n, h, w), k)
    bias, other = torch.randn(k), _nhwc(n, k, h, w)
    for b, o in ((None, None), (bias, None), (None, other), (bias, other)):
        y = winograd.output_transform(prod, b, o, n, h, w)
        assert y.shape == (n, k, h, w) and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, winograd.output_transform_torch(prod, b, o, n, h, w), rtol=0, atol=0)


def test_fused_transforms_every_isa(poison):
    from sdkern import _C

    x, prod = _nhwc(2, 67, 5, 6), torch.randn(16, winograd.tiles(2, 5, 6), 83)
    bias, other = torch.randn(83), _nhwc(2, 83, 5, 6)
    ref_v = winograd.input_transform_torch(x)
    ref_y = winograd.output_transform_torch(prod, bias, other, 2, 5, 6)
    active, ran = _C.cpu_isa(), []
    try:
        for isa in _C.build_info()["isa_built"]:
            if _C.set_cpu_isa(isa):
                ran.append(isa)
                torch.testing.assert_close(winograd.input_transform(x), ref_v, rtol=0, atol=0, msg=isa)
                y = winograd.output_transform(prod, bias, other, 2, 5, 6)
                torch.testing.assert_close(y, ref_y, rtol=0, atol=0, msg=isa)
    finally:
        _C.set_cpu_isa(active)
    assert "baseline" in ran


def test_native_ops_write_caller_buffers_and_reject_other_layouts():
    """The C++ ops fill the caller's preallocated outputs (they allocate nothing) and refuse non-NHWC inputs."""
    from sdkern import _C

    n, c, h, w, k = 1, 20, 3, 5, 12
    x = _nhwc(n, c, h, w)
    v = torch.full((16, winograd.tiles(n, h, w), c), float("nan"))
    _C.winograd_input(x.data_ptr(), v.data_ptr(), n, c, h, w, *x.stride(), 0)
    torch.testing.assert_close(v, winograd.input_transform_torch(x), rtol=0, atol=0)
    prod = torch.randn(16, winograd.tiles(n, h, w), k)
    y = torch.full((n, h, w, k), float("nan")).permute(0, 3, 1, 2)
    _C.winograd_output(prod.data_ptr(), 0, 0, y.data_ptr(), n, k, h, w, 0, 1, 0, 0, 0)
    torch.testing.assert_close(y, winograd.output_transform_torch(prod, None, None, n, h, w), rtol=0, atol=0)
    nchw = torch.randn(n, c, h, w)
    with pytest.raises(ValueError, match="channels-last"):
        torch.ops.sdkern.winograd_input(nchw)
    with pytest.raises(ValueError, match="channels-last"):
        torch.ops.sdkern.winograd_output(prod, None, torch.randn(n, k, h, w), n, h, w)
    with pytest.raises(NotImplementedError, match="float32"):
        _C.winograd_input(x.data_ptr(), v.data_ptr(), n, c, h, w, *x.stride(), 2)
    # a non-channels-last activation is converted by the Python side, not refused
    torch.testing.assert_close(winograd.input_transform(nchw), winograd.input_transform_torch(nchw), rtol=0, atol=0)


def test_opcheck():
    x = _nhwc(1, 16, 3, 4)
    prod = torch.randn(16, winograd.tiles(1, 3, 4), 8)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.sdkern.winograd_input.default, (x,), test_utils=utils)
    args = (prod, torch.randn(8), _nhwc(1, 8, 3, 4), 1, 3, 4)
    torch.library.opcheck(torch.ops.sdkern.winograd_output.default, args, test_utils=utils)
    args = (prod, None, None, 1, 3, 4)
    torch.library.opcheck(torch.ops.sdkern.winograd_output.default, args, test_utils=utils)
