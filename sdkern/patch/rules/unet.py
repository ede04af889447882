"""U-Net / VAE rules: ResNet blocks, the closing GroupNorm + SiLU, and the norms no block rule took.

The VAE has no rules of its own: its encoder and decoder are ResnetBlock2D, Attention (the mid-block, see
:mod:`sdkern.patch.rules.transformer`) and ``conv_norm_out`` like the U-Net's.
"""

from __future__ import annotations

from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import TemporalDecoder
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel
from torch import nn

from sdkern.patch.modules import SdkernGroupNorm, SdkernGroupNormSiLU, SdkernLayerNorm, SdkernResnetBlock2D
from sdkern.patch.rule import Rule, Site, Undo, affine_group_norm, affine_layer_norm, undo_all

__all__ = ["RULES_BLOCKS", "RULES_NORMS"]


def _resnet_problem(m: ResnetBlock2D) -> str | None:
    if m.time_embedding_norm != "default" and (m.time_emb_proj is not None or m.time_embedding_norm == "scale_shift"):
        # without a time embedding projection, the other modes compute norm2 + SiLU like "default"
        return f"time_embedding_norm={m.time_embedding_norm!r} with a time embedding (only 'default' is fused)"
    if type(m.nonlinearity) is not nn.SiLU:
        return f"non-linearity {type(m.nonlinearity).__name__} (only SiLU is fused)"
    if not (affine_group_norm(m.norm1) and affine_group_norm(m.norm2)):
        return "norm1/norm2 are not affine nn.GroupNorm"
    return None


def _resnet(site: Site) -> Undo | None:
    m = site.module
    detail = "norm1+SiLU -> group_norm(silu); h+temb+norm2+SiLU -> skip_group_norm"
    return site.swap_unless(_resnet_problem(m), SdkernResnetBlock2D, detail, consume=(m.norm1, m.norm2))  # type: ignore[arg-type]


def _conv_norm_out(site: Site) -> Undo | None:
    m = site.module
    norm, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
    if not (affine_group_norm(norm) and type(act) is nn.SiLU):
        if norm is not None:
            site.left("not an affine GroupNorm followed by SiLU", at="conv_norm_out")
        return None
    undo_norm = site.swap(SdkernGroupNormSiLU, module=norm)
    m.conv_act = nn.Identity()

    def restore_act() -> None:
        m.conv_act = act

    site.consume(norm)
    site.done("conv_norm_out + SiLU -> group_norm(silu)", at="conv_norm_out")
    return undo_all((undo_norm, restore_act))


def _group_norm(site: Site) -> Undo:
    return site.swap(SdkernGroupNorm, "GroupNorm -> group_norm")


def _layer_norm(site: Site) -> Undo:
    return site.swap(SdkernLayerNorm, "LayerNorm -> skip_layer_norm(skip=None)")


def _plain_group_norm(site: Site) -> None:
    site.left("GroupNorm without affine parameters")


def _plain_layer_norm(site: Site) -> None:
    site.left("LayerNorm without an affine weight or over more than the last dim")


RULES_BLOCKS = (
    Rule("resnet", ResnetBlock2D, _resnet, flags=("group_norm",)),
    Rule(
        "conv_norm_out",  # the GroupNorm + SiLU closing SD/SVD U-Nets, VAE encoders and decoders
        (UNet2DConditionModel, Encoder, Decoder, UNetSpatioTemporalConditionModel, TemporalDecoder),
        _conv_norm_out,
        flags=("group_norm",),
    ),
)

# standalone norms (Transformer2DModel.norm, the attention's group_norm, CLIP's layer_norm1, ...); the last two
# rules only report the norms no fused op takes
RULES_NORMS = (
    Rule("group_norm", lambda site: affine_group_norm(site.module), _group_norm, flags=("group_norm",)),
    Rule("layer_norm", lambda site: affine_layer_norm(site.module), _layer_norm, flags=("skip_layer_norm",)),
    Rule("group_norm", lambda site: isinstance(site.module, nn.GroupNorm), _plain_group_norm),
    Rule("layer_norm", lambda site: isinstance(site.module, nn.LayerNorm), _plain_layer_norm),
)
