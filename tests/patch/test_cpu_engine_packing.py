"""The CPU engine packs each direct convolution's weight for the input size it is called with.

oneDNN's convolution wants its weight in a blocked layout that depends on the input size (and the ISA); a weight
packed without the size gets oneDNN's guess, and where the guess is wrong oneDNN reorders the whole weight inside
every call (on AVX2: a 320->320 3x3 convolution at 32x32 took 48 ms instead of 19 ms). These tests read oneDNN's
own log of the primitives a call executes (``torch.backends.mkldnn.verbose``), so they see such a reorder on any
CPU where the layouts differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdkern
from sdkern.patch import cpu_engine
from sdkern.patch import cpu_engine_modules as E
from tests.patch import models as M
from tests.patch.common import onednn_log
from tests.utils import assert_close, fresh_seed, randn

pytestmark = pytest.mark.skipif(cpu_engine.unavailable_reason() is not None, reason="no usable oneDNN in this torch")


def _primitive(fields: list[str]) -> str:
    # onednn_verbose,v1,primitive,exec,cpu,<primitive>,<implementation>,...
    return fields[5]


def test_direct_weight_follows_the_call_input_size(monkeypatch):
    monkeypatch.setattr(E, "IM2COL_MAX_PIXELS", 0)  # the direct form at every size
    torch.manual_seed(fresh_seed())
    conv = nn.Conv2d(16, 24, 3, padding=1).eval()
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    cpu_engine.pack_conv2d(conv, undo := [])
    assert "_sdkern_packed_for" not in conv.__dict__, "packed without an input size until the first call"
    for shape in [(2, 16, 20, 20), (1, 16, 9, 14), (2, 16, 20, 20)]:
        x = randn(*shape)
        with torch.no_grad():
            y = conv(x)
        assert conv.__dict__["_sdkern_packed_for"] == shape
        assert_close(y, F.conv2d(x.double(), w0.double(), b0.double(), padding=1), torch.float32,
                     baseline=F.conv2d(x, w0, b0, padding=1), what=str(shape))  # fmt: skip
    # LoRA's write keeps the packing for the size last called with; the value is exact
    w1 = randn(*w0.shape)
    cpu_engine.write_weight(conv, w1)
    assert conv.__dict__["_sdkern_packed_for"] == (2, 16, 20, 20) and torch.equal(conv.dense_weight(), w1)
    undo[0]()
    assert torch.equal(conv.weight, w1) and "_sdkern_packed_for" not in conv.__dict__


def test_steady_convolution_reorders_no_weight(capfd, monkeypatch):
    """SD1.5's 320->320 3x3 convolution at 32x32 latents, batch 2: the shape whose size-less packing AVX2's
    primitive rejected. A steady call executes the convolution and nothing else (no reorder of weight or data)."""
    monkeypatch.setattr(E, "IM2COL_MAX_PIXELS", 0)
    conv = nn.Conv2d(320, 320, 3, padding=1).eval()
    cpu_engine.pack_conv2d(conv, [])
    x = randn(2, 320, 32, 32).contiguous(memory_format=torch.channels_last)
    other = randn(2, 320, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv(x)
        cpu_engine.conv2d_add(conv, x, other)
    log = onednn_log(capfd, lambda: (conv(x), cpu_engine.conv2d_add(conv, x, other)))
    assert [_primitive(f) for f in log] == ["convolution", "convolution"], [f[5:9] for f in log]


def test_steady_unet_step_runs_no_reorder(capfd):
    """A whole patched U-Net step (after the first) executes no oneDNN reorder: every weight is held in the layout
    its primitive wants and activations stay in the primitives' layout from conv_in to conv_out."""
    model = M.unet(M.SD1_SMALL_UNET).eval()
    args = M.unet_inputs(model, batch=2, size=16)
    sdkern.patch(model)

    def step():
        return model(**args).sample

    with torch.no_grad():
        step()
    log = onednn_log(capfd, step)
    sdkern.unpatch(model)
    kinds = {_primitive(f) for f in log}
    assert {"convolution", "inner_product"} <= kinds, kinds
    assert "reorder" not in kinds, [f[5:9] + f[-2:-1] for f in log if _primitive(f) == "reorder"][:5]
