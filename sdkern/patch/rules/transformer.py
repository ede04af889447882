"""Attention / transformer rules: diffusers ``Attention`` (U-Net transformer blocks, the VAE mid-block, SVD's
attention over frames), ``GEGLU`` and ``BasicTransformerBlock``."""

from __future__ import annotations

from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from sdkern.patch.modules import SdkernAttnProcessor, SdkernBasicTransformerBlock, SdkernGEGLU
from sdkern.patch.rule import Rule, Site, Undo, affine_group_norm, affine_layer_norm

__all__ = ["RULES"]


def _attention_problem(m: Attention) -> str | None:
    proc = m.processor
    if type(proc) not in (AttnProcessor2_0, AttnProcessor):
        return f"processor {type(proc).__name__} not recognised (only AttnProcessor2_0 / AttnProcessor)"
    if m.spatial_norm is not None or m.norm_q is not None or m.norm_k is not None:
        return "spatial_norm / q-k norms are not supported"
    if m.added_kv_proj_dim is not None or getattr(m, "fused_projections", False):
        return "added KV projections or diffusers-fused projections"
    if m.is_causal:
        return "causal diffusers Attention (not wired to sdkern::attention(causal); CLIP's is, in sdkern/patch/clip.py)"
    if m.to_out is None or not all(type(x) is nn.Linear for x in (m.to_q, m.to_k, m.to_v, m.to_out[0])):
        return "projections are not plain nn.Linear"
    if m.to_k.out_features != m.to_q.out_features or m.to_q.out_features % m.heads:
        return "q and k/v widths differ (kv heads) or do not split into heads"
    if m.group_norm is not None and not affine_group_norm(m.group_norm):
        return "group_norm is not an affine nn.GroupNorm"
    return None


def _attention(site: Site) -> Undo | None:
    m, ctx = site.module, site.ctx
    why = _attention_problem(m)  # type: ignore[arg-type]
    if why is not None:
        return site.left(why)
    orig = m.processor
    scale = None if type(orig) is AttnProcessor2_0 else float(m.scale)
    qkv_fusion, sdpa = ctx.qkv_fusion, ctx.diffusers_attn_sdpa
    proc = SdkernAttnProcessor(orig, ctx.backend, qkv_fusion, scale, sdpa=sdpa is not None)
    if qkv_fusion:
        proc.fuse(m)
    m.set_processor(proc)

    def restore() -> None:
        m.set_processor(orig)
        proc.unfuse(m)

    kind = "cross" if m.is_cross_attention else "self"
    packed = ("packed KV" if m.is_cross_attention else "packed QKV") if qkv_fusion else "separate q/k/v"
    head_dim = m.to_q.out_features // m.heads
    impl = f", torch SDPA ({sdpa})" if sdpa else ""
    site.done(f"{kind}-attention, {packed}{impl}, heads={m.heads} head_dim={head_dim}")
    return restore


def _geglu(site: Site) -> Undo | None:
    proj = site.module.proj
    why = "proj is not an nn.Linear with bias" if type(proj) is not nn.Linear or proj.bias is None else None
    return site.swap_unless(why, SdkernGEGLU, "Linear without bias + bias_split_gelu")


def _block_problem(m: BasicTransformerBlock) -> str | None:
    if m.norm_type != "layer_norm":
        return f"norm_type={m.norm_type!r} (only 'layer_norm' is fused)"
    if m.pos_embed is not None or m.attn2 is None or hasattr(m, "fuser"):
        return "positional embedding, no cross-attention or GLIGEN fuser"
    if not (affine_layer_norm(m.norm2) and affine_layer_norm(m.norm3)):
        return "norm2/norm3 are not affine nn.LayerNorm"
    if type(m.ff) is not FeedForward:
        return f"feed-forward {type(m.ff).__name__} not recognised"
    return None


def _transformer_block(site: Site) -> Undo | None:
    m, cfg = site.module, site.ctx.cfg
    why = _block_problem(m) or site.disabled()  # type: ignore[arg-type]
    if why is not None:
        return site.left(why)
    last = m.ff.net[-1]
    bias_add = cfg.bias_add and type(last) is nn.Linear and last.bias is not None
    undo = site.swap(SdkernBasicTransformerBlock, _sdkern_sln=cfg.skip_layer_norm, _sdkern_bias_add=bias_add)
    parts = []
    if cfg.skip_layer_norm:
        site.consume(m.norm2, m.norm3)
        parts.append("residual+norm2, residual+norm3 -> skip_layer_norm")
    if bias_add:
        parts.append("ff out bias + residual -> bias_add")
    elif cfg.bias_add:
        site.left("feed-forward does not end in a Linear with bias", at="ff", rule="bias_add")
    site.done("; ".join(parts))
    return undo


RULES = (
    Rule("attention", Attention, _attention, flags=("attention",)),
    Rule("geglu", GEGLU, _geglu, flags=("geglu",)),
    # structural problems are reported before the switches (when_off="rule")
    Rule("transformer_block", BasicTransformerBlock, _transformer_block, ("skip_layer_norm", "bias_add"), "rule"),
)
