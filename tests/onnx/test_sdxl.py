"""SDXL on the ONNX path (issue #9): export, optimise for the CPU EP, run as a pipeline, CLI.

All on the tiny SDXL architecture of ``conftest.tiny_sdxl_config`` (text_time added conditioning, two
text encoders), built by the real ``sdkern.models.build("sdxl")`` code with that config.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from sdkern.onnx.export import SDXL_COMPONENTS, _spec, example_inputs
from tests.onnx.helpers import assert_same_images, cuda_only_copy
from tests.onnx.helpers import generate as _generate
from tests.onnx.helpers import rel as _rel
from tests.onnx.helpers import session as _session


def test_sdxl_directory_layout_and_fused_nodes(tiny_sdxl_dir):
    import onnx

    out, _, manifest = tiny_sdxl_dir
    for comp in SDXL_COMPONENTS:
        assert (out / comp / "model.onnx").is_file() and (out / comp / "config.json").is_file(), comp
        onnx.checker.check_model(str(out / comp / "model.onnx"))
    for d in ("tokenizer", "tokenizer_2", "scheduler"):
        assert (out / d).is_dir(), d
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionXLPipeline" and "text_encoder_2" in index
    assert manifest["options"]["components"] == list(SDXL_COMPONENTS)
    unet = manifest["fused_nodes"]["unet"]
    for op in ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "SkipLayerNormalization"):
        assert unet.get(op, 0) > 0, (op, unet)
    assert unet.get("MultiHeadAttention", 0) + unet.get("Attention", 0) > 0
    for comp in ("text_encoder", "text_encoder_2"):
        assert manifest["fused_nodes"][comp].get("SkipLayerNormalization", 0) > 0, comp
    assert manifest["fused_nodes"]["vae_decoder"].get("GroupNorm", 0) > 0
    model = onnx.load(str(out / "unet" / "model.onnx"))
    assert [i.name for i in model.graph.input] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["sample"][0] == "batch" and dims["sample"][2:] == ["height", "width"]
    assert dims["text_embeds"][0] == "batch" and dims["time_ids"] == ["batch", 6]
    domains = {n.domain for n in model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu")}
    assert domains == {"sdkern"}
    te2 = onnx.load(str(out / "text_encoder_2" / "model.onnx"))
    assert [o.name for o in te2.graph.output] == ["text_embeds", "last_hidden_state", "hidden_states.penultimate"]


def _feeds(pipe, component: str) -> dict[str, np.ndarray]:
    """Real token ids for the text encoders; batch 1 and a 12x12 latent (not the export's 2 x 8x8) else."""
    if component.startswith("text_encoder"):
        tok = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
        ids = tok(["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="np").input_ids
        return {"input_ids": ids.astype(np.int32)}
    return example_inputs(pipe, component, batch=1, latent=12)


@torch.no_grad()
@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "unet", "vae_decoder"])
def test_sdxl_component_parity_with_pytorch(tiny_sdxl_pipe, tiny_sdxl_dir, component):
    out, _, _ = tiny_sdxl_dir
    feeds = _feeds(tiny_sdxl_pipe, component)
    ref = _spec(tiny_sdxl_pipe, component)["module"](*[torch.from_numpy(v) for v in feeds.values()])
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = _session(out / component / "model.onnx").run(None, feeds)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == tuple(r.shape)
        assert _rel(g, r.numpy()) < 1e-4, (component, _rel(g, r.numpy()))
    if component == "text_encoder_2":  # what encode_prompt reads: the projected pooled output, hidden_states[-2]
        o = tiny_sdxl_pipe.text_encoder_2(torch.from_numpy(feeds["input_ids"]).long(), output_hidden_states=True)
        assert _rel(got[0], o[0].numpy()) < 1e-4 and _rel(got[2], o.hidden_states[-2].numpy()) < 1e-4


@torch.no_grad()
def test_sdxl_vae_encoder_samples_the_latent_distribution(tiny_sdxl_pipe, tiny_sdxl_dir):
    out, _, _ = tiny_sdxl_dir
    feeds = example_inputs(tiny_sdxl_pipe, "vae_encoder")
    got = _session(out / "vae_encoder" / "model.onnx").run(None, feeds)[0]
    dist = tiny_sdxl_pipe.vae.encode(torch.from_numpy(feeds["sample"])).latent_dist
    z = (got - dist.mean.numpy()) / dist.std.numpy()
    assert got.shape == tuple(dist.mean.shape)
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 1.5


@torch.no_grad()
def test_full_sdxl_ort_pipeline_matches_torch(tiny_sdxl_pipe, tiny_sdxl_dir):
    import diffusers

    from sdkern.onnx import OrtStableDiffusionPipeline

    out, _, _ = tiny_sdxl_dir
    ort_pipe = OrtStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider")
    assert isinstance(ort_pipe, diffusers.StableDiffusionXLPipeline)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a cat", negative_prompt="a dog", height=32, width=32, num_inference_steps=2, output_type="np")
    ref = tiny_sdxl_pipe(latents=lat, **kw).images
    got = ort_pipe(latents=lat, **kw).images
    assert got.shape == ref.shape == (1, 32, 32, 3)
    assert ref.std() > 0.01  # a real image, not a constant
    assert _rel(got, ref) < 1e-3
    # one clear error for what the exported encoders do not provide
    with pytest.raises(NotImplementedError, match="clip_skip"):
        ort_pipe(latents=lat, clip_skip=1, **kw)
    # img2img / inpainting: the VAE encoder is wired (tests/onnx/test_pipelines.py runs those pipelines)
    dist = ort_pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist
    assert _rel(dist.mean.numpy(), tiny_sdxl_pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.numpy()) < 1e-5


@torch.no_grad()
def test_ort_unet_with_added_conditioning(tiny_sdxl_pipe, tmp_path):
    from sdkern.onnx import OrtUNet

    unet = OrtUNet.from_module(tiny_sdxl_pipe.unet, workdir=str(tmp_path))
    in_features = tiny_sdxl_pipe.unet.add_embedding.linear_1.in_features
    assert unet.add_embedding.linear_1.in_features == in_features
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ehs = torch.randn(2, 77, tiny_sdxl_pipe.unet.config.cross_attention_dim, generator=gen)
    cond = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    ref = tiny_sdxl_pipe.unet(x, torch.tensor(500), ehs, added_cond_kwargs=cond).sample
    got = unet(x, torch.tensor(500), ehs, added_cond_kwargs=cond).sample
    assert _rel(got.numpy(), ref.numpy()) < 1e-4
    unet.io_binding = False
    assert torch.equal(unet(x, torch.tensor(500), ehs, added_cond_kwargs=cond).sample, got)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        unet(x, 500, ehs)
    with pytest.raises(NotImplementedError, match="supports"):
        unet(x, 500, ehs, added_cond_kwargs={**cond, "image_embeds": x})


def test_cli_optimize_sdxl_preset(tiny_sdxl_as_preset, tmp_path, capsys):
    """``sdkern optimize --model sdxl`` takes the preset path (build("sdxl")), here with the tiny config."""
    from sdkern.cli import main

    out = tmp_path / "out"
    rc = main(["optimize", "--model", "sdxl", "--out", str(out), "--no-cache"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fused_nodes"]["unet"].get("SkipGroupNorm", 0) > 0
    assert set(printed["fused_nodes"]) == set(SDXL_COMPONENTS)
    for comp in SDXL_COMPONENTS:
        assert (out / comp / "model.onnx").is_file()


def test_cli_optimize_sdxl_local_directory(tiny_sdxl_pipe, tiny_sdxl_dir, tmp_path):
    """A local diffusers SDXL directory loads as StableDiffusionXLPipeline and exports the same models.

    (The source hash differs: it covers the configs, whose ``_name_or_path`` the saved copy changes.)
    """
    from sdkern.cli import main

    src = tmp_path / "src"
    tiny_sdxl_pipe.save_pretrained(str(src))
    out = tmp_path / "out"
    assert main(["optimize", "--model", str(src), "--out", str(out), "--no-cache"]) == 0
    manifest = json.loads((out / "sdkern_manifest.json").read_text())
    assert manifest["fused_nodes"] == tiny_sdxl_dir[2]["fused_nodes"]
    for comp in ("text_encoder_2", "unet"):
        feeds = _feeds(tiny_sdxl_pipe, comp)
        got = _session(out / comp / "model.onnx").run(None, feeds)
        want = _session(tiny_sdxl_dir[0] / comp / "model.onnx").run(None, feeds)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_generate_onnx_sdxl_matches_torch_of_the_same_seed(tiny_sdxl_pipe, tiny_sdxl_dir, tmp_path):
    """``sdkern generate --onnx DIR`` on an SDXL directory vs the torch path with the same settings.

    Same seeds give the same CPU-drawn latents and (euler-a) the same step noise. Tolerance as in
    test_generate_onnx: at most 1 level of 255, mean below 0.05 (the pipeline matches within 1e-3).
    """

    from sdkern.generate import GenerateSettings, generate

    out, _, _ = tiny_sdxl_dir
    common = dict(steps=2, seed=5, n_samples=2, scheduler="euler-a", prompt="a cat", negative_prompt="a dog")
    argv = ["--steps", "2", "--seed", "5", "--n-samples", "2", "--scheduler", "euler-a"]
    argv += ["--prompt", "a cat", "--negative-prompt", "a dog"]
    onnx = _generate("--onnx", str(out), *argv, "--out", str(tmp_path / "onnx"))
    torch_ = generate(GenerateSettings(**common, patch=False, out=str(tmp_path / "torch")), pipe=tiny_sdxl_pipe)
    assert (
        [p.name for p in onnx] == [p.name for p in torch_] == ["00000-seed5.png", "00001-seed6.png", "grid-seed5.png"]
    )
    meta = assert_same_images(onnx[:2], torch_[:2], (32, 32, 3))
    assert meta["patched"] == "onnx" and meta["device"] == "CPUExecutionProvider" and meta["dtype"] == "float32"
    assert meta["seed"] == "6"


def test_fp16_sdxl_directory_generates_close_to_torch_fp32(tiny_sdxl_pipe, tmp_path):
    """``optimize --fp16`` on SDXL: both sinusoidal embeddings (timestep and the added time ids) stay fp32.

    Tolerance as in test_generate_onnx's fp16 test: at most 4 levels of 255, mean below 0.5.
    """
    import onnx
    from PIL import Image

    from sdkern.generate import GenerateSettings, generate
    from sdkern.onnx import build as onnx_build

    out = tmp_path / "tiny-sdxl-fp16"
    onnx_build.optimize_pipeline(tiny_sdxl_pipe, out, target="cpu", fp16=True, use_cache=False)
    types = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(out / "unet" / "model.onnx")).graph.input}
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert types == {"sample": f16, "timestep": f32, "encoder_hidden_states": f16, "text_embeds": f16, "time_ids": f32}
    common = dict(steps=4, seed=5, scheduler="euler-a", prompt="a cat")
    onnx_paths = _generate("--onnx", str(out), "--steps", "4", "--seed", "5", "--scheduler", "euler-a",
                           "--prompt", "a cat", "--out", str(tmp_path / "onnx"))  # fmt: skip
    torch_paths = generate(GenerateSettings(**common, patch=False, out=str(tmp_path / "torch")), pipe=tiny_sdxl_pipe)
    with Image.open(onnx_paths[0]) as im:
        assert im.text["dtype"] == "float16"
        got = np.asarray(im, dtype=np.int16)
    diff = np.abs(got - np.asarray(Image.open(torch_paths[0]), dtype=np.int16))
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_real_sdxl_preset_export_geometry():
    """The real ``sdxl`` preset (meta device: nothing allocated): the U-Net's added-conditioning inputs
    derived by the export match text_encoder_2's projection and the concatenated encoder widths."""
    import types

    from sdkern.models import build_component

    unet = build_component("sdxl", "unet")
    te1, te2 = build_component("sdxl", "text_encoder", 0), build_component("sdxl", "text_encoder", 1)
    holder = types.SimpleNamespace(unet=unet, text_encoder=None, vae=None, tokenizer=None)
    spec = _spec(holder, "unet")
    shapes = {n: tuple(a.shape) for n, a in zip(spec["inputs"], spec["args"], strict=True)}
    assert shapes["text_embeds"] == (2, te2.config.projection_dim) == (2, 1280)
    assert shapes["encoder_hidden_states"] == (2, 77, te1.config.hidden_size + te2.config.hidden_size)
    assert shapes["time_ids"] == (2, 6)


def test_sdxl_directory_for_another_provider_is_refused_clearly(tiny_sdxl_dir, tmp_path):
    """A U-Net with com.microsoft GroupNorm (as ``--target cuda`` writes) on the CPU provider: one clear error."""

    from sdkern.onnx import OrtStableDiffusionPipeline
    from sdkern.onnx.pipeline import OnnxPipelineError

    src, _, _ = tiny_sdxl_dir
    dst = cuda_only_copy(src, tmp_path / "cuda-dir")
    with pytest.raises(OnnxPipelineError, match=r"no kernel on CPUExecutionProvider.*--provider cuda"):
        OrtStableDiffusionPipeline.from_pretrained(dst, provider="CPUExecutionProvider")
    (dst / "text_encoder_2" / "model.onnx").unlink()
    with pytest.raises(OnnxPipelineError, match=r"text_encoder_2/model\.onnx"):
        OrtStableDiffusionPipeline.from_pretrained(dst, provider="CPUExecutionProvider")
