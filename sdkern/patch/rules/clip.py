"""CLIP text-encoder rules (transformers): ``CLIPEncoderLayer`` and ``CLIPAttention``.

The modules are recognised by class name and module, so that transformers (and :mod:`sdkern.patch.clip`) is only
imported when a CLIP model is patched.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from sdkern.patch.rule import Rule, Site, Undo, affine_layer_norm

__all__ = ["RULES"]


def _is(name: str) -> Callable[[Site], bool]:
    def matches(site: Site) -> bool:
        t = type(site.module)
        return t.__name__ == name and t.__module__.startswith("transformers.models.clip")

    return matches


def _encoder_layer(site: Site) -> Undo | None:
    from sdkern.patch import clip

    m, cfg = site.module, site.ctx.cfg
    if not clip.forward_matches():
        return site.left("CLIPEncoderLayer.forward signature differs from the one supported")
    if not (affine_layer_norm(m.layer_norm2) and type(m.mlp.fc2) is nn.Linear):
        return site.left("layer_norm2 / mlp.fc2 not recognised")
    bias_add = cfg.bias_add and m.mlp.fc2.bias is not None
    undo = site.swap(clip.SdkernCLIPEncoderLayer, _sdkern_sln=cfg.skip_layer_norm, _sdkern_bias_add=bias_add)
    if cfg.skip_layer_norm:
        site.consume(m.layer_norm2)
    parts = ["residual+layer_norm2 -> skip_layer_norm"] if cfg.skip_layer_norm else []
    if bias_add:
        parts.append("fc2 bias + residual -> bias_add")
    site.done("; ".join(parts))
    return undo


def _attention(site: Site) -> Undo | None:
    from sdkern.patch import clip

    m, sdpa = site.module, site.ctx.attn_sdpa
    why = clip.attention_problem(m)  # type: ignore[arg-type]
    if why is not None:
        return site.left(why)
    undo = site.swap(clip.SdkernCLIPAttention, _sdkern_sdpa=sdpa)
    impl = ", torch SDPA (AMX bf16)" if sdpa else ""
    site.done(
        f"CLIP self-attention (causal when the model asks for it){impl}, separate q/k/v, "
        f"heads={m.num_heads} head_dim={m.head_dim}; a padding attention_mask runs transformers' attention"
    )
    return undo


RULES = (
    Rule("clip_layer", _is("CLIPEncoderLayer"), _encoder_layer, flags=("skip_layer_norm", "bias_add")),
    Rule("attention", _is("CLIPAttention"), _attention, flags=("attention",)),
)
