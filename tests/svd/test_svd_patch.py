"""sdkern.patch on Stable Video Diffusion (tiny-svd preset): U-Net, temporal VAE decoder, whole pipeline.

Criterion (docs/ARCHITECTURE.md) against the float64 eager run; bit-exact unpatch; the patch report leaves no
temporal block without a rule; the SVD rules really run (their entry points are counted).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

import sdkern
from sdkern import models
from sdkern.patch import svd as svd_rules
from tests.patch.common import check_model, criterion, onednn_log
from tests.patch.models import randomize_norms

FRAMES = 3


def _component(name: str, seed: int = 0) -> torch.nn.Module:
    build_mod = sys.modules["sdkern.models.build"]
    m = models.build_component("tiny-svd", name, device="meta")
    build_mod._init_weights(m, seed, torch.device("cpu"), torch.float32)
    return randomize_norms(m).eval()


def _count(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[int]:
    calls = [0]
    orig = getattr(cls, method)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)
    return calls


def _types(model: torch.nn.Module, *names: str) -> int:
    return sum(type(m).__name__ in names for m in model.modules())


def _check_report(report: Any, model: torch.nn.Module) -> None:
    counts = report.counts()
    assert counts.get("temporal_resnet", 0) == _types(model, "TemporalResnetBlock")
    assert counts.get("time_mix", 0) == _types(model, "SpatioTemporalResBlock", "TransformerSpatioTemporalModel")
    assert counts.get("temporal_transformer_block", 0) == _types(model, "TemporalBasicTransformerBlock")
    assert not [e for e in report.left if "no rewrite rule" in e.detail]
    # what stays: LayerNorms with no residual before them (norm_in, the spatial blocks' norm1)
    assert {e.rule for e in report.left} <= {"layer_norm"}
    assert all(e.detail.startswith("plain LayerNorm") for e in report.left if e.rule == "layer_norm")
    if report.config.use_cpu_engine("cpu", next(model.parameters()).dtype):  # every temporal Conv3d packed
        assert counts.get("cpu_conv3d", 0) == _types(model, "Conv3d") > 0


@pytest.mark.parametrize(
    ("dtype", "engine"),
    [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)],
    ids=["fp32-engine", "fp32-no-engine", "bf16-engine"],
)
def test_unet(dtype: torch.dtype, engine: bool, poison: None, monkeypatch: pytest.MonkeyPatch) -> None:
    unet = _component("unet")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    batch = 2  # classifier-free guidance doubles the batch
    sample = torch.randn(batch, FRAMES, 8, 8, 8, generator=g)
    ctx = torch.randn(batch, 1, 32, generator=g)
    added = torch.randn(batch, 3, generator=g)
    branch = _count(monkeypatch, svd_rules.SdkernTemporalResnetBlock, "branch")
    mix = _count(monkeypatch, svd_rules.SdkernTemporalBasicTransformerBlock, "mix")

    def run(m: torch.nn.Module, dt: torch.dtype) -> torch.Tensor:
        return m(sample.to(dt), torch.tensor(3.5), ctx.to(dt), added.to(dt), return_dict=False)[0]

    report, _, _ = check_model(unet, run, dtype, f"SVD U-Net {dtype}", cpu_engine=engine)
    _check_report(report, unet)
    assert branch[0] == _types(unet, "TemporalResnetBlock")  # once each, in the one patched run
    assert mix[0] == _types(unet, "TemporalBasicTransformerBlock")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vae_decode(dtype: torch.dtype, poison: None, monkeypatch: pytest.MonkeyPatch) -> None:
    vae = _component("vae")
    z = torch.randn(2 * FRAMES, 4, 8, 8)
    branch = _count(monkeypatch, svd_rules.SdkernTemporalResnetBlock, "branch")

    def run(m: torch.nn.Module, dt: torch.dtype) -> torch.Tensor:
        return m.decode(z.to(dt), num_frames=FRAMES).sample

    report, _, _ = check_model(vae, run, dtype, f"SVD VAE decode {dtype}")
    _check_report(report, vae)
    counts = report.counts()
    assert counts["attention"] == 2  # encoder and temporal-decoder mid-block attention
    assert counts["conv_norm_out"] == 2  # encoder's and the temporal decoder's
    assert branch[0] == _types(vae.decoder, "TemporalResnetBlock")


@pytest.mark.usefixtures("fp32_noise")  # without it the float64 run denoised other noise: eager's error was 1.3
def test_pipeline_patched_vs_eager(poison: None) -> None:
    pipe = models.build("tiny-svd", seed=1)
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    seed = int(rng.integers(0, 2**31 - 1))

    def run(dtype: torch.dtype, output_type: str) -> torch.Tensor:
        pipe.to(dtype=dtype)
        out = pipe(
            image,
            height=32,
            width=32,
            num_frames=FRAMES,
            num_inference_steps=2,
            decode_chunk_size=FRAMES,
            generator=torch.Generator().manual_seed(seed),
            output_type=output_type,
        ).frames
        return (out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))).double()

    with torch.no_grad():
        ref = run(torch.float64, "latent")
        eager = run(torch.float32, "latent")
        eager_img = run(torch.float32, "pt")
        report = sdkern.patch(pipe, report=True)
        patched = run(torch.float32, "latent")
        patched_img = run(torch.float32, "pt")
        sdkern.unpatch(pipe)
        again = run(torch.float32, "latent")
        ref_img = run(torch.float64, "pt")
    assert torch.equal(again, eager), "latents after unpatch are not bit-identical to eager"
    err, bound = criterion(patched.float(), eager.float(), ref)
    assert err <= bound, f"pipeline latents: {err:.3e} > {bound:.3e}"
    err, bound = criterion(patched_img.float(), eager_img.float(), ref_img)
    assert err <= bound, f"pipeline frames: {err:.3e} > {bound:.3e}"
    assert {e.name.split(".")[0] for e in report.rewritten} == {"unet", "vae", "image_encoder"}
    assert not [e for e in report.left if "no rewrite rule" in e.detail]


@pytest.mark.parametrize("strategy", ["learned_with_images", "learned", "fixed"])
def test_time_mix_blocks_with_image_frames(strategy: str, poison: None) -> None:
    # The blend weights per frame: image-only frames (indicator 1) take the spatial branch alone under
    # "learned_with_images"; the other strategies use one scalar. Blocks built directly, mix factor random.
    from diffusers.models.resnet import AlphaBlender, SpatioTemporalResBlock
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    res = SpatioTemporalResBlock(32, 32, temb_channels=16, merge_strategy=strategy, merge_factor=0.3)
    tr = TransformerSpatioTemporalModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=32, cross_attention_dim=8
    )
    tr.time_mixer = AlphaBlender(alpha=-0.4, merge_strategy=strategy)
    model = randomize_norms(torch.nn.ModuleList([res, tr])).eval()
    frames, batch = 3, 2
    x = torch.randn(batch * frames, 32, 4, 4)
    temb = torch.randn(batch * frames, 16)
    ctx = torch.randn(batch * frames, 1, 8)
    indicator = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

    def run(m: torch.nn.Module, dt: torch.dtype) -> torch.Tensor:
        h = m[0](x.to(dt), temb.to(dt), image_only_indicator=indicator)
        return m[1](h, ctx.to(dt), image_only_indicator=indicator, return_dict=False)[0]

    report, _, _ = check_model(model, run, torch.float32, f"time mix {strategy}")
    assert report.counts()["time_mix"] == 2 and report.counts()["temporal_transformer_block"] == 1


@torch.no_grad()
def test_packed_conv3d_state_dict_round_trip() -> None:
    # The CPU engine holds the temporal Conv3d weights packed: state_dict gives them dense (5-D), and
    # load_state_dict re-packs (the path LoRA fusing takes), matching eager with the same new weights.
    eager = _component("unet", seed=4)
    patched = copy.deepcopy(eager)
    report = sdkern.patch(patched, report=True)
    assert report.counts()["cpu_conv3d"] == _types(eager, "Conv3d")
    sd = patched.state_dict()
    key = "down_blocks.0.resnets.0.temporal_res_block.conv1.weight"
    assert sd[key].shape == (32, 32, 3, 1, 1) and not sd[key].is_mkldnn
    assert torch.equal(sd[key], eager.state_dict()[key])
    new = {key: sd[key] * 1.5 + 0.01}
    patched.load_state_dict(new, strict=False)
    eager.load_state_dict(new, strict=False)
    x, c, a = torch.randn(2, FRAMES, 8, 8, 8), torch.randn(2, 1, 32), torch.randn(2, 3)
    got, want = patched(x, torch.tensor(1.0), c, a).sample, eager(x, torch.tensor(1.0), c, a).sample
    assert torch.equal(patched.state_dict()[key], new[key])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    conv = patched.down_blocks[0].resnets[0].temporal_res_block.conv1
    assert conv.__dict__["_sdkern_packed_for"] == (2, 32, FRAMES, 64)  # (B, C, F, H*W) of the call: see below
    sdkern.unpatch(patched)
    assert torch.equal(dict(patched.named_parameters())[key], new[key])


def test_steady_step_runs_no_reorder(capfd: pytest.CaptureFixture[str]) -> None:
    """The temporal convolutions' weights are packed for the (B, C, F, H*W) input they are called with (the layout
    oneDNN's primitive wants depends on it): a steady patched step runs no oneDNN reorder."""
    model = _component("unet", seed=5)
    sdkern.patch(model)
    x, c, a = torch.randn(2, FRAMES, 8, 8, 8), torch.randn(2, 1, 32), torch.randn(2, 3)

    def step() -> torch.Tensor:
        return model(x, torch.tensor(1.0), c, a).sample

    with torch.no_grad():
        step()
    log = onednn_log(capfd, step)
    sdkern.unpatch(model)
    kinds = {f[5] for f in log}
    assert "convolution" in kinds and "reorder" not in kinds, [f[5:9] for f in log if f[5] == "reorder"][:5]
