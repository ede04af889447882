"""The CPU engine of sdkern.patch: prepacked oneDNN convolutions / GEMMs (sdkern.patch.cpu_engine)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sdkern
from sdkern.patch import cpu_engine
from tests.patch import models as M
from tests.patch.common import check_model, criterion

pytestmark = pytest.mark.skipif(cpu_engine.unavailable_reason() is not None, reason="no usable oneDNN in this torch")


def _unet_step(model, args):
    with torch.no_grad():
        return model(**args).sample


def test_unpatch_restores_parameters_exactly():
    model = M.unet(M.SD1_SMALL_UNET)
    params = {n: (p, p.detach().clone(), p.stride()) for n, p in model.named_parameters()}
    args = M.unet_inputs(model, batch=2, size=8)
    report = sdkern.patch(model, report=True)
    assert report.counts()["cpu_conv"] > 0
    # weights are held once: the original Parameter objects of packed modules have no storage meanwhile
    packed = [m for m in model.modules() if isinstance(m, (cpu_engine.SdkernConv2d, cpu_engine.SdkernLinear))]
    assert packed and all(m.weight.is_mkldnn for m in packed)
    assert all(params[n][0].numel() == 0 for n, p in model.named_parameters() if p.is_mkldnn)
    _unet_step(model, args)
    sdkern.unpatch(model)
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, (p, value, stride) in params.items():
        assert now[n] is p, f"{n}: Parameter object replaced"
        assert torch.equal(p, value) and p.stride() == stride, n
    assert not any(type(m) in (cpu_engine.SdkernConv2d, cpu_engine.SdkernLinear) for m in model.modules())


def test_new_resolution_after_patch_and_vae():
    model = M.unet(M.SD1_SMALL_UNET)
    a8 = M.unet_inputs(model, batch=2, size=8)
    a16 = M.unet_inputs(model, batch=1, size=16)
    with torch.no_grad():
        model.double()
        ref = [_unet_step(model, M.cast_inputs(a, torch.float64)) for a in (a8, a16)]
        model.float()
        eager = [_unet_step(model, a) for a in (a8, a16)]
        sdkern.patch(model)
        for a, r, e in zip((a8, a16, a8), (*ref, ref[0]), (*eager, eager[0]), strict=True):
            out = _unet_step(model, a)
            assert out.is_contiguous(), "the U-Net output comes back in eager's NCHW layout"
            err, bound = criterion(out, e, r)
            assert err <= bound, (tuple(a["sample"].shape), err, bound)
    vae = M.vae()
    z = torch.randn(1, 4, 12, 12)
    check_model(vae, lambda m, dt: m.decode(z.to(dt)).sample, torch.float32, "VAE decode (engine)")


class _LayoutCopies(TorchDispatchMode):
    """Counts copies that change a tensor's memory format (NCHW <-> NHWC) during a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: list[str] = []

    @staticmethod
    def _fmt(t: torch.Tensor) -> str:
        if t.dim() != 4 or t.is_mkldnn:
            return "other"
        if t.is_contiguous():
            return "nchw"
        return "nhwc" if t.is_contiguous(memory_format=torch.channels_last) else "strided"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        if name in ("aten.clone", "aten.contiguous", "aten._to_copy", "aten.copy_") and isinstance(out, torch.Tensor):
            src = args[1] if name == "aten.copy_" else args[0]
            if isinstance(src, torch.Tensor) and src.dim() == 4 and src.shape[1] > 4:
                if self._fmt(src) != self._fmt(out) and out.numel() > 1:
                    self.count += 1
                    self.ops.append(f"{name} {tuple(src.shape)} {self._fmt(src)}->{self._fmt(out)}")
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_layout_conversion_between_patched_modules(dtype):
    """From conv_in to conv_out activations stay channels-last: no NCHW<->NHWC copy in a whole step.

    Eager (with channels-last weights, the old patch default) converts at every Transformer2DModel
    exit; the count is checked against it so the counter itself is shown to see conversions."""
    model = M.unet(M.SD1_SMALL_UNET).to(dtype)
    args = M.cast_inputs(M.unet_inputs(model, batch=2, size=8), dtype)
    sdkern.patch(model, cpu_engine=False, channels_last=True)
    with _LayoutCopies() as old:
        _unet_step(model, args)
    sdkern.unpatch(model)
    assert old.count > 0, "the counter sees the conversions of the non-engine path"
    sdkern.patch(model)
    with _LayoutCopies() as new:
        _unet_step(model, args)
    sdkern.unpatch(model)
    assert new.count == 0, new.ops


def test_module_the_engine_cannot_run_is_reported_and_kept():
    net = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(16, 8, 3, padding="same"),
        nn.Linear(5, 5),
    ).eval()
    report = sdkern.patch(net, report=True)
    left = {e.name: e.detail for e in report.left if e.rule.startswith("cpu_")}
    assert "reflect" in left["1"] and "string" in left["2"]
    assert (
        type(net[0]) is cpu_engine.SdkernConv2d
        and type(net[1]) is nn.Conv2d
        and type(net[3]) is cpu_engine.SdkernLinear
    )
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        y = net[2](net[1](net[0](x)))
    sdkern.unpatch(net)
    with torch.no_grad():
        ref = net[2](net[1](net[0](x)))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_engine_unavailable_leaves_everything_to_pytorch(monkeypatch):
    monkeypatch.setattr(cpu_engine, "unavailable_reason", lambda: "no oneDNN here (test)")
    net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Linear(3, 3))
    report = sdkern.patch(net, report=True)
    assert [e.detail for e in report.left if e.rule == "cpu_engine"] == ["no oneDNN here (test)"]
    assert type(net[0]) is nn.Conv2d and type(net[1]) is nn.Linear
    sdkern.unpatch(net)


def test_fused_epilogues_match_pytorch():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(24, 40, 3, padding=1, stride=2)
    lin = nn.Linear(24, 40)
    w_conv, b_conv = conv.weight.detach().clone(), conv.bias.detach().clone()
    w_lin, b_lin = lin.weight.detach().clone(), lin.bias.detach().clone()
    undo: list = []
    cpu_engine.pack_conv2d(conv, undo)
    cpu_engine.pack_linear(lin, undo)
    x = torch.randn(3, 24, 11, 13, generator=g)
    other = torch.randn(3, 40, 6, 7, generator=g)
    t = torch.randn(3, 5, 24, generator=g)
    res = torch.randn(3, 5, 40, generator=g)
    with torch.no_grad():
        ref64 = F.conv2d(x.double(), w_conv.double(), b_conv.double(), stride=2, padding=1) + other.double()
        y = cpu_engine.conv2d_add(conv, x, other)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert (y.double() - ref64).norm() / ref64.norm() < 1e-6
        lref = F.linear(t.double(), w_lin.double(), b_lin.double()) + res.double()
        assert (cpu_engine.linear_add(lin, t, res).double() - lref).norm() / lref.norm() < 1e-6
        nob = F.linear(t.double(), w_lin.double())
        assert (cpu_engine.linear_add(lin, t, None, bias=False).double() - nob).norm() / nob.norm() < 1e-6
    # a weight that wanted gradients: grad-mode calls are refused with a clear message, not silently gradient-free
    with pytest.raises(RuntimeError, match="cannot compute the weight's gradient"):
        conv(x.clone().requires_grad_(True))
    for fn in reversed(undo):
        fn()
    assert torch.equal(conv.weight, w_conv) and torch.equal(lin.weight, w_lin)
    # a frozen weight (requires_grad=False): gradients reach the input through PyTorch's path
    conv.requires_grad_(False)
    cpu_engine.pack_conv2d(conv, undo := [])
    xg = x.clone().requires_grad_(True)
    conv(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    F.conv2d(xr, w_conv, b_conv, stride=2, padding=1).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)
    undo[0]()


def test_lora_through_prepacked_weights_is_exact():
    from sdkern import lora

    model = M.unet(M.SD1_SMALL_UNET)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name.endswith(("to_out.0", "ff.net.2", "conv2", "proj_in")):
            shape_in = (m.in_features,) if isinstance(m, nn.Linear) else (m.in_channels, *m.kernel_size)
            out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            tail = () if isinstance(m, nn.Linear) else (1, 1)
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(4, *shape_in, generator=g) * 0.05
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(out, 4, *tail, generator=g) * 0.05
    plain = copy.deepcopy(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.load(plain, sd, adapter_name="a")
    fused_plain = {k: v.clone() for k, v in plain.state_dict().items()}

    args = M.unet_inputs(model, batch=2, size=8)
    sdkern.patch(model)
    lora.load(model, sd, adapter_name="a")
    out = _unet_step(model, args)
    ref = _unet_step(plain, args)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    lora.set_adapters(model, ["a"], [0.5])
    lora.set_adapters(model, ["a"], [1.0])
    sdkern.unpatch(model)
    for k, v in model.state_dict().items():  # re-packing is lossless: the fused weights are plain LoRA's
        assert torch.equal(v, fused_plain[k]), k
    sdkern.patch(model)
    lora.unfuse(model)
    sdkern.unpatch(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_text_encoder_linears_on_engine():
    te = M.clip_text()
    ids = torch.randint(0, 998, (2, 77))
    report = sdkern.patch(te, report=True)
    assert report.counts()["cpu_linear"] > 0
    sdkern.unpatch(te)
    check_model(te, lambda m, dt: m(ids)[0], torch.float32, "CLIP text encoder (engine)")


_RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, torch, psutil
    from diffusers import UNet2DConditionModel
    import sdkern
    from sdkern.models.configs import SD15
    torch.manual_seed(0)
    m = UNet2DConditionModel(**SD15.unet).eval()
    x = torch.randn(2, 4, 16, 16); c = torch.randn(2, 77, 768); t = torch.tensor(10.0)
    proc = psutil.Process()
    with torch.inference_mode():
        m(x, t, encoder_hidden_states=c); gc.collect(); eager = proc.memory_info().rss
        sdkern.patch(m); m(x, t, encoder_hidden_states=c); gc.collect(); patched = proc.memory_info().rss
    print(json.dumps({"eager": eager, "patched": patched}))
    """
)


@pytest.mark.slow
def test_rss_after_patch_full_size_sd15():
    """Weights are not duplicated: RSS of a patched full-size SD1.5 U-Net <= 1.15 x eager's (fresh process)."""
    pytest.importorskip("psutil")
    import json

    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=600, check=True
    ).stdout
    rss = json.loads(out.strip().splitlines()[-1])
    assert rss["patched"] <= 1.15 * rss["eager"], rss


def test_state_dict_round_trip_while_patched():
    net = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Linear(3, 5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sdkern.patch(net)
    sd = net.state_dict()
    assert all(torch.equal(sd[k], v) and not sd[k].is_mkldnn for k, v in before.items())
    new = {k: torch.randn_like(v) for k, v in before.items()}
    net.load_state_dict(new)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in new.items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        net.load_state_dict({**new, "0.weight": torch.randn(6, 4, 1, 1)})
    sdkern.unpatch(net)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in new.items())


def test_bf16_run_dtype_on_fp32_model():
    """PatchConfig(dtype=bfloat16) on an fp32 U-Net: bf16 engine inside, fp32 at the boundary, exact unpatch."""
    model = M.unet(M.SD1_SMALL_UNET)
    args = M.unet_inputs(model, batch=2, size=8)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        other = copy.deepcopy(model).double()
        ref64 = _unet_step(other, M.cast_inputs(args, torch.float64))
        eager_bf16 = _unet_step(other.bfloat16(), M.cast_inputs(args, torch.bfloat16))
        del other
    report = sdkern.patch(model, report=True, dtype=torch.bfloat16)
    assert report.counts()["dtype"] == 1 and report.counts()["cpu_conv"] > 0
    held = cpu_engine.compute_dtype(torch.bfloat16)  # fp32 on a CPU without bf16 primitives
    assert all(m.weight.dtype == held for m in model.modules() if type(m) is cpu_engine.SdkernConv2d)
    out = _unet_step(model, args)
    assert out.dtype == torch.float32
    err, bound = criterion(out.bfloat16(), eager_bf16, ref64)
    assert err <= bound, (err, bound)
    sdkern.unpatch(model)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, params[n]), n
    with pytest.raises(ValueError, match="floating"):
        sdkern.PatchConfig(dtype=torch.int8)


def test_bf16_attention_choice_follows_the_cpu():
    """bf16 on an AMX CPU: the processor runs PyTorch's SDPA (faster there); elsewhere sdkern::attention."""
    from sdkern.patch import core
    from sdkern.patch.modules import SdkernAttnProcessor

    model = M.unet(M.SD1_SMALL_UNET).bfloat16()
    for amx in (True, False):
        core_probe = core._cpu_has_amx
        core._cpu_has_amx = lambda amx=amx: amx
        try:
            sdkern.patch(model)
        finally:
            core._cpu_has_amx = core_probe
        procs = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), SdkernAttnProcessor)]
        assert procs and all(p.sdpa is amx for p in procs)
        sdkern.unpatch(model)


def test_fp32_attention_choice_follows_the_cpu(monkeypatch):
    """fp32 on the engine: the U-Net's attention runs PyTorch's SDPA without AVX-512 (faster there) and
    sdkern::attention with it; the report says which; outputs meet the fp32 criterion on both paths."""
    from sdkern.patch import cpu_engine_modules
    from sdkern.patch.modules import SdkernAttnProcessor

    model = M.unet(M.SD1_SMALL_UNET)
    args = M.unet_inputs(model, batch=2, size=8)

    def run(m, dtype):
        return _unet_step(m, M.cast_inputs(args, dtype))

    for avx512 in (True, False):
        monkeypatch.setattr(cpu_engine_modules, "cpu_has_avx512", lambda avx512=avx512: avx512)
        check_model(model, run, torch.float32, f"fp32 U-Net, avx512={avx512}")  # criterion vs float64, exact unpatch
        report = sdkern.patch(model, report=True)
        procs = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), SdkernAttnProcessor)]
        assert procs and all(p.sdpa is not avx512 for p in procs)
        lines = [e.detail for e in report.rewritten if "attention," in e.detail]
        assert lines and all(("fp32 without AVX-512" in d) is not avx512 for d in lines), lines
        sdkern.unpatch(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, padding, stride, dilation, groups",
    [
        ((320, 320, 3, 3), [1, 1], [1, 1], [1, 1], 1),  # SD 3x3
        ((640, 320, 3, 3), [1, 1], [2, 2], [1, 1], 1),  # a downsampler
        ((12, 5, 5, 3), [0, 1], [1, 2], [1, 1], 1),  # odd: rectangular kernel, no padding on one side
        ((8, 3, 3, 3), [2, 2], [1, 1], [2, 2], 2),  # dilated, grouped
    ],
)
def test_conv_weight_reorder_paths_agree(monkeypatch, dtype, shape, padding, stride, dilation, groups):
    """The one-step reorder from the dense weight (inductor's private op, used when present) packs exactly as
    the public to_mkldnn + mkldnn_reorder_conv2d_weight path, and the fallback path works on its own."""
    from sdkern.patch import cpu_engine_modules as cem

    if cpu_engine.dtype_problem(dtype) is not None:
        pytest.skip(cpu_engine.dtype_problem(dtype))
    w = torch.randn(shape).to(dtype)
    fast = cem._reorder_conv(w, padding, stride, dilation, groups)
    assert cem._dense_conv_reorder() is not None  # torch 2.13 has the op; a future torch without it falls back
    monkeypatch.setattr(cem, "_dense_conv_reorder", lambda: None)
    slow = cem._reorder_conv(w, padding, stride, dilation, groups)
    assert torch.ops.mkldnn._nbytes(fast) == torch.ops.mkldnn._nbytes(slow)
    assert torch.equal(fast.to_dense(), slow.to_dense()) and torch.equal(slow.to_dense(), w)
    x = torch.randn(2, shape[1] * groups, 9, 11).to(dtype).contiguous(memory_format=torch.channels_last)
    args = (padding, stride, dilation, groups, "none", [], "")
    y_fast = torch.ops.mkldnn._convolution_pointwise(x, fast, None, *args)
    y_slow = torch.ops.mkldnn._convolution_pointwise(x, slow, None, *args)
    assert torch.equal(y_fast, y_slow)
    # packed for the input size (what the engine does at a call): both paths agree there too
    sized = cem._reorder_conv(w, padding, stride, dilation, groups, tuple(x.shape))
    monkeypatch.undo()
    sized_fast = cem._reorder_conv(w, padding, stride, dilation, groups, tuple(x.shape))
    assert torch.ops.mkldnn._nbytes(sized) == torch.ops.mkldnn._nbytes(sized_fast)
    assert torch.equal(sized.to_dense(), w) and torch.equal(sized_fast.to_dense(), w)
    assert torch.equal(torch.ops.mkldnn._convolution_pointwise(x, sized_fast, None, *args), y_fast)
