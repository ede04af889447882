"""The rule table of :func:`sdkern.patch`: :data:`PHASES`, run in order over each model's module tree.

==============  ==================================================================================================
phase           rules (first match wins; ``flags``: the PatchConfig switches that turn a rule on)
==============  ==================================================================================================
``dtype``       ``dtype`` (root; ``PatchConfig.dtype``)
``layout``      ``channels_last`` (root; ``PatchConfig.use_channels_last``, not with the CPU engine)
``blocks``      ``resnet`` [group_norm], ``conv_norm_out`` [group_norm] (:mod:`.unet`); ``attention`` [attention],
                ``geglu`` [geglu], ``transformer_block`` [skip_layer_norm, bias_add] (:mod:`.transformer`);
                ``temporal_resnet`` [group_norm], ``time_mix``, ``temporal_transformer_block`` [skip_layer_norm]
                (:mod:`.svd`); ``clip_layer`` [skip_layer_norm, bias_add], ``attention`` [attention] (:mod:`.clip`);
                ``unrecognised`` (reports diffusers/transformers blocks no rule takes)
``norms``       ``group_norm`` [group_norm], ``layer_norm`` [skip_layer_norm], then the non-affine norms (reported)
``cpu_engine``  (``PatchConfig.use_cpu_engine``) ``cpu_winograd`` [winograd], ``cpu_conv``, ``cpu_conv3d``,
                ``cpu_linear``, ``transformer2d`` (:mod:`.engine`, :mod:`.svd`)
==============  ==================================================================================================

Norms folded into a block's rewrite are not offered to later rules; the engine phase comes last because the block
rules decide what it sees (packed QKV weights run as one GEMM in the attention).
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention

from sdkern.patch.rule import Phase, Rule, Site
from sdkern.patch.rules import clip, engine, model, svd, transformer, unet

__all__ = ["PHASES", "rules"]


def _unrecognised_matches(site: Site) -> bool:
    t = type(site.module)
    return isinstance(site.module, Attention) or (
        t.__module__.startswith(("diffusers", "transformers"))
        and any(k in t.__name__ for k in ("Attention", "Resnet", "TransformerBlock"))
        and not t.__name__.endswith(("Model", "Block2D", "Blocks"))
    )


def _unrecognised(site: Site) -> None:
    site.left(f"{type(site.module).__name__} has no rewrite rule")


PHASES: tuple[Phase, ...] = (
    Phase("dtype", model.RULES_DTYPE, root_only=True),
    Phase("layout", model.RULES_LAYOUT, root_only=True),
    Phase(
        "blocks",
        unet.RULES_BLOCKS
        + transformer.RULES
        + svd.RULES
        + clip.RULES
        + (Rule("unrecognised", _unrecognised_matches, _unrecognised),),
    ),
    Phase("norms", unet.RULES_NORMS),
    Phase(
        "cpu_engine",
        engine.RULES[:2] + svd.RULES_ENGINE + engine.RULES[2:],
        applies=lambda ctx: ctx.engine,
        prepare=engine.prepare,
    ),
)


def rules() -> list[Rule]:
    """Every rule of :data:`PHASES`, in order."""
    return [r for phase in PHASES for r in phase.rules]
