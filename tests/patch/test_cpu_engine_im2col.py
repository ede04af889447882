"""The CPU engine's im2col-GEMM form: small convolutions as one GEMM over an im2col of the NHWC input.

A convolution whose output has <= ``IM2COL_MAX_PIXELS`` pixels per image holds its weight as the packed
(O, kh*kw*I) matrix of oneDNN's inner product; a call above ``CONV_MIN_PIXELS`` re-packs it back into the
direct convolution's form (sdkern/patch/cpu_engine_modules.py).
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdkern.patch import cpu_engine
from sdkern.patch import cpu_engine_modules as E
from tests.utils import assert_close, fresh_seed, randn

pytestmark = pytest.mark.skipif(cpu_engine.unavailable_reason() is not None, reason="no usable oneDNN in this torch")

# (Cin, Cout, kernel, stride, padding, H, W): SD's 3x3 / stride-2 downsampler and odd ones (5x5, no padding,
# a non-square kernel, a strided 1x1 — not the pointwise GEMM path — and uneven sizes)
CASES = [
    (24, 40, 3, 1, 1, 8, 8),
    (40, 24, 3, 2, 1, 11, 13),
    (16, 8, 5, 1, 2, 5, 7),
    (8, 16, 3, 1, 0, 9, 9),
    (12, 20, (3, 1), 1, (1, 0), 6, 9),
    (6, 10, 1, 2, 0, 9, 9),
    (3, 33, 3, 1, 1, 1, 1),
]


@pytest.fixture(autouse=True)
def _im2col_at_64_pixels(monkeypatch):
    """The form is tested on every CPU at the AVX-512 default (64 px), whatever this CPU's default is (0 on AVX2)."""
    monkeypatch.setattr(E, "IM2COL_MAX_PIXELS", 64)


def _conv(cin, cout, k, s, p, dtype, bias=True):
    torch.manual_seed(fresh_seed())
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("residual", [False, True])
def test_im2col_form_matches_float64(case, dtype, residual):
    cin, cout, k, s, p, h, w = case
    conv = _conv(cin, cout, k, s, p, dtype, bias=not residual)  # with a residual: the bias-free epilogue too
    w_, b_ = conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
    cpu_engine.pack_conv2d(conv, undo := [])
    n = 3
    x = randn(n, cin, h, w, dtype=dtype)
    ref64 = F.conv2d(x.double(), w_.double(), None if b_ is None else b_.double(), stride=s, padding=p)
    base = F.conv2d(x, w_, b_, stride=s, padding=p)
    other = randn(*ref64.shape, dtype=dtype) if residual else None
    if other is not None:
        ref64, base = ref64 + other.double(), base + other
    assert ref64.shape[2] * ref64.shape[3] <= E.IM2COL_MAX_PIXELS
    with torch.no_grad():
        y = cpu_engine.conv2d_add(conv, x, other)
    assert conv.weight.dim() == 2, "a small convolution runs in the im2col-GEMM form"
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref64, dtype, baseline=base, what=f"im2col conv {case}")
    undo[0]()
    assert torch.equal(conv.weight, w_)


def test_form_follows_the_call_size_with_hysteresis(monkeypatch):
    conv = _conv(16, 24, 3, 1, 1, torch.float32)
    w0 = conv.weight.detach().clone()
    cpu_engine.pack_conv2d(conv, undo := [])
    assert conv.weight.dim() == 4, "packed in the direct form until a call says otherwise"
    # (H=W, form held after the call): <= 64 px -> GEMM; 65..256 px keeps what is held; > 256 px -> direct
    for size, form in [(8, 2), (12, 2), (16, 2), (17, 4), (12, 4), (8, 2), (3, 2), (40, 4)]:
        x = randn(2, 16, size, size)
        with torch.no_grad():
            y = conv(x)
        assert conv.weight.dim() == form, (size, conv.weight.dim())
        assert_close(y, F.conv2d(x.double(), w0.double(), conv.bias.double(), padding=1), torch.float32,
                     baseline=F.conv2d(x, w0, conv.bias, padding=1), what=f"{size}x{size}")  # fmt: skip
    # the knob: 0 keeps every convolution on the direct primitive
    monkeypatch.setattr(E, "IM2COL_MAX_PIXELS", 0)
    with torch.no_grad():
        conv(randn(2, 16, 4, 4))
    assert conv.weight.dim() == 4
    undo[0]()
    assert torch.equal(conv.weight, w0)


def test_weight_reads_and_writes_in_the_gemm_form_are_exact():
    conv = _conv(8, 12, 3, 1, 1, torch.bfloat16)
    w0 = conv.weight.detach().clone()
    orig = conv.weight
    cpu_engine.pack_conv2d(conv, undo := [])
    with torch.no_grad():
        conv(randn(1, 8, 4, 4, dtype=torch.bfloat16))
    assert conv.weight.dim() == 2
    assert torch.equal(conv.dense_weight(), w0)
    assert torch.equal(conv.state_dict()["weight"], w0)
    w1 = randn(*w0.shape, dtype=torch.bfloat16)
    cpu_engine.write_weight(conv, w1)  # LoRA's path: re-packed in the form held
    assert conv.weight.dim() == 2 and torch.equal(conv.dense_weight(), w1)
    x = randn(2, 8, 5, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        y = conv(x)
    assert_close(y, F.conv2d(x.double(), w1.double(), conv.bias.double(), padding=1), torch.bfloat16,
                 baseline=F.conv2d(x, w1, conv.bias, padding=1))  # fmt: skip
    undo[0]()
    assert conv.weight is orig and torch.equal(conv.weight, w1)


def test_threads_crossing_the_threshold_get_consistent_results():
    """Two threads at sizes on either side of the thresholds re-pack the weight under each other's feet."""
    conv = _conv(16, 16, 3, 1, 1, torch.float32)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    cpu_engine.pack_conv2d(conv, undo := [])
    xs = {size: randn(1, 16, size, size) for size in (6, 20)}
    refs = {size: F.conv2d(x, w0, b0, padding=1) for size, x in xs.items()}
    errors: list[str] = []

    def run(size: int) -> None:
        for _ in range(40):
            with torch.no_grad():
                y = conv(xs[size])
            if not torch.allclose(y, refs[size], rtol=1e-4, atol=1e-4):
                errors.append(f"{size}: max diff {(y - refs[size]).abs().max().item():.2e}")

    threads = [threading.Thread(target=run, args=(size,)) for size in (6, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    undo[0]()
    assert torch.equal(conv.weight, w0)
