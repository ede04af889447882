"""Offline builders for the patch tests: SD-architecture diffusers/transformers models with random weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sdkern.models.configs import SD15

# SD 1.5 U-Net: the sd15 preset's config (320/640/1280/1280, 8 heads -> head dims 40/80/160,
# conv proj_in/out, cross dim 768).
SD15_UNET = dict(SD15.unet)

# SD 2.x-like: head dim 64 ("attention_head_dim" is the number of heads in SD2 configs), linear
# projections, cross dim 1024; reduced widths, every block type.
SD2_UNET = dict(
    sample_size=32,
    block_out_channels=(64, 128, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=(1, 2, 2, 2),
    use_linear_projection=True,
    upcast_attention=True,
)

# SDXL-like: added text/time conditioning, 1/2/10 transformer layers per block, head dim 64, cross dim 2048.
SDXL_UNET = dict(
    sample_size=32,
    block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(1, 2, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=6 * 32 + 64,
)
SDXL_POOLED_DIM = 64

# SD VAE architecture with reduced widths (the mid-block attention and all block types kept).
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)


def randomize_norms(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Give every norm non-trivial affine parameters (default init is gamma=1, beta=0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.add_(torch.randn_like(m.weight) * scale)
                if m.bias is not None:
                    m.bias.copy_(torch.randn_like(m.bias) * scale)
    return model


def unet(config: dict) -> nn.Module:
    """A UNet2DConditionModel with random weights, eval mode."""
    from diffusers import UNet2DConditionModel

    return randomize_norms(UNet2DConditionModel(**config)).eval()


def vae(config: dict | None = None) -> nn.Module:
    from diffusers import AutoencoderKL

    return randomize_norms(AutoencoderKL(**(config or VAE))).eval()


def clip_text(
    hidden: int = 128,
    layers: int = 3,
    heads: int = 2,
    vocab: int = 1000,
    projection: bool = False,
    act: str = "quick_gelu",
):
    """A CLIPTextModel (or ...WithProjection) with random weights and SD's 77-token context.

    ``act``: "quick_gelu" (OpenAI CLIP, SD 1.x and SDXL's first encoder) or "gelu" (OpenCLIP, SD 2.x and
    SDXL's second encoder).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return randomize_norms(cls(cfg)).eval()


def unet_inputs(model: nn.Module, batch: int, size: int, dtype: torch.dtype = torch.float32, seq: int = 77) -> dict:
    """Fresh random U-Net inputs (latents, timestep, text states, SDXL added conditioning)."""
    cfg = model.config
    args = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, dtype=dtype),
        "timestep": torch.tensor(float(torch.randint(1, 999, ()).item())),
        "encoder_hidden_states": torch.randn(batch, seq, cfg.cross_attention_dim, dtype=dtype),
    }
    if cfg.addition_embed_type == "text_time":
        args["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, SDXL_POOLED_DIM, dtype=dtype),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=dtype),
        }
    return args


def cast_inputs(args: dict, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in args.items():
        if isinstance(v, dict):
            out[k] = cast_inputs(v, dtype)
        elif isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
            out[k] = v.to(dtype)
        else:
            out[k] = v
    return out


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP convention)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def write_tokenizer(path: Path, vocab_size: int = 1000):
    """Write a small byte-level BPE CLIP tokenizer (vocab.json + merges.txt) and load it (max length 77)."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    # base: the 256 byte-level unicode symbols, with and without the end-of-word marker
    chars = _byte_symbols()
    tokens = ["</w>", *chars, *(c + "</w>" for c in chars)]
    merges = []
    pairs = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n</w>")]
    for a, b in pairs:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = tokens[: vocab_size - len(specials)] + specials
    tokens = list(dict.fromkeys(tokens))  # unique, in order
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)


def sd_pipeline(tmp_path: Path):
    """A complete StableDiffusionPipeline, offline: tiny SD1-architecture U-Net, VAE, CLIP text encoder,
    a generated tokenizer (model_max_length 77), DDIM scheduler, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = write_tokenizer(tmp_path / "tokenizer")
    text = clip_text(hidden=64, layers=2, heads=2, vocab=max(tok.get_vocab().values()) + 1)
    u = unet(
        dict(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=4,
            norm_num_groups=16,
        )
    )
    v = vae(dict(VAE, block_out_channels=(16, 32, 32, 32), norm_num_groups=16))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=v,
        text_encoder=text,
        tokenizer=tok,
        unet=u,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# SD 1.x-like with reduced widths: 2 heads on 80/160/320 channels -> the SD1 head dims 40/80/160, conv proj_in/out.
SD1_SMALL_UNET = dict(
    sample_size=32,
    block_out_channels=(80, 160, 320, 320),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=768,
    attention_head_dim=2,
    norm_num_groups=16,
)


# Smallest SD1-like U-Net with every U-Net block type (compile and bookkeeping tests).
TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
