"""Stable Video Diffusion rules: the temporal blocks of ``UNetSpatioTemporalConditionModel`` and of
``AutoencoderKLTemporalDecoder`` (modules in :mod:`sdkern.patch.svd`, which describes each fusion), and the CPU
engine's temporal (k, 1, 1) ``Conv3d``. Their ``conv_norm_out`` goes through the U-Net rule."""

from __future__ import annotations

from diffusers.models.attention import FeedForward, TemporalBasicTransformerBlock
from diffusers.models.resnet import AlphaBlender, SpatioTemporalResBlock, TemporalResnetBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from torch import nn

from sdkern.patch import svd
from sdkern.patch.cpu_engine_modules import _swap_weight, compute_dtype
from sdkern.patch.rule import Rule, Site, Undo, affine_group_norm, affine_layer_norm, undo_all
from sdkern.patch.rules.engine import held_detail

__all__ = ["RULES", "RULES_ENGINE"]


def _temporal_resnet_problem(m: TemporalResnetBlock) -> str | None:
    if type(m.nonlinearity) is not nn.SiLU:
        return f"non-linearity {type(m.nonlinearity).__name__} (only SiLU is fused)"
    if not (affine_group_norm(m.norm1) and affine_group_norm(m.norm2)):
        return "norm1/norm2 are not affine nn.GroupNorm"
    return None


def _temporal_block_problem(m: TemporalBasicTransformerBlock) -> str | None:
    norms = [m.norm_in, m.norm1, m.norm3] + ([m.norm2] if m.attn2 is not None else [])
    if not all(affine_layer_norm(n) for n in norms):
        return "norms are not affine nn.LayerNorm"
    if type(m.ff) is not FeedForward or type(m.ff_in) is not FeedForward:
        return "feed-forwards not recognised"
    return None


def _temporal_resnet(site: Site) -> Undo | None:
    m = site.module
    detail = "norm1+SiLU, norm2+SiLU over (frames x H x W) -> group_norm(silu)"
    why = _temporal_resnet_problem(m)  # type: ignore[arg-type]
    return site.swap_unless(why, svd.SdkernTemporalResnetBlock, detail, consume=(m.norm1, m.norm2))


def _temporal_block(site: Site) -> Undo | None:
    m = site.module
    detail = (
        "frame-major transpose + frame embedding in one pass; ff_in/attn residuals + norm1/2/3 -> "
        "skip_layer_norm; ff out bias + residual -> bias_add; attention over frames (attention rule)"
    )
    why = _temporal_block_problem(m)  # type: ignore[arg-type]
    return site.swap_unless(why, svd.SdkernTemporalBasicTransformerBlock, detail, consume=(m.norm1, m.norm2, m.norm3))


_TIME_MIX = {  # module type -> (patched class, what the rewrite fuses)
    SpatioTemporalResBlock: (
        svd.SdkernSpatioTemporalResBlock,
        "AlphaBlender blend + temporal residual -> one addcmul (x + (1-a) * branch)",
    ),
    TransformerSpatioTemporalModel: (
        svd.SdkernTransformerSpatioTemporalModel,
        "AlphaBlender blend + back-transpose of the temporal tokens -> one lerp",
    ),
}


def _time_mix(site: Site) -> Undo | None:
    mixer = site.module.time_mixer
    why = None if type(mixer) is AlphaBlender else f"time mixer {type(mixer).__name__} not recognised"
    return site.swap_unless(why, *_TIME_MIX[type(site.module)])


def _conv3d(site: Site) -> Undo | None:
    """A temporal (k, 1, 1) Conv3d as a prepacked (k, 1) Conv2d on the (B, C, F, H*W) view."""
    m, name = site.module, site.name
    why = svd.conv3d_problem(m)
    if why is not None:
        return site.left(why)
    undos: list[Undo] = []
    held = held_detail(m.weight.dtype)
    w = m.weight.detach().to(compute_dtype(m.weight.dtype)).contiguous()  # fp32 where the CPU has no bf16 primitives
    packed = svd.SdkernTemporalConv3d._sdkern_repack(m, w)  # type: ignore[arg-type]
    _swap_weight(m, packed, undos, svd.SdkernTemporalConv3d)
    if name.endswith("time_conv_out"):  # the temporal decoder's last op: eager's contiguous layout out
        m.__dict__["_sdkern_dense_out"] = True
    k = "x".join(map(str, m.kernel_size))
    site.done(
        f"{k} temporal conv {m.in_channels}->{m.out_channels}: a ({m.kernel_size[0]},1) Conv2d on (B, C, F, H*W), "
        f"weight prepacked for oneDNN{held}"
    )
    return undo_all(undos)


RULES = (
    Rule("temporal_resnet", TemporalResnetBlock, _temporal_resnet, flags=("group_norm",)),
    Rule("temporal_transformer_block", TemporalBasicTransformerBlock, _temporal_block, flags=("skip_layer_norm",)),
    Rule("time_mix", tuple(_TIME_MIX), _time_mix),
)
RULES_ENGINE = (Rule("cpu_conv3d", nn.Conv3d, _conv3d),)
