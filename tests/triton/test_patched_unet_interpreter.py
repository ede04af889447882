"""A whole patched U-Net through the CUDA dispatch chain onto the Triton kernels, in Triton's CPU interpreter.

Per-op tests (tests/ops/test_<op>.py, implementation ``triton``) call the Triton launchers directly; this runs
the integration a GPU would run -- ``sdkern.patch`` -> ``torch.ops.sdkern`` -> the CUDA implementation chain
(Triton preferred) -> the Triton kernels -- on CPU tensors: for the duration of the test the CPU dispatch key
of every sdkern op is routed to the op's CUDA kernel function (``sdkern.ops._library._make_kernel(op,
"cuda")``), whose chain is Triton, then CUDA C++ (not built here), then the reference. Every call must have
been served by Triton (no silent fallback), and the U-Net output must meet the whole-model criterion against
the float64 eager run (tests/patch/common.py). Reduced-width SD 1.5 (NCHW) and SDXL (channels-last)
architectures, fp32 (the interpreter computes in numpy).
"""

from __future__ import annotations

import importlib
import warnings
from collections import Counter

import pytest
import torch

import sdkern.ops
from sdkern.ops import _library
from tests.patch import models as M
from tests.patch.common import check_model

# Reduced-width SD 1.5: its four blocks and block types, one head per attention so the head dims stay
# SD 1.5's 40 / 80 / 160 at widths 40 / 80 / 160, cross dim 768, conv proj_in/out.
SD15_NARROW = dict(
    sample_size=8,
    block_out_channels=(40, 80, 160, 160),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=768,
    attention_head_dim=1,
    norm_num_groups=8,
)
# Reduced-width SDXL: its three blocks, head dim 64, several transformer layers in the deepest block,
# linear projections, cross dim 2048, text/time added conditioning.
SDXL_NARROW = dict(
    M.SDXL_UNET,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 1, 2),
    norm_num_groups=8,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter test (a GPU runs tests/cuda)")


@pytest.fixture
def cpu_through_triton(monkeypatch):
    """Route CPU calls of every sdkern op through the CUDA chain with Triton first; count calls and Triton runs."""
    trit = importlib.import_module("sdkern.triton")
    if not importlib.import_module("sdkern.triton._common").interpreting():
        pytest.skip("TRITON_INTERPRET is not set")
    calls: Counter[str] = Counter()
    served: Counter[str] = Counter()
    for op in sdkern.ops.OPS:
        orig = getattr(trit, op)

        def counted(*args, _orig=orig, _op=op):
            out = _orig(*args)
            served[_op] += 1
            return out

        monkeypatch.setattr(trit, op, counted)
    lib = torch.library.Library("sdkern", "IMPL")
    for op in sdkern.ops.OPS:
        cuda_kernel = _library._make_kernel(op, "cuda")

        def kernel(*args, _k=cuda_kernel, _op=op):
            calls[_op] += 1
            return _k(*args)

        with warnings.catch_warnings():  # "Overriding a previously registered kernel": intended, undone below
            warnings.simplefilter("ignore", UserWarning)
            lib.impl(op, kernel, "CPU")
    previous = sdkern.ops.cuda_impl_order()[0]
    sdkern.ops.set_cuda_impl("triton")
    try:
        yield calls, served
    finally:
        sdkern.ops.set_cuda_impl(previous)
        lib._destroy()


def _run(args: dict):
    def run(model, dtype):
        return model(**M.cast_inputs(args, dtype)).sample

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "channels_last"), [("sd15", False), ("sdxl", True)], ids=["sd15_small_nchw", "sdxl_small_nhwc"]
)
def test_patched_unet_on_triton_interpreter(arch, channels_last, cpu_through_triton):
    calls, served = cpu_through_triton
    config = {"sd15": SD15_NARROW, "sdxl": SDXL_NARROW}[arch]
    model = M.unet(config)
    args = M.unet_inputs(model, batch=1, size=8)  # text states of 77 tokens: Sk = 77 cross-attention
    report, _, _ = check_model(
        model,
        _run(args),
        torch.float32,
        f"{arch} U-Net on Triton (interpreter)",
        channels_last=channels_last,
        cpu_engine=False,  # the CPU engine is CPU-only; the CUDA path's modules are what this test follows
    )
    ops = {"group_norm", "skip_group_norm", "attention", "bias_split_gelu", "skip_layer_norm", "bias_add"}
    assert set(calls) == ops, f"ops not reached: {ops - set(calls)}"
    assert served == calls, f"calls not served by Triton (fell back): {calls - served}"
    assert report.counts()["attention"] > 0


def test_routing_is_undone():
    """After the fixture, CPU calls go back to the CPU kernels (the override library is destroyed)."""
    x, b, s = torch.randn(3, 8), torch.randn(8), torch.randn(3, 8)
    torch.testing.assert_close(torch.ops.sdkern.bias_add(x, b, s), x + b + s)
