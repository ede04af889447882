"""SDXL ControlNet on the ONNX path: export, the CPU optimiser's fusions, the ORT pipeline vs diffusers' torch one.

The model is the tiny SDXL architecture of ``conftest`` (text_time added conditioning, two text encoders) with a
ControlNet made as users make theirs, ``ControlNetModel.from_unet`` (the U-Net's down and mid blocks and weights,
a conditioning embedding with one stride-2 convolution: the tiny VAE downsamples by 2). ``from_unet`` zero-
initialises the zero convolutions (and the embedding's last convolution), so every residual would be exactly 0
and a wrong residual could not show; they get random weights here.

Tolerance of the images (fp32, [0, 1]): max |diff| <= 1e-5 and relative L2 <= 5e-6, as test_pipelines.py (measured
by hand before this test: within 1.3e-6).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
diffusers = pytest.importorskip("diffusers")

from sdkern.onnx.export import example_inputs  # noqa: E402
from tests.onnx.conftest import build_tiny_sdxl  # noqa: E402
from tests.onnx.helpers import rel, session  # noqa: E402

# The export + optimisation of five SDXL components (U-Net with residual inputs, ControlNet) costs about a minute on
# 2 cores: more than this module's share of the CI budget, hence slow (slow tests run in CI too).
pytestmark = pytest.mark.slow

MAX_ABS, MAX_REL = 1e-5, 5e-6
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "controlnet")  # all but the VAE encoder


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _randomise_zero_convolutions(cn: torch.nn.Module, seed: int) -> None:
    """PyTorch's default-scale uniform weights for the zero convolutions and the embedding's ``conv_out``."""
    g = _gen(seed)
    convs = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
    for conv in convs:
        bound = 1 / math.sqrt(conv.weight[0].numel())
        conv.weight.copy_(torch.rand(conv.weight.shape, generator=g) * 2 * bound - bound)
        conv.bias.copy_(torch.rand(conv.bias.shape, generator=g) * 2 * bound - bound)


@pytest.fixture(scope="module")
def sdxl_cn_pipe():
    base = build_tiny_sdxl()  # a fresh one: the session's tiny_sdxl_pipe stays as other tests' caches know it
    cn = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    _randomise_zero_convolutions(cn, seed=7)
    cls = diffusers.StableDiffusionXLControlNetPipeline
    params = inspect.signature(cls.__init__).parameters
    pipe = cls(
        controlnet=cn,
        add_watermarker=False,  # the ORT pipeline has none either
        **{k: v for k, v in base.components.items() if k in params and k != "controlnet"},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_cn_dir(sdxl_cn_pipe, tmp_path_factory):
    from sdkern.onnx import build as onnx_build

    out = tmp_path_factory.mktemp("onnx") / "tiny-sdxl-controlnet"
    manifest = onnx_build.optimize_pipeline(sdxl_cn_pipe, out, target="cpu", use_cache=False, components=COMPONENTS)
    return out, manifest


def test_sdxl_controlnet_graph_is_fused(sdxl_cn_pipe, sdxl_cn_dir):
    """The ControlNet takes SDXL's added conditioning; every GroupNorm, GEGLU, attention and LayerNorm is fused."""
    import json

    import onnx

    out, manifest = sdxl_cn_dir
    cn = sdxl_cn_pipe.controlnet
    count = {
        n: sum(type(m).__name__ == n for m in cn.modules()) for n in ("GroupNorm", "GEGLU", "Attention", "LayerNorm")
    }
    assert min(count.values()) > 0, count
    fused = manifest["fused_nodes"]["controlnet"]
    assert fused["GroupNorm"] + fused.get("SkipGroupNorm", 0) == count["GroupNorm"]
    assert fused["BiasSplitGelu"] == count["GEGLU"]
    assert fused.get("MultiHeadAttention", 0) + fused.get("Attention", 0) == count["Attention"]
    assert fused.get("SkipLayerNormalization", 0) + fused.get("LayerNormalization", 0) == count["LayerNorm"]
    model = onnx.load(str(out / "controlnet" / "model.onnx"))
    assert {"InstanceNormalization", "Erf"}.isdisjoint(n.op_type for n in model.graph.node)
    inputs = [i.name for i in model.graph.input]
    assert inputs == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "controlnet_cond",
        "conditioning_scale",
        "text_embeds",
        "time_ids",
    ]
    n_res = len(cn.controlnet_down_blocks) + 1
    assert [o.name for o in model.graph.output][-1] == "mid_block_additional_residual"
    assert len(model.graph.output) == n_res
    unet_inputs = [i.name for i in onnx.load(str(out / "unet" / "model.onnx")).graph.input]
    assert unet_inputs[-n_res:] == [o.name for o in model.graph.output]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionXLControlNetPipeline"


@torch.no_grad()
def test_sdxl_controlnet_residuals_match_torch(sdxl_cn_pipe, sdxl_cn_dir):
    """Batch 1, 12x12 latent (the export used 2 x 8x8): residuals and the U-Net fed with them equal torch's."""
    out, _ = sdxl_cn_dir
    cn, unet = sdxl_cn_pipe.controlnet, sdxl_cn_pipe.unet
    feeds = example_inputs(sdxl_cn_pipe, "controlnet", batch=1, latent=12)
    got = session(out / "controlnet" / "model.onnx").run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
    args = (t["sample"], t["timestep"], t["encoder_hidden_states"])
    scale = float(feeds["conditioning_scale"][0])
    down, mid = cn(*args, t["controlnet_cond"], conditioning_scale=scale, added_cond_kwargs=added, return_dict=False)
    ref = [*down, mid]
    assert all(r.abs().max() > 0 for r in ref)  # the randomised zero convolutions: no residual is trivially 0
    for g, r in zip(got, ref, strict=True):
        assert g.shape == tuple(r.shape) and rel(g, r.numpy()) < 1e-5, (g.shape, rel(g, r.numpy()))
    unet_sess = session(out / "unet" / "model.onnx")
    names = [i.name for i in unet_sess.get_inputs()]
    unet_feeds = {n: feeds[n] for n in names[:5]}  # sample, timestep, encoder_hidden_states, text_embeds, time_ids
    unet_feeds.update(zip(names[5:], got, strict=True))
    u = unet_sess.run(None, unet_feeds)[0]
    want = unet(
        *args,
        added_cond_kwargs=added,
        down_block_additional_residuals=list(down),
        mid_block_additional_residual=mid,
    ).sample
    plain = unet(*args, added_cond_kwargs=added).sample
    assert rel(u, want.numpy()) < 1e-5
    assert rel(plain.numpy(), want.numpy()) > 1e-2  # the residuals matter


@torch.no_grad()
def test_sdxl_controlnet_pipeline_matches_torch(sdxl_cn_pipe, sdxl_cn_dir):
    from sdkern.onnx import OrtStableDiffusionPipeline

    out, _ = sdxl_cn_dir
    ort = OrtStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider")  # its own task
    assert type(ort) is diffusers.StableDiffusionXLControlNetPipeline
    control = torch.rand(1, 3, 32, 32, generator=_gen(5))
    kw = dict(prompt="a cat", negative_prompt="a dog", image=control, num_inference_steps=2, output_type="np")
    images = {}
    for scale, guess in ((0.7, False), (0.8, True)):  # guess mode: per-block scales applied by the stand-in
        args = dict(controlnet_conditioning_scale=scale, guess_mode=guess, **kw)
        ref = sdxl_cn_pipe(generator=_gen(1), **args).images
        got = ort(generator=_gen(1), **args).images
        assert got.shape == ref.shape == (1, 32, 32, 3) and ref.std() > 0.01
        err_abs, err_rel = float(np.abs(got - ref).max()), rel(got, ref)
        assert err_abs <= MAX_ABS and err_rel <= MAX_REL, (scale, guess, err_abs, err_rel)
        images[scale] = got
    assert np.abs(images[0.7] - images[0.8]).max() > 1e-3  # the control reaches the image
