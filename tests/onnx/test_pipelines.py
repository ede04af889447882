"""img2img, inpainting, ControlNet and the safety checker on the ONNX path (issue #22).

Tiny random-weight presets (``tiny``, ``tiny-inpaint``, ``tiny-controlnet`` with a safety checker, the tiny SDXL
architecture of ``conftest``), each optimised once per module for the CPU EP with sdkern's custom ops.

Tolerance of the ORT-vs-torch images (fp32): max |diff| <= 1e-5 and relative L2 <= 5e-6 on images in [0, 1].
The existing txt2img comparison (test_optimize.test_full_ort_pipeline_matches_torch: tiny, 2 steps, seeds 0-2)
measured max |diff| <= 1.2e-6 and relative L2 <= 4.7e-7 (the stand-in pipeline the same); img2img, inpainting
and ControlNet measured the same order here (<= 1.2e-6). The bounds are ~8-10x that, and 1e-5 is 0.0026 of one
8-bit level: the same seed gives the same images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
diffusers = pytest.importorskip("diffusers")

from sdkern.onnx.export import example_inputs  # noqa: E402
from tests.onnx.helpers import rel as _rel  # noqa: E402
from tests.onnx.helpers import session as _session  # noqa: E402

MAX_ABS, MAX_REL = 1e-5, 5e-6


def _same(got, ref) -> None:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    assert ref.std() > 0.01  # a real image, not a constant
    assert np.abs(got - ref).max() <= MAX_ABS and _rel(got, ref) <= MAX_REL, (np.abs(got - ref).max(), _rel(got, ref))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(side: int, seed: int = 3) -> torch.Tensor:
    """An init image (1, 3, side, side) in [-1, 1], as the pipelines' image processors take tensors."""
    return torch.rand(1, 3, side, side, generator=_gen(seed)) * 2 - 1


def _mask(side: int) -> torch.Tensor:
    """A (1, 1, side, side) mask in [0, 1]: the right half repainted."""
    m = torch.zeros(1, 1, side, side)
    m[..., side // 2 :] = 1.0
    return m


def _torch(cls_name: str, pipe):
    """The torch pipeline ``cls_name`` on ``pipe``'s modules (those its constructor takes)."""
    import inspect

    cls = getattr(diffusers, cls_name)
    params = inspect.signature(cls.__init__).parameters
    p = cls(**{k: v for k, v in pipe.components.items() if k in params})
    p.set_progress_bar_config(disable=True)
    return p


def _safety_inputs(checker) -> torch.Tensor:
    """Four clip inputs of very different content (zeros, ones, two random)."""
    side = checker.config.vision_config.image_size
    g = _gen(11)
    return torch.stack(
        [torch.zeros(3, side, side), torch.ones(3, side, side), *torch.randn(2, 3, side, side, generator=g)]
    )


@torch.no_grad()
def _threshold_between(checker, clip_input: torch.Tensor) -> None:
    """Set concept 0's threshold midway between the middle two cosine similarities of ``clip_input``'s images
    (the other concepts and the special-care ones keep 1.0, never reached): two of the four images flagged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    emb = checker.visual_projection(checker.vision_model(clip_input)[1])
    cos = cosine_distance(emb, checker.concept_embeds)[:, 0].sort().values
    checker.concept_embeds_weights[0] = (cos[1] + cos[2]) / 2
    assert float(cos[2] - cos[1]) > 4e-3, cos  # far from the threshold: torch's 3-decimal rounding cannot flip it


@pytest.fixture(scope="module")
def cn_pipe():
    from sdkern.models import build

    pipe = build("tiny-controlnet", seed=0, safety_checker=True)
    _threshold_between(pipe.safety_checker, _safety_inputs(pipe.safety_checker))
    return pipe


@pytest.fixture(scope="module")
def cn_dir(cn_pipe, tmp_path_factory):
    """``tiny-controlnet`` + safety checker, optimised as ``sdkern optimize --safety-checker`` does."""
    from sdkern.onnx import build as onnx_build

    out = tmp_path_factory.mktemp("onnx") / "tiny-controlnet"
    # every component but vae_encoder (img2img / inpainting: tested on the other directories), to save time
    comps = ("text_encoder", "unet", "vae_decoder", "controlnet", "safety_checker")
    manifest = onnx_build.optimize_pipeline(cn_pipe, out, target="cpu", use_cache=False, components=comps)
    return out, manifest


@pytest.fixture(scope="module")
def inpaint_pipe():
    from sdkern.models import build

    return build("tiny-inpaint", seed=0)


@pytest.fixture(scope="module")
def inpaint_dir(inpaint_pipe, tmp_path_factory):
    from sdkern.onnx import build as onnx_build

    out = tmp_path_factory.mktemp("onnx") / "tiny-inpaint"
    return out, onnx_build.optimize_pipeline(inpaint_pipe, out, target="cpu", use_cache=False)


def _load(path, **kw):
    from sdkern.onnx import OrtStableDiffusionPipeline

    return OrtStableDiffusionPipeline.from_pretrained(path, provider="CPUExecutionProvider", **kw)


# -- VAE encoder and img2img ------------------------------------------------------------------------------------


@torch.no_grad()
def test_vae_encoder_exports_the_latent_distribution(tiny_pipe, tiny_dir):
    out, _, _ = tiny_dir
    feeds = example_inputs(tiny_pipe, "vae_encoder", batch=1, latent=12)
    names = [o.name for o in _session(out / "vae_encoder" / "model.onnx").get_outputs()]
    assert names == ["latent_sample", "latent_parameters"]
    params = _session(out / "vae_encoder" / "model.onnx").run(["latent_parameters"], feeds)[0]
    dist = tiny_pipe.vae.encode(torch.from_numpy(feeds["sample"])).latent_dist
    assert _rel(params, dist.parameters.numpy()) < 1e-5


@torch.no_grad()
def test_sd_img2img_matches_torch(tiny_pipe, tiny_dir):
    out, _, _ = tiny_dir
    ort = _load(out, task="img2img")
    assert type(ort) is diffusers.StableDiffusionImg2ImgPipeline
    torch_pipe = _torch("StableDiffusionImg2ImgPipeline", tiny_pipe)
    kw = dict(prompt="a cat", negative_prompt="a dog", image=_image(32), strength=0.6, num_inference_steps=4)
    images = []
    for seed in (0, 1):
        ref = torch_pipe(generator=_gen(seed), output_type="np", **kw).images
        got = ort(generator=_gen(seed), output_type="np", **kw).images
        _same(got, ref)
        images.append(got)
    # the generator reaches the VAE's latent sampling and the noise: another seed, another image
    assert np.abs(images[0] - images[1]).max() > 1e-3


@torch.no_grad()
def test_fp16_img2img_within_one_level_of_torch_fp16(tiny_fp16_dir):
    """fp16 on the CPU EP (ORT runs fp16 Conv/MatMul through inserted Casts to fp32; sdkern's ops take fp16):
    the 8-bit image of the torch fp16 pipeline within one level. Measured: max 1 level, mean 0.14 (torch fp16
    vs torch fp32 differ as much: max 1, mean 0.12)."""
    from sdkern.models import build

    ort = _load(tiny_fp16_dir, task="img2img")
    assert ort.vae.encoder.get_inputs()[0].type == "tensor(float16)"
    torch16 = _torch("StableDiffusionImg2ImgPipeline", build("tiny", dtype=torch.float16, seed=0))
    kw = dict(prompt="a cat", image=_image(32), strength=0.6, num_inference_steps=3, output_type="np")
    ref = torch16(generator=_gen(1), **kw).images
    got = ort(generator=_gen(1), **kw).images
    levels = np.abs(np.round(got * 255).astype(np.int16) - np.round(ref * 255).astype(np.int16))
    assert ref.std() > 0.01 and levels.max() <= 1 and levels.mean() < 0.5, (levels.max(), levels.mean())


@torch.no_grad()
def test_sdxl_img2img_and_inpaint_match_torch(tiny_sdxl_pipe, tiny_sdxl_dir):
    out, _, _ = tiny_sdxl_dir
    kw = dict(prompt="a cat", image=_image(32), strength=0.7, num_inference_steps=3, output_type="np")
    for task, cls, extra in (
        ("img2img", "StableDiffusionXLImg2ImgPipeline", {}),
        ("inpaint", "StableDiffusionXLInpaintPipeline", {"mask_image": _mask(32), "height": 32, "width": 32}),
    ):
        ort = _load(out, task=task)
        assert type(ort).__name__ == cls
        ref = _torch(cls, tiny_sdxl_pipe)(generator=_gen(2), **kw, **extra).images
        got = ort(generator=_gen(2), **kw, **extra).images
        _same(got, ref)


# -- inpainting (9-channel U-Net) ---------------------------------------------------------------------------------


@torch.no_grad()
def test_inpaint_directory_and_pipeline_match_torch(inpaint_pipe, inpaint_dir):
    import onnx

    out, manifest = inpaint_dir
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionInpaintPipeline"
    sample = next(i for i in onnx.load(str(out / "unet" / "model.onnx")).graph.input if i.name == "sample")
    assert sample.type.tensor_type.shape.dim[1].dim_value == 9
    assert manifest["fused_nodes"]["unet"].get("SkipGroupNorm", 0) > 0
    ort = _load(out)  # the directory's own task: inpaint
    assert type(ort) is diffusers.StableDiffusionInpaintPipeline
    kw = dict(prompt="a cat", image=_image(32), mask_image=_mask(32), height=32, width=32, num_inference_steps=3)
    # strength < 1: the VAE encoder gives both the init-image and the masked-image latents
    ref = inpaint_pipe(generator=_gen(4), strength=0.6, output_type="np", **kw).images
    got = ort(generator=_gen(4), strength=0.6, output_type="np", **kw).images
    _same(got, ref)


# -- ControlNet ---------------------------------------------------------------------------------------------------


def test_controlnet_graph_has_the_unet_fusions(cn_pipe, cn_dir):
    """Every GroupNorm, GEGLU, attention and LayerNorm of the torch ControlNet is fused (counts derived from
    the module tree); the ops the CPU EP lacks are in sdkern's domain; nothing unfused is left."""
    import onnx

    out, manifest = cn_dir
    count = {
        name: sum(type(m).__name__ == name for m in cn_pipe.controlnet.modules())
        for name in ("GroupNorm", "GEGLU", "Attention", "LayerNorm")
    }
    fused = manifest["fused_nodes"]["controlnet"]
    assert fused["GroupNorm"] + fused["SkipGroupNorm"] == count["GroupNorm"] == 10
    assert fused["SkipGroupNorm"] > 0 and fused["BiasAdd"] > 0
    assert fused["BiasSplitGelu"] == count["GEGLU"] == 2
    assert fused.get("MultiHeadAttention", 0) + fused.get("Attention", 0) == count["Attention"] == 4
    assert fused.get("SkipLayerNormalization", 0) + fused.get("LayerNormalization", 0) == count["LayerNorm"] == 6
    model = onnx.load(str(out / "controlnet" / "model.onnx"))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    sdkern_ops = {op for d, op in ops if d == "sdkern"}
    assert sdkern_ops == {"GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"}
    assert not {"InstanceNormalization", "Erf"} & {op for _, op in ops}  # no unfused GroupNorm or GELU left
    outputs = [o.name for o in model.graph.output]
    assert outputs[-1] == "mid_block_additional_residual" and len(outputs) == 1 + 4  # conv_in, 2 resnets, downsampler
    index = json.loads((out / "model_index.json").read_text())
    assert (
        index["_class_name"] == "OnnxStableDiffusionControlNetPipeline" and index["controlnet"][1] == "OnnxRuntimeModel"
    )
    assert json.loads((out / "controlnet" / "config.json").read_text())["conditioning_embedding_out_channels"] == [
        8,
        16,
    ]


@torch.no_grad()
def test_controlnet_and_unet_with_residuals_match_torch(cn_pipe, cn_dir):
    """Batch 1 and a 12x12 latent (the export used 2 x 8x8): the dynamic axes hold."""
    out, _ = cn_dir
    feeds = example_inputs(cn_pipe, "controlnet", batch=1, latent=12)
    assert feeds["controlnet_cond"].shape == (1, 3, 24, 24)
    got = _session(out / "controlnet" / "model.onnx").run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    down, mid = cn_pipe.controlnet(
        t["sample"], t["timestep"], t["encoder_hidden_states"], t["controlnet_cond"],
        conditioning_scale=float(feeds["conditioning_scale"][0]), return_dict=False,
    )  # fmt: skip
    for g, r in zip(got, [*down, mid], strict=True):
        assert g.shape == tuple(r.shape) and _rel(g, r.numpy()) < 1e-5
    # the residuals scale with conditioning_scale (the zero convolutions are random here, not zero)
    half = _session(out / "controlnet" / "model.onnx").run(
        None, {**feeds, "conditioning_scale": feeds["conditioning_scale"] / 2}
    )
    assert max(_rel(2 * h, g) for h, g in zip(half, got, strict=True)) < 1e-6 and np.abs(got[-1]).max() > 0
    unet_feeds = {k: feeds[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    names = [i.name for i in _session(out / "unet" / "model.onnx").get_inputs()][3:]
    unet_feeds.update(zip(names, got, strict=True))
    u = _session(out / "unet" / "model.onnx").run(None, unet_feeds)[0]
    ref = cn_pipe.unet(
        t["sample"], t["timestep"], t["encoder_hidden_states"],
        down_block_additional_residuals=list(down), mid_block_additional_residual=mid,
    ).sample  # fmt: skip
    assert _rel(u, ref.numpy()) < 1e-5


@torch.no_grad()
def test_controlnet_pipeline_matches_torch(cn_pipe, cn_dir):
    out, _ = cn_dir
    ort = _load(out)
    assert type(ort) is diffusers.StableDiffusionControlNetPipeline
    control = (_image(32, seed=5) + 1) / 2
    kw = dict(prompt="a cat", negative_prompt="a dog", image=control, num_inference_steps=2, output_type="np")
    images = {}
    for scale, guess in ((0.7, False), (0.8, True)):  # guess mode: per-block scales applied by the stand-in
        args = dict(controlnet_conditioning_scale=scale, guess_mode=guess, **kw)
        ref = cn_pipe(generator=_gen(1), **args)
        got = ort(generator=_gen(1), **args)
        _same(got.images, ref.images)
        assert got.nsfw_content_detected == ref.nsfw_content_detected
        images[scale] = got.images
    assert np.abs(images[0.7] - images[0.8]).max() > 1e-3
    # txt2img on the same directory: the U-Net's residual inputs get zeros, as the plain torch U-Net
    t2i = _load(out, task="txt2img")
    ref = _torch("StableDiffusionPipeline", cn_pipe)
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, output_type="np")
    _same(t2i(generator=_gen(3), **kw).images, ref(generator=_gen(3), **kw).images)


# -- safety checker -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_safety_checker_export_flags_as_torch(cn_pipe, cn_dir):
    out, manifest = cn_dir
    assert (out / "feature_extractor" / "preprocessor_config.json").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == ["diffusers", "OnnxRuntimeModel"] and index["requires_safety_checker"]
    fused = manifest["fused_nodes"]["safety_checker"]
    assert fused.get("SkipLayerNormalization", 0) > 0
    checker = cn_pipe.safety_checker
    clip = _safety_inputs(checker)
    images = torch.rand(4, 3, 16, 16, generator=_gen(12)) * 2 - 1
    ref_images, ref_flags = checker(images=images.clone(), clip_input=clip)
    got_images, got_flags = _session(out / "safety_checker" / "model.onnx").run(
        None, {"clip_input": clip.numpy(), "images": images.numpy()}
    )
    assert got_flags.tolist() == list(ref_flags) == checker.forward_onnx(clip, images.clone())[1].tolist()
    assert sum(ref_flags) == 2  # the fixture's threshold: two of four flagged
    np.testing.assert_array_equal(got_images, ref_images.numpy())  # flagged: zeros; the others untouched
    # the stand-in the ORT pipelines use
    from sdkern.onnx.standins import OrtSafetyChecker

    sc = OrtSafetyChecker(_session(out / "safety_checker" / "model.onnx"))
    sc_images, sc_flags = sc(clip_input=clip, images=images.clone())
    assert sc_flags == list(ref_flags) and torch.equal(sc_images, ref_images)
    # NHWC images (diffusers' ONNX pipeline) of another size: the same flags, the same images zeroed
    nhwc = images[:, :, :10].permute(0, 2, 3, 1).numpy()
    nhwc_out, nhwc_flags = sc(clip_input=clip, images=nhwc)
    assert nhwc_flags == list(ref_flags) and isinstance(nhwc_out, np.ndarray)
    np.testing.assert_array_equal(nhwc_out, np.where(np.array(ref_flags)[:, None, None, None], 0.0, nhwc))
    ort = _load(out)
    assert isinstance(ort.safety_checker, OrtSafetyChecker) and ort.feature_extractor is not None


def test_cli_optimize_safety_checker_flag(tmp_path, capsys, monkeypatch):
    from sdkern.cli import main
    from sdkern.models import build
    from sdkern.onnx import build as onnx_build

    real = onnx_build.optimize_pipeline
    seen = {}

    def only_the_checker(pipe, out, **kw):  # export only what the flag adds, to keep the test short
        seen.update(kw)
        return real(pipe, out, **{**kw, "components": ("safety_checker",)})

    monkeypatch.setattr(onnx_build, "optimize_pipeline", only_the_checker)
    out = tmp_path / "out"
    assert main(["optimize", "--model", "tiny", "--safety-checker", "--out", str(out), "--no-cache"]) == 0
    assert seen["safety_checker"] is True
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["fused_nodes"]) == {"safety_checker"}
    assert (out / "safety_checker" / "model.onnx").is_file() and (out / "feature_extractor").is_dir()
    # a local pipeline without a safety checker: one clear usage error, nothing written
    src = tmp_path / "src"
    # a fresh pipeline: save_pretrained writes ``architectures`` into the text encoder's config, which would
    # change the session's tiny_pipe (and its cache key, test_optimize's cache-hit test)
    build("tiny", seed=0).save_pretrained(str(src))
    rc = main(["optimize", "--model", str(src), "--safety-checker", "--out", str(tmp_path / "y"), "--no-cache"])
    assert rc == 2 and "--safety-checker: --model" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# -- clear errors -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_what_a_directory_cannot_do_is_refused_clearly(tiny_dir, cn_dir):
    import types

    from sdkern.apps.onnx.standins import OrtVae

    out, _, _ = tiny_dir
    with pytest.raises(ValueError, match="task must be one of"):
        _load(out, task="upscale")
    with pytest.raises(ValueError, match="needs a controlnet/ folder"):
        _load(out, task="controlnet")
    # a U-Net without residual inputs given ControlNet residuals
    t2i = _load(out, task="txt2img", io_binding=True)
    x, ehs = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
    with pytest.raises(NotImplementedError, match="without ControlNet residual inputs"):
        t2i.unet(x, 10, ehs, down_block_additional_residuals=[x], mid_block_additional_residual=x)
    cn_unet = _load(cn_dir[0]).unet
    with pytest.raises(ValueError, match="both"):
        cn_unet(x, 10, ehs, mid_block_additional_residual=x)
    with pytest.raises(ValueError, match="1 down-block residuals given, 4 expected"):
        cn_unet(x, 10, ehs, down_block_additional_residuals=[x], mid_block_additional_residual=x)
    # a VAE encoder written before latent_parameters (or by another tool): img2img refused with the fix
    old = types.SimpleNamespace(get_outputs=lambda: [types.SimpleNamespace(name="latent_sample")])
    vae = OrtVae(t2i.vae.decoder, t2i.vae.config, encoder=old)
    with pytest.raises(NotImplementedError, match="re-run `sdkern optimize`"):
        vae.encode(torch.zeros(1, 3, 16, 16))
