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
    attn = [e.detail for e in report.rewritten if e.rule == "attention"]
    assert attn and all(d.startswith("self-attention, packed QKV") and "heads=1" in d for d in attn), attn
    assert report.left == []


def _clip_runner(ids: torch.Tensor, projection: bool, mask: torch.Tensor | None = None):
    def run(m, dtype):
        out = m(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        first = out.text_embeds if projection else out.last_hidden_state
        # SDXL conditions on the penultimate hidden state as well
        return torch.cat([first.flatten(), out.hidden_states[-2].flatten()])

    return run


def _assert_clip_fully_patched(report, layers: int, projection: bool) -> None:
    # causal self-attention, layer_norm1 per layer + final_layer_norm, and every Linear on the CPU engine:
    # q/k/v/out projections and fc1/fc2 per layer (+ text_projection); nothing fusable is left alone
    assert report.counts() == {
        "clip_layer": layers,
        "attention": layers,
        "layer_norm": layers + 1,
        "cpu_linear": 6 * layers + int(projection),
    }, report.counts()
    assert report.left == [], report.left
    assert all("CLIP self-attention" in e.detail for e in report.rewritten if e.rule == "attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("hidden", "heads", "act", "projection"),
    [
        (192, 3, "quick_gelu", False),  # SD 1.x / SDXL text_encoder (CLIP ViT-L/14, head dim 64), reduced width
        (256, 4, "gelu", True),  # SDXL text_encoder_2 (OpenCLIP bigG with projection, head dim 64), reduced width
    ],
    ids=["sd15_clip_l", "sdxl_bigG"],
)
def test_clip_text_encoder(hidden, heads, act, projection, dtype, poison):
    model = M.clip_text(hidden=hidden, layers=3, heads=heads, projection=projection, act=act)
    ids = torch.randint(0, 998, (2, 77))
    what = f"CLIP {hidden}/{heads} projection={projection} {dtype}"
    report, _, _ = check_model(model, _clip_runner(ids, projection), dtype, what)
    _assert_clip_fully_patched(report, 3, projection)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_clip_attention_causal_and_padding_fallback(backend, monkeypatch, poison):
    """Causal-only calls run sdkern::attention; a padding attention_mask runs transformers' attention."""
    from transformers.models.clip import modeling_clip

    calls = []
    orig = modeling_clip.CLIPAttention.forward

    def counting(self, hidden_states, attention_mask=None, **kwargs):  # the signature the patcher expects
        calls.append(attention_mask is not None)
        return orig(self, hidden_states, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(modeling_clip.CLIPAttention, "forward", counting)
    model = M.clip_text(hidden=128, layers=2, heads=2)
    ids = torch.randint(0, 998, (2, 77))
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[0, 50:] = 0  # padding in the first prompt
    # causal only: transformers' attention is not run at all once patched
    report, _, _ = check_model(model, _clip_runner(ids, False), torch.float32, "causal", backend=backend)
    assert report.counts()["attention"] == 2
    n_eager = len(calls)
    with torch.no_grad():
        sdkern.patch(model, backend=backend)
        _clip_runner(ids, False)(model, torch.float32)
        assert len(calls) == n_eager, "patched causal-only call ran transformers' attention"
        sdkern.unpatch(model)
    # with padding: the patched model falls back for the attention (and stays within the criterion)
    check_model(model, _clip_runner(ids, False, mask), torch.float32, "padding mask", backend=backend)
    assert calls[-1] is True and sum(calls[n_eager:]) == len(calls[n_eager:]) == 4 * 2
    # an all-ones mask is the causal-only case again (transformers drops it for sdpa)
    with torch.no_grad():
        sdkern.patch(model, backend=backend)
        n = len(calls)
        _clip_runner(ids, False, torch.ones(2, 77, dtype=torch.long))(model, torch.float32)
        assert len(calls) == n
        sdkern.unpatch(model)


def test_clip_eager_attn_implementation_left_with_reason(poison):
    model = M.clip_text(hidden=64, layers=1, heads=2)
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 998, (1, 77))
    report, _, _ = check_model(model, _clip_runner(ids, False), torch.float32, "eager attn")
    left = [e for e in report.left if e.module == "CLIPAttention"]
    assert len(left) == 1 and "attn_implementation='eager'" in left[0].detail


def test_pipeline_two_steps(tmp_path, poison, fp32_noise):
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
    # nothing fusable is left alone: no "no rewrite rule" / "no sdkern op" attention or LayerNorm leftovers
    assert report.left == [], report.left
    te = [e for e in report.rewritten if e.name.startswith("text_encoder.")]
    layers = pipe.text_encoder.config.num_hidden_layers
    assert sum(e.rule == "attention" for e in te) == layers
    assert sum(e.rule == "layer_norm" for e in te) == layers + 1


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
    assert "clip_layer=1" in text and "attention=1" in text and "left alone: 0" in text
    assert sdkern.patch_report(model).to_dict()["counts"] == {
        "clip_layer": 1,
        "attention": 1,
        "layer_norm": 2,
        "cpu_linear": 6,
    }


def test_clip_vision_encoder_non_causal(poison):
    """CLIPVisionModel (the safety checker's and IP-Adapter's encoder): the same rewrites, attention not causal."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = M.randomize_norms(CLIPVisionModel(cfg)).eval()
    pixels = torch.randn(2, 3, 32, 32)

    def run(m, dtype):
        out = m(pixel_values=pixels.to(dtype), output_hidden_states=True)
        return torch.cat([out.pooler_output.flatten(), out.hidden_states[-2].flatten()])

    report, _, _ = check_model(model, run, torch.float32, "CLIP vision")
    counts = report.counts()
    assert counts["attention"] == 2 and counts["clip_layer"] == 2
    assert counts["layer_norm"] == 2 + 2  # layer_norm1 per layer, pre_layrnorm, post_layernorm
    assert report.left == [], report.left
