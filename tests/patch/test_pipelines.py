"""sdkern.patch on every pipeline users run: img2img, inpainting, ControlNet, LCM (+ LCM-LoRA), SDXL-Turbo.

Each pipeline is built offline (``sdkern.models`` presets, random weights) and run three ways -- eager float64
(the oracle), eager float32, patched float32 -- under the project's criterion (docs/ARCHITECTURE.md): fp32 rel L2
vs float64 <= max(2 x eager fp32's, 1e-5). After ``unpatch`` the output is bit-identical to eager, and the patch
report rewrote every model of the pipeline and left nothing fusable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import sdkern  # noqa: E402
from sdkern import models  # noqa: E402
from tests.patch.common import criterion  # noqa: E402
from tests.utils import rel_l2  # noqa: E402


def _assert_report_complete(report: Any, components: set[str]) -> None:
    """Every model component rewritten; nothing left alone."""
    rewritten = {e.name.split(".")[0] for e in report.rewritten}
    assert rewritten == components, f"rewritten components {rewritten}, expected {components}"
    left = [(e.name, e.module, e.detail) for e in report.left]
    assert left == [], f"left alone: {left}"


def _assert_all_blocks_rewritten(report: Any, model: torch.nn.Module, prefix: str) -> None:
    """Each ResnetBlock2D and Attention module of ``model`` (named ``prefix``...) has a rewritten entry."""
    names = {e.name for e in report.rewritten}
    for name, m in model.named_modules():
        if type(m).__name__ in ("ResnetBlock2D", "Attention"):
            assert f"{prefix}.{name}" in names, f"{prefix}.{name} ({type(m).__name__}) not rewritten"


pytestmark = pytest.mark.usefixtures("fp32_noise")


def _image(side: int, seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8))


def _mask(side: int) -> Any:
    from PIL import Image

    m = np.zeros((side, side), dtype=np.uint8)
    m[side // 4 : 3 * side // 4, side // 3 :] = 255
    return Image.fromarray(m)


def _check_pipeline(pipe: Any, call: Callable[[Any], torch.Tensor], what: str) -> tuple[Any, torch.Tensor]:
    """Float64 oracle, eager fp32, patched fp32 (criterion), unpatched (bit-exact). Returns (report, eager)."""
    with torch.no_grad():
        pipe.to(dtype=torch.float64)  # fp32 -> f64 -> fp32 is exact
        ref64 = call(pipe)
        pipe.to(dtype=torch.float32)
        eager = call(pipe)
        report = sdkern.patch(pipe, report=True)
        patched = call(pipe)
        sdkern.unpatch(pipe)
        again = call(pipe)
    assert torch.isfinite(patched).all(), f"{what}: non-finite patched output"
    err, bound = criterion(patched, eager, ref64)
    assert err <= bound, f"{what}: patched rel L2 {err:.3e} > {bound:.3e} (eager {rel_l2(eager, ref64):.3e})"
    assert torch.equal(again, eager), f"{what}: output after unpatch is not bit-identical to eager"
    return report, eager


def _latents(out: Any) -> torch.Tensor:
    return out.images


def test_img2img(poison):
    base = models.build("tiny", seed=11)
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    init = _image(32, 1)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())

    def call(p):
        g = torch.Generator().manual_seed(seed)
        # strength 0.5 of 4 steps: the last 2 timesteps run
        out = p("a photo of a cat", image=init, strength=0.5, num_inference_steps=4, generator=g, output_type="latent")
        return _latents(out)

    report, _ = _check_pipeline(pipe, call, "img2img")
    _assert_report_complete(report, {"unet", "vae", "text_encoder"})
    _assert_all_blocks_rewritten(report, pipe.vae.encoder, "vae.encoder")  # img2img encodes the init image


def test_inpaint(poison):
    pipe = models.build("tiny-inpaint", seed=12)
    assert pipe.unet.config.in_channels == 9
    init, mask = _image(32, 2), _mask(32)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())

    def call(p):
        g = torch.Generator().manual_seed(seed)
        out = p(
            "a dog",
            image=init,
            mask_image=mask,
            strength=0.5,
            num_inference_steps=4,
            generator=g,
            output_type="latent",
        )
        return _latents(out)

    report, _ = _check_pipeline(pipe, call, "inpaint")
    _assert_report_complete(report, {"unet", "vae", "text_encoder"})
    _assert_all_blocks_rewritten(report, pipe.unet, "unet")
    conv_in = [e for e in report.rewritten if e.name == "unet.conv_in"]
    assert len(conv_in) == 1  # the 9-channel input convolution too


def _controlnet_call(seed: int, control: Any, scale: float, steps: int = 2) -> Callable[[Any], torch.Tensor]:
    def call(p):
        g = torch.Generator().manual_seed(seed)
        out = p(
            "a city",
            image=control,
            num_inference_steps=steps,
            controlnet_conditioning_scale=scale,
            generator=g,
            output_type="latent",
        )
        return _latents(out)

    return call


def test_controlnet(poison):
    pipe = models.build("tiny-controlnet", seed=13)
    control = _image(32, 3)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    report, _ = _check_pipeline(pipe, _controlnet_call(seed, control, 0.8), "controlnet")
    _assert_report_complete(report, {"unet", "vae", "text_encoder", "controlnet"})
    # The ControlNet's own blocks are rewritten, not only the U-Net's.
    _assert_all_blocks_rewritten(report, pipe.controlnet, "controlnet")
    n_cn = sum(e.name.startswith("controlnet.") for e in report.rewritten)
    assert n_cn >= sum(type(m).__name__ in ("ResnetBlock2D", "Attention") for m in pipe.controlnet.modules())


def test_controlnet_scale_moves_output_as_eager(poison):
    """The conditioning scale multiplies the patched ControlNet's residuals exactly as it does eager's (bit for bit
    against the unit-scale residuals, at several scales, 0 giving exact zeros), and the patched residuals are eager's
    under the criterion. (The whole pipeline at a scale: test_controlnet.)"""
    pipe = models.build("tiny-controlnet", seed=14)
    cn = pipe.controlnet
    x = torch.randn(2, 4, 16, 16)
    ehs = torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 32, 32)
    scales = (0.0, 0.35, 1.0, 1.7)

    def residuals(scale: float) -> list[torch.Tensor]:
        dt = cn.dtype
        down, mid = cn(x.to(dt), 500, ehs.to(dt), cond.to(dt), conditioning_scale=scale, return_dict=False)
        return [*down, mid]

    with torch.no_grad():
        eager = {s: residuals(s) for s in scales}
        sdkern.patch(pipe)
        patched = {s: residuals(s) for s in scales}
        sdkern.unpatch(pipe)
    for s in scales:
        for k, (e, p) in enumerate(zip(eager[s], patched[s], strict=True)):
            # patched and eager apply the same multiplication to their unit-scale residuals
            assert torch.equal(p, patched[1.0][k] * s), (s, k)
            assert torch.equal(e, eager[1.0][k] * s), (s, k)
    assert all(torch.count_nonzero(t) == 0 for t in patched[0.0])
    # and the residuals themselves are eager's under the criterion (float64 oracle) at every scale
    with torch.no_grad():
        cn.double()
        ref = {s: residuals(s) for s in scales[1:]}
        cn.float()
    for s in scales[1:]:
        got, base = torch.cat([t.flatten() for t in patched[s]]), torch.cat([t.flatten() for t in eager[s]])
        err, bound = criterion(got, base, torch.cat([t.flatten() for t in ref[s]]))
        assert err <= bound, f"ControlNet residuals at scale {s}: {err:.3e} > {bound:.3e}"


def _random_lora(unet: torch.nn.Module, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """An LCM-LoRA-shaped adapter for a U-Net: attention projections, feed-forwards, proj_in/out, the resnets'
    convolutions and time projections (diffusers/PEFT keys, random values)."""
    g = torch.Generator().manual_seed(seed)
    targets_linear = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    targets_conv = ("conv1", "conv2", "time_emb_proj")
    sd: dict[str, torch.Tensor] = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith((*targets_linear, "time_emb_proj")):
            a, b = (rank, m.in_features), (m.out_features, rank)
        elif isinstance(m, torch.nn.Conv2d) and name.endswith((*targets_conv, "proj_in", "proj_out")):
            a, b = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
        else:
            continue
        sd[f"unet.{name}.lora_A.weight"] = torch.randn(*a, generator=g) * 0.05
        sd[f"unet.{name}.lora_B.weight"] = torch.randn(*b, generator=g) * 0.05
    return sd


def test_lcm_with_lcm_lora(poison):
    """LCMScheduler, 2 steps, no CFG, with a LoRA fused through sdkern.lora (fused again after patching)."""
    from sdkern import lora

    pipe = models.build("tiny", seed=15)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    sd = _random_lora(pipe.unet)
    assert any(".conv1." in k for k in sd) and any("to_q" in k for k in sd)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())

    def call(p):
        g = torch.Generator().manual_seed(seed)
        return _latents(p("a horse", num_inference_steps=2, guidance_scale=1.0, generator=g, output_type="latent"))

    with torch.no_grad():
        plain = call(pipe)
        lora.load(pipe, sd, adapter_name="lcm")
        pipe.to(dtype=torch.float64)
        ref64 = call(pipe)
        pipe.to(dtype=torch.float32)
        eager = call(pipe)
        lora.unfuse(pipe)
        report = sdkern.patch(pipe, report=True)
        lora.set_adapters(pipe, ["lcm"], [1.0])  # fuse into the patched modules (packed QKV weights included)
        patched = call(pipe)
        sdkern.unpatch(pipe)
        again = call(pipe)
    assert not torch.allclose(eager, plain, rtol=1e-3)  # the LoRA changes the result
    err, bound = criterion(patched, eager, ref64)
    assert err <= bound, f"LCM + LoRA: patched {err:.3e} > {bound:.3e} (eager {rel_l2(eager, ref64):.3e})"
    assert torch.equal(again, eager), "LCM + LoRA: output after unpatch is not bit-identical to eager"
    _assert_report_complete(report, {"unet", "vae", "text_encoder"})


def _tiny_sdxl() -> models.PresetConfig:
    """SDXL's architecture at test size: text_time conditioning, two text encoders (the second with projection)."""
    tiny, sdxl = models.PRESETS["tiny"], models.PRESETS["sdxl"]
    te = dict(tiny.text_encoders[0])
    return dataclasses.replace(
        sdxl,
        name="tiny-sdxl-test",
        unet={
            **tiny.unet,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2],
            "cross_attention_dim": 64,
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
        },
        vae={**tiny.vae, "scaling_factor": 0.13025, "force_upcast": True},
        text_encoders=[te, {**te, "hidden_act": "gelu", "with_projection": True}],
        default_size=32,
        known_unet_params=None,
    )


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo(steps, poison):
    """SDXL-Turbo usage: EulerAncestral with trailing timesteps, guidance 0 (no CFG batch), 1 and 4 steps."""
    pipe = models.build(_tiny_sdxl(), seed=16)
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    seed = int(torch.randint(0, 2**31 - 1, ()).item())

    def call(p):
        g = torch.Generator().manual_seed(seed)
        out = p(
            "a mountain",
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=g,
            output_type="latent",
        )
        return _latents(out)

    report, _ = _check_pipeline(pipe, call, f"SDXL-Turbo {steps} steps")
    _assert_report_complete(report, {"unet", "vae", "text_encoder", "text_encoder_2"})
    _assert_all_blocks_rewritten(report, pipe.unet, "unet")
