"""sdkern.models: real architectures (parameter counts on the meta device) and deterministic weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from sdkern import models


@pytest.mark.parametrize(
    ("preset", "expected"),
    # Parameter counts of the published U-Nets (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
    # stabilityai/stable-diffusion-xl-base-1.0): 859.52M, 865.91M, 2567.46M.
    [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)],
)
def test_unet_parameter_counts(preset: str, expected: int) -> None:
    unet = models.build_component(preset, "unet", device="meta")
    assert models.count_parameters(unet) == expected
    assert all(p.is_meta for p in unet.parameters())


@pytest.mark.parametrize(
    ("preset", "index", "expected_millions"),
    # CLIP ViT-L/14 text tower 123.06M; OpenCLIP ViT-H text tower (23 layers) 340.39M; bigG with projection 694.66M.
    [("sd15", 0, 123.06), ("sd21", 0, 340.39), ("sdxl", 1, 694.66)],
)
def test_text_encoder_parameter_counts(preset: str, index: int, expected_millions: float) -> None:
    enc = models.build_component(preset, "text_encoder", index=index, device="meta")
    assert models.count_parameters(enc) / 1e6 == pytest.approx(expected_millions, abs=0.01)


def test_vae_parameter_count() -> None:
    vae = models.build_component("sd15", "vae", device="meta")
    assert models.count_parameters(vae) == 83_653_863  # the SD VAE (AutoencoderKL, 83.65M)


def test_build_is_deterministic_and_seed_dependent() -> None:
    a = models.build("tiny", seed=3)
    b = models.build("tiny", seed=3)
    c = models.build("tiny", seed=4)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    ta, tb = a.text_encoder.state_dict(), b.text_encoder.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # No parameter left uninitialised (to_empty leaves garbage; NaN/inf or all-zero would show it).
    for m in (a.unet, a.vae, a.text_encoder):
        for name, p in m.named_parameters():
            assert torch.isfinite(p).all(), name
            assert p.abs().sum() > 0, name


def test_build_dtype_matches_float32_values() -> None:
    a = models.build("tiny", seed=1)
    b = models.build("tiny", seed=1, dtype=torch.bfloat16)
    for (name, pa), (_, pb) in zip(a.unet.named_parameters(), b.unet.named_parameters(), strict=True):
        assert pb.dtype == torch.bfloat16
        assert torch.equal(pa.to(torch.bfloat16), pb), name


def test_tokenizer_generated_offline(tmp_path) -> None:
    tok = models.make_tokenizer(cache_dir=tmp_path)
    assert tok.model_max_length == 77
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert max(ids) < 1000  # fits the tiny text encoder's vocabulary (and CLIP's 49408)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        models.build("sd3")


# Published SD 1.5 inpainting U-Net (runwayml/stable-diffusion-inpainting): the SD 1.5 U-Net with a 9-channel conv_in,
# 859,520,964 + 320 * 5 * 9 = 859,535,364. SD 1.5 ControlNet (lllyasviel/sd-controlnet-*, control_v11p_sd15_*):
# 361,279,120 (1.445 GB in fp32, the published 1.45 GB checkpoints). SD 1.x safety checker
# (CompVis/stable-diffusion-safety-checker): CLIP ViT-L/14 vision tower + 768-d projection + 17 + 3 concept
# embeddings and thresholds, 303,981,588 (1.216 GB in fp32, the published 1.22 GB model.safetensors).
@pytest.mark.parametrize(
    ("preset", "component", "expected"),
    [
        ("sd15-inpaint", "unet", 859_535_364),
        ("sd15-controlnet", "unet", 859_520_964),
        ("sd15-controlnet", "controlnet", 361_279_120),
        ("sd15-inpaint", "safety_checker", 303_981_588),
    ],
)
def test_pipeline_preset_parameter_counts(preset: str, component: str, expected: int) -> None:
    m = models.build_component(preset, component, device="meta")
    assert models.count_parameters(m) == expected
    assert all(p.is_meta for p in m.parameters())
    if component == "unet":
        assert models.PRESETS[preset].known_unet_params == expected


def test_controlnet_matches_its_unet() -> None:
    # A ControlNet is the U-Net's down and mid blocks: diffusers' from_unet gives the same architecture.
    from diffusers import ControlNetModel

    for preset in ("sd15-controlnet", "tiny-controlnet"):
        unet = models.build_component(preset, "unet", device="meta")
        cn = models.build_component(preset, "controlnet", device="meta")
        cfg = models.PRESETS[preset].controlnet
        with torch.device("meta"):
            ref = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=cfg["conditioning_embedding_out_channels"]
            )
        shapes = {k: v.shape for k, v in cn.state_dict().items()}
        assert shapes == {k: v.shape for k, v in ref.state_dict().items()}


def test_no_controlnet_in_plain_preset() -> None:
    with pytest.raises(ValueError, match="has no ControlNet"):
        models.build_component("tiny", "controlnet")


def test_tiny_inpaint_and_controlnet_pipelines() -> None:
    import diffusers

    inp = models.build("tiny-inpaint", seed=2)
    assert isinstance(inp, diffusers.StableDiffusionInpaintPipeline)
    assert inp.unet.config.in_channels == 9 and inp.safety_checker is None
    cn = models.build("tiny-controlnet", seed=2)
    assert isinstance(cn, diffusers.StableDiffusionControlNetPipeline)
    assert isinstance(cn.controlnet, diffusers.ControlNetModel)
    # Same seed: the shared components are those of the plain tiny preset; the ControlNet is drawn, not zero.
    plain = models.build("tiny", seed=2)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(cn, name).state_dict(), getattr(plain, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for name, p in cn.controlnet.named_parameters():
        assert torch.isfinite(p).all() and p.abs().sum() > 0, name
    # The conditioning embedding brings a control image of the pipeline's size to the latent size.
    side = models.PRESETS["tiny-controlnet"].default_size
    with torch.no_grad():
        emb = cn.controlnet.controlnet_cond_embedding(torch.zeros(1, 3, side, side))
    assert emb.shape[-1] == side // cn.vae_scale_factor


def test_safety_checker_optional_and_deterministic() -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    a = models.build("tiny-controlnet", seed=5, safety_checker=True)
    b = models.build("tiny-controlnet", seed=5, safety_checker=True)
    c = models.build("tiny-controlnet", seed=5)
    assert isinstance(a.safety_checker, StableDiffusionSafetyChecker) and a.feature_extractor is not None
    assert c.safety_checker is None and c.feature_extractor is None
    sa, sb = a.safety_checker.state_dict(), b.safety_checker.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Adding the checker leaves the other components' weights unchanged.
    ua, uc = a.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(ua[k], uc[k]) for k in ua)
    assert a.feature_extractor.crop_size == {"height": 32, "width": 32}
    assert models.make_feature_extractor("sd15").crop_size == {"height": 224, "width": 224}


def test_safety_checker_flags_and_blacks_out() -> None:
    import numpy as np

    pipe = models.build("tiny", seed=0, safety_checker=True)
    kw = {"num_inference_steps": 1, "output_type": "np"}
    out = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw)
    assert out.nsfw_content_detected == [False] and np.abs(out.images).sum() > 0  # default thresholds: not flagged
    with torch.no_grad():
        pipe.safety_checker.concept_embeds_weights.fill_(-1.0)  # every cosine similarity exceeds -1: flagged
    out = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw)
    assert out.nsfw_content_detected == [True] and np.abs(out.images).sum() == 0


def test_safety_checker_refused_for_sdxl() -> None:
    with pytest.raises(ValueError, match="pipelines only"):
        models.build("sdxl", safety_checker=True)
