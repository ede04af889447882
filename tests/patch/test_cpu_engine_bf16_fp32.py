"""bf16 models on a CPU without bf16 oneDNN primitives (AMD Zen 3, Intel before Cooper Lake): the CPU engine holds
their weights as fp32 (exact) and computes in fp32, with bf16 activations converted at each module's boundary
(sdkern.patch.cpu_engine.compute_dtype). PyTorch's own bf16 convolution on such a CPU is a reference loop (~280x
slower than fp32, benchmarks/results/cpu_engine_session13.md) and its bf16 weight reorders raise.

On a CPU with bf16 primitives the fallback is simulated by making the probe report them missing, so the form is
tested on every machine; on one without them the real probe is checked against PyTorch's own flag."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import sdkern
from sdkern.patch import cpu_engine
from sdkern.patch import cpu_engine_modules as cem
from tests.patch import models as M
from tests.patch.common import check_model

pytestmark = pytest.mark.skipif(cpu_engine.unavailable_reason() is not None, reason="no usable oneDNN in this torch")

_WHY = "simulated: this CPU has no bf16 primitives"


@pytest.fixture
def no_bf16(monkeypatch):
    """The engine behaves as on a CPU without bf16 primitives (whatever this CPU has)."""

    real = cem.dtype_problem

    def probe(dtype: torch.dtype) -> str | None:
        return _WHY if dtype == torch.bfloat16 else real(dtype)

    monkeypatch.setattr(cem, "dtype_problem", probe)
    monkeypatch.setattr(cpu_engine, "dtype_problem", probe)
    assert cpu_engine.compute_dtype(torch.bfloat16) == torch.float32


def test_probe_agrees_with_pytorch():
    flag = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if flag is None:
        pytest.skip("this torch has no torch.ops.mkldnn._is_mkldnn_bf16_supported")
    has = cem.dtype_problem(torch.bfloat16) is None
    assert has == bool(flag()), cem.dtype_problem(torch.bfloat16)
    assert cpu_engine.compute_dtype(torch.bfloat16) == (torch.bfloat16 if has else torch.float32)
    assert cpu_engine.compute_dtype(torch.float32) == torch.float32 and cem.dtype_problem(torch.float32) is None
    assert "float16" in cem.dtype_problem(torch.float16)


def _runner(args):
    def run(model, dtype):
        return model(**M.cast_inputs(args, dtype)).sample

    return run


def test_bf16_unet_runs_fp32_primitives(no_bf16):
    """Every Conv2d / Linear on the engine with an fp32 packed weight; the output (bf16) meets the bf16 criterion
    against float64, state_dict / write_weight give and take bf16 values exactly, unpatch is bit-exact."""
    model = M.unet(M.SD1_SMALL_UNET)
    args = M.unet_inputs(model, batch=2, size=8)  # 8x8 latents: with AVX-512 the deep convolutions run as im2col GEMMs
    report, _, _ = check_model(model, _runner(args), torch.bfloat16, "bf16 U-Net, fp32 primitives")
    engine = [e for e in report.rewritten if e.rule in ("cpu_conv", "cpu_linear")]
    assert engine and all("held and computed as float32" in e.detail for e in engine)
    assert not [e for e in report.left if e.rule.startswith("cpu_")]
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == report.counts()["cpu_conv"]
    assert not [e for e in report.rewritten if "gate GEMMs" in e.detail]  # the gated GEGLU needs bf16 primitives

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    sdkern.patch(model)
    packed = [m for m in model.modules() if isinstance(m, (cpu_engine.SdkernConv2d, cpu_engine.SdkernLinear))]
    assert packed and all(m.weight.is_mkldnn and m.weight.dtype == torch.float32 for m in packed)
    sd = model.state_dict()
    assert all(sd[n].dtype == torch.bfloat16 and torch.equal(sd[n], params[n]) for n in params)
    conv = next(m for m in packed if type(m) is cpu_engine.SdkernConv2d and m.kernel_size == (3, 3))
    v32 = torch.randn(conv.__dict__["_sdkern_wshape"])  # an fp32 value: held as eager would hold it (bf16-rounded)
    cpu_engine.write_weight(conv, v32)
    held = conv.weight.to_dense().reshape(v32.shape)
    assert torch.equal(conv.dense_weight(), v32.bfloat16()) and torch.equal(held, v32.bfloat16().float())
    new = torch.randn(conv.__dict__["_sdkern_wshape"]).bfloat16()
    cpu_engine.write_weight(conv, new)  # LoRA's path
    assert conv.dense_weight().dtype == torch.bfloat16 and torch.equal(conv.dense_weight(), new)
    x = torch.randn(2, conv.in_channels, 8, 8).bfloat16()
    with torch.no_grad():
        y = conv(x)
        ref = torch.nn.functional.conv2d(x.double(), new.double(), conv.bias.double(), conv.stride, conv.padding)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - ref).norm() / ref.norm() < 8e-3  # fp32 compute, one bf16 rounding of the output
    sdkern.unpatch(model)
    name = next(n for n, m in model.named_modules() if m is conv)
    params[name + ".weight"] = new
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, params[n]), n


def test_linear_with_residual_and_conv_with_residual(no_bf16):
    """The epilogue forms (residual adds) convert their second input too; results match float64."""
    lin = nn.Linear(24, 40).bfloat16()
    conv = nn.Conv2d(6, 10, 3, padding=1).bfloat16()
    wl, wc = lin.weight.detach().clone(), conv.weight.detach().clone()
    undo: list = []
    cpu_engine.pack_linear(lin, undo)
    cpu_engine.pack_conv2d(conv, undo)
    x, r = torch.randn(3, 5, 24).bfloat16(), torch.randn(3, 5, 40).bfloat16()
    xc, rc = torch.randn(2, 6, 9, 7).bfloat16(), torch.randn(2, 10, 9, 7).bfloat16()
    with torch.no_grad():
        y = cpu_engine.linear_add(lin, x, r)
        yc = cpu_engine.conv2d_add(conv, xc, rc)
        ref = torch.nn.functional.linear(x.double(), wl.double(), lin.bias.double()) + r.double()
        refc = torch.nn.functional.conv2d(xc.double(), wc.double(), conv.bias.double(), padding=1) + rc.double()
    assert y.dtype == yc.dtype == torch.bfloat16
    assert (y.double() - ref).norm() / ref.norm() < 8e-3 and (yc.double() - refc).norm() / refc.norm() < 8e-3
    for u in reversed(undo):
        u()
    assert torch.equal(lin.weight, wl) and torch.equal(conv.weight, wc) and lin.weight.dtype == torch.bfloat16


def test_patch_dtype_bf16_warns_where_it_buys_nothing(no_bf16, caplog):
    """PatchConfig(dtype=bfloat16) is honoured (the output is bf16-accurate as asked) but logged as no gain."""
    model = M.unet(M.SD1_SMALL_UNET)
    with caplog.at_level(logging.WARNING, logger="sdkern"):
        report = sdkern.patch(model, report=True, dtype=torch.bfloat16)
    assert any("float32 is as fast" in r.getMessage() for r in caplog.records)
    assert any(e.rule == "dtype" and "no gain on this CPU" in e.detail for e in report.rewritten)
    sdkern.unpatch(model)
