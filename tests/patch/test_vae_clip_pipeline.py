"""sdkern.patch on the VAE, the CLIP text encoders and a complete offline StableDiffusionPipeline."""

from __future__ import annotations

import pytest
import torch

import sdkern
from tests.patch import models as M
from tests.patch.common import check_model, criterion


def test_vae_decoder(poison):
    model = M.vae()
    z = torch.randn(1, 4, 16, 16)

    def run(m, dtype):
        return m.decode(z.to(dtype)).sample

    report, _, _ = check_model(model, run, torch.float32, "VAE decoder")
    counts = report.counts()
    # decoder and encoder: every resnet, the mid-block attention, both conv_norm_out
    n_res = sum(type(m).__name__ == "ResnetBlock2D" for m in model.modules())
    assert counts["resnet"] == n_res
    assert counts["attention"] == 2 and counts["conv_norm_out"] == 2
    assert counts["group_norm"] == 2  # the attention blocks' GroupNorm
    assert all("self-attention, packed QKV, heads=1" in e.detail for e in report.rewritten if e.rule == "attention")
    assert report.left == []


@pytest.mark.parametrize("projection", [False, True], ids=["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_clip_text_encoder(projection, poison):
    model = M.clip_text(projection=projection)
    ids = torch.randint(0, 998, (2, 77))

    def run(m, dtype):
        out = m(input_ids=ids, output_hidden_states=True)
        first = out.text_embeds if projection else out.last_hidden_state
        # SDXL uses the penultimate hidden state as well
        return torch.cat([first.flatten(), out.hidden_states[-2].flatten()])

    report, _, _ = check_model(model, run, torch.float32, f"CLIP projection={projection}")
    layers = model.config.num_hidden_layers
    # every Linear runs on the CPU engine: q/k/v/out projections and fc1/fc2 per layer (+ text_projection)
    assert report.counts() == {"clip_layer": layers, "cpu_linear": 6 * layers + int(projection)}
    left = {(e.module, e.detail) for e in report.left}
    assert ("CLIPAttention", "causal (masked) text attention: sdkern::attention has no mask") in left
    assert sum(e.module == "CLIPAttention" for e in report.left) == layers


def test_pipeline_two_steps(tmp_path, poison):
    pipe = M.sd_pipeline(tmp_path)
    assert pipe.tokenizer.model_max_length == 77
    prompt = ["a photo of the cat and the dog", "in the park"]
    seed = int(torch.randint(0, 2**31 - 1, ()).item())

    def run(dtype):
        pipe.to(dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        out = pipe(
            prompt, height=64, width=64, num_inference_steps=2, guidance_scale=7.5, generator=g, output_type="latent"
        )
        return out.images.double()

    def run_image(dtype):
        pipe.to(dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        out = pipe(prompt, height=64, width=64, num_inference_steps=2, generator=g, output_type="pt")
        return out.images.double()

    with torch.no_grad():
        ref64 = run(torch.float64)
        eager = run(torch.float32)
        report = sdkern.patch(pipe, report=True)
        assert sdkern.patch_report(pipe) is report
        for comp in ("unet", "vae", "text_encoder"):
            assert sdkern.patch_report(getattr(pipe, comp)) is not None
        patched = run(torch.float32)
        err, bound = criterion(patched, eager, ref64)
        assert err <= bound, f"pipeline latents: {err:.3e} > {bound:.3e}"
        patched_img = run_image(torch.float32)
        sdkern.unpatch(pipe)
        assert all(sdkern.patch_report(getattr(pipe, c)) is None for c in ("unet", "vae", "text_encoder"))
        again = run(torch.float32)
        eager_img = run_image(torch.float32)
        ref_img = run_image(torch.float64)
    assert torch.equal(again, eager)
    err, bound = criterion(patched_img, eager_img, ref_img)
    assert err <= bound, f"pipeline images: {err:.3e} > {bound:.3e}"
    names = {e.name.split(".")[0] for e in report.rewritten}
    assert names == {"unet", "vae", "text_encoder"}


def test_config_validation():
    with pytest.raises(ValueError, match="backend"):
        sdkern.PatchConfig(backend="tpu")
    with pytest.raises(TypeError, match="unknown PatchConfig"):
        sdkern.PatchConfig().replace(fuse_everything=True)
    model = M.clip_text(layers=1)
    with pytest.raises(TypeError, match="deepcache"):
        sdkern.patch(model, deepcache=object())
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        sdkern.patch(model, deepcache={"interval": 2})
    assert sdkern.patch_report(model) is None
    with pytest.raises(TypeError, match="DiffusionPipeline"):
        sdkern.patch(object())
    assert sdkern.patch_report(model) is None
    cfg = sdkern.PatchConfig()
    assert cfg.use_channels_last("cuda", torch.float32) and cfg.use_channels_last("cpu", torch.bfloat16)
    assert not cfg.use_channels_last("cpu", torch.float32) and not cfg.use_channels_last("hpu")
    assert cfg.replace(channels_last=True).use_channels_last("cpu", torch.float32)
    assert not cfg.replace(channels_last=False).use_channels_last("cuda")


def test_module_is_callable_after_import():
    import sdkern.patch as sp

    model = M.clip_text(layers=1)
    assert sdkern.patch(model, report=True) is sp.patch_report(model)
    sdkern.unpatch(model)
    text = str(sdkern.patch(model, report=True))
    assert "clip_layer=1" in text and "CLIPAttention" in text
    assert sdkern.patch_report(model).to_dict()["counts"] == {"clip_layer": 1, "cpu_linear": 6}
