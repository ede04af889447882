"""The bench engine ``ort`` on CUDA: ORT's own SD fusions for the CUDA EP, IO binding on the device."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().cpu(), b.double().cpu()
    return float((a64 - b64).norm() / b64.norm())


def test_cuda_target_model_has_ort_sd_fusions(tiny_pipe, tmp_path):
    """What ``OrtUNet.from_module(fp16 unet, target="cuda", sdkern_ops=False)`` builds (no GPU needed):
    every ORT SD fusion in com.microsoft, NHWC convolutions, fp16 activations, fp32 timestep."""
    import onnx

    from sdkern.onnx import count_ops
    from sdkern.onnx.build import optimize_component
    from sdkern.onnx.export import export_component

    src = copy.deepcopy(tiny_pipe.unet).float()
    holder = types.SimpleNamespace(unet=src, text_encoder=None, vae=None, tokenizer=None)
    raw = export_component(holder, "unet", tmp_path / "raw" / "model.onnx")
    optimize_component(raw, tmp_path / "opt" / "model.onnx", "unet", "cuda", fp16=True, sdkern_ops=False)
    model = onnx.load(str(tmp_path / "opt" / "model.onnx"))
    ms = count_ops(model, domain="com.microsoft")
    for op in ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "MultiHeadAttention"):
        assert ms.get(op, 0) > 0, (op, ms)
    assert not count_ops(model, domain="sdkern")
    types_ = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types_ == {
        "sample": onnx.TensorProto.FLOAT16,
        "timestep": onnx.TensorProto.FLOAT,
        "encoder_hidden_states": onnx.TensorProto.FLOAT16,
    }


@pytest.mark.cuda
@torch.no_grad()
def test_ort_unet_cuda_io_binding(tiny_pipe):
    """On the CUDA EP: device tensors bound by pointer give the NumPy path's output, close to torch fp16."""
    import onnxruntime as ort

    from sdkern.onnx import OrtUNet

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu")
    unet16 = copy.deepcopy(tiny_pipe.unet).to("cuda", torch.float16)
    ort_unet = OrtUNet.from_module(unet16, target="cuda", sdkern_ops=False)
    try:
        assert ort_unet.session.get_providers()[0] == "CUDAExecutionProvider"
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(2, 4, 8, 8, generator=gen).to("cuda", torch.float16)
        ehs = torch.randn(2, 77, tiny_pipe.unet.config.cross_attention_dim, generator=gen).to("cuda", torch.float16)
        bound = ort_unet(x, torch.tensor([500], device="cuda"), ehs).sample
        assert bound.device.type == "cuda" and bound.dtype == torch.float16
        ort_unet.io_binding = False
        plain = ort_unet(x, torch.tensor([500], device="cuda"), ehs).sample
        # same kernels, same inputs; the CUDA EP is deterministic for these ops
        assert np.array_equal(bound.cpu().numpy(), plain.cpu().numpy())
        ref32 = tiny_pipe.unet(x.float().cpu(), torch.tensor(500), ehs.float().cpu()).sample
        ref16 = unet16(x, torch.tensor(500, device="cuda"), ehs).sample
        assert _rel(bound, ref32) <= 2 * _rel(ref16, ref32) + 1e-4
    finally:
        ort_unet.close()


@pytest.mark.cuda
@torch.no_grad()
def test_sd_pipeline_on_cuda_ep_stays_on_the_device(tiny_pipe, tmp_path):
    """``OrtStableDiffusionPipeline`` on the CUDA EP: the device-resident stand-in pipeline (latents and
    scheduler state on cuda, the U-Net bound by pointer) gives the torch pipeline's image."""
    import diffusers
    import onnxruntime as ort

    from sdkern.onnx import optimize_pipeline
    from sdkern.onnx.pipeline import OrtStableDiffusionPipeline

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a CUDA GPU and onnxruntime-gpu")
    out = tmp_path / "cuda-dir"
    optimize_pipeline(tiny_pipe, out, target="cuda", cache_dir=tmp_path / "cache")
    pipe = OrtStableDiffusionPipeline.from_pretrained(out, provider="cuda")
    assert type(pipe) is diffusers.StableDiffusionPipeline and pipe.unet.io_binding
    assert pipe.device.type == "cuda"
    seen = []
    run = pipe.unet._run_bound

    def spy(feeds, o):
        seen.append({t.device.type for t in feeds.values()} | {o.device.type})
        return run(feeds, o)

    pipe.unet._run_bound = spy
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hs = 8 * tiny_pipe.vae_scale_factor
    kw = dict(height=hs, width=hs, num_inference_steps=2, latents=lat, output_type="np")
    ref = tiny_pipe("a cat", **kw).images
    got = pipe("a cat", **kw).images
    assert seen and all(s == {"cuda"} for s in seen)
    assert _rel(torch.from_numpy(got), torch.from_numpy(ref)) < 1e-3
