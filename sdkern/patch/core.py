"""patch / unpatch / patch_report: rewrite diffusers pipelines onto the sdkern fused ops, reversibly.

:func:`patch` walks each model's module tree through the phases of the rule table (:data:`sdkern.patch.rules.PHASES`):
in each phase every module goes to the first rule that matches it, which rewrites it (and returns its undo) or
reports why not. :func:`unpatch` runs the undos last first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sdkern.patch import cpu_engine_modules, preference
from sdkern.patch.config import PatchConfig
from sdkern.patch.report import PatchReport, ReportEntry
from sdkern.patch.rule import Context, Site
from sdkern.patch.rules import PHASES

__all__ = ["PatchReport", "ReportEntry", "patch", "patch_report", "unpatch"]

logger = logging.getLogger("sdkern")

_STATE = "_sdkern_patch_state"


@dataclass
class _State:
    config: PatchConfig
    report: PatchReport
    undo: list[Callable[[], None]] = field(default_factory=list)
    components: list[Any] = field(default_factory=list)
    runtime_undo: list[Callable[[], None]] = field(default_factory=list)  # graphs, DeepCache: undone first
    preference: preference.Scope | None = None  # the model's CUDA implementation preference (patch/preference.py)


def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch; absent: assume no AMX
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def _patch_module(root: nn.Module, cfg: PatchConfig, prefix: str) -> _State:
    """Run the rule table over ``root``'s module tree; the state holds the report and the undos."""
    state = _State(cfg, PatchReport(cfg))
    param = next(root.parameters(), None)
    ctx = Context(
        cfg,
        prefix,
        state.report,
        device_type=param.device.type if param is not None else "cpu",
        dtype=param.dtype if param is not None else torch.float32,
        amx=lambda: _cpu_has_amx(),  # looked up at call time (tests replace it)
        avx512=lambda: cpu_engine_modules.cpu_has_avx512(),  # (tests replace it)
    )
    if cfg.backend == "cpu" and ctx.device_type != "cpu":
        logger.warning(
            "sdkern.patch: backend='cpu' on a %s model: the ops pick the implementation for the tensors' device "
            "(as with 'auto'); move the model to the CPU to run the CPU kernels",
            ctx.device_type,
        )
    for phase in PHASES:
        if not phase.applies(ctx):
            continue
        if phase.prepare is not None:
            why_not = phase.prepare(root, ctx)
            if why_not is not None:
                ctx.add(False, "", root, phase.name, why_not)
                continue
        named = [("", root)] if phase.root_only else list(root.named_modules())
        for name, m in named:
            if id(m) in ctx.consumed:
                continue
            site = Site(ctx, name, m, root=phase.root_only)
            rule = next((r for r in phase.rules if r.claims(site)), None)
            if rule is None:
                continue
            site.rule = rule
            if rule.when_off == "report" and not rule.enabled(cfg):
                site.left(rule.disabled_reason())
                continue
            undo = rule.rewrite(site)
            if undo is not None:
                state.undo.append(undo)
    return state


def _deepcache_config(value: Any) -> Any:
    """Validate PatchConfig.deepcache: None, a DeepCacheConfig, or a dict of its fields."""
    if value is None:
        return None
    from sdkern.deepcache import DeepCacheConfig

    if isinstance(value, DeepCacheConfig):
        return value
    if isinstance(value, dict):
        return DeepCacheConfig(**value)
    raise TypeError(
        f"PatchConfig.deepcache must be a sdkern.DeepCacheConfig, a dict or None, got {type(value).__name__}"
    )


def _enable_runtime_features(obj: Any, cfg: PatchConfig, deepcache_cfg: Any, state: _State) -> None:
    """DeepCache on the U-Net, then graph capture (CUDA graphs replay; eager elsewhere)."""
    if deepcache_cfg is not None:
        from sdkern import deepcache

        deepcache.enable(obj, deepcache_cfg)
        state.runtime_undo.append(lambda: deepcache.disable(obj))
    if cfg.cuda_graphs:
        from sdkern.runtime import graphs

        targets: list[tuple[nn.Module, str]] = []
        if isinstance(obj, nn.Module):
            targets.append((obj, "forward"))
        else:
            if getattr(obj, "unet", None) is not None:
                targets.append((obj.unet, "forward"))
            if getattr(obj, "vae", None) is not None:
                targets.append((obj.vae, "decode"))
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(obj, name, None) is not None:
                    targets.append((getattr(obj, name), "forward"))
        for module, method in targets:
            graphs.enable(module, method)
            state.runtime_undo.append(lambda m=module, me=method: graphs.disable(m, me))
        if not any(p.is_cuda for m, _ in targets for p in m.parameters()):
            logger.info("sdkern.patch: cuda_graphs=True on a non-CUDA model: the graph runners run eagerly")


def _is_pipeline(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


# ---------------------------------------------------------------------------------------------
def patch(obj: Any, config: PatchConfig | None = None, *, report: bool = False, **overrides: Any) -> Any:
    """Rewrite a diffusers pipeline or model in place onto the sdkern fused ops.

    Parameters
    ----------
    obj : DiffusionPipeline or nn.Module
        A pipeline (every ``nn.Module`` component is patched: U-Net, VAE, text encoders) or a module
        (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTextModelWithProjection``,
        or any module containing diffusers blocks).
    config : PatchConfig, optional
        Defaults to ``PatchConfig()``.
    report : bool
        Return the :class:`PatchReport` instead of ``obj``.
    **overrides
        PatchConfig fields overriding ``config`` (e.g. ``backend="reference"``).

    Returns
    -------
    obj, or PatchReport when ``report=True``.

    Notes
    -----
    Patching an already patched object is a no-op (its existing report is returned with
    ``report=True``). :func:`unpatch` undoes everything exactly.
    """
    cfg = config if config is not None else PatchConfig()
    if overrides:
        cfg = cfg.replace(**overrides)
    deepcache_cfg = _deepcache_config(cfg.deepcache)
    if deepcache_cfg is not None and not any(
        c.__name__ in ("UNet2DConditionModel", "UNetSpatioTemporalConditionModel")
        for c in type(getattr(obj, "unet", obj)).__mro__
    ):
        raise TypeError(
            "PatchConfig.deepcache needs a pipeline with a UNet2DConditionModel (or SVD's "
            "UNetSpatioTemporalConditionModel), or that U-Net"
        )

    existing = getattr(obj, _STATE, None)
    if existing is not None:
        logger.info("sdkern.patch: %s is already patched; nothing to do", type(obj).__name__)
        return existing.report if report else obj

    if isinstance(obj, nn.Module):
        state = _patch_module(obj, cfg, "")
    elif _is_pipeline(obj):
        state = _State(cfg, PatchReport(cfg))
        for cname, comp in obj.components.items():
            if not isinstance(comp, nn.Module):
                continue
            if getattr(comp, _STATE, None) is not None:
                state.report.extend(getattr(comp, _STATE).report)
                continue
            sub = _patch_module(comp, cfg, cname)
            object.__setattr__(comp, _STATE, sub)
            state.components.append(comp)
            state.report.extend(sub.report)
    else:
        raise TypeError(f"sdkern.patch expects a diffusers DiffusionPipeline or a torch nn.Module, got {type(obj)}")

    # backend="triton"/"cuda": the preference of these modules' own calls (removed by unpatch)
    state.preference = preference.scope([obj] if isinstance(obj, nn.Module) else state.components, cfg.backend)
    object.__setattr__(obj, _STATE, state)
    _enable_runtime_features(obj, cfg, deepcache_cfg, state)
    logger.info("sdkern.patch: %s", str(state.report).replace("\n", "; "))
    return state.report if report else obj


def unpatch(obj: Any) -> Any:
    """Undo :func:`patch` exactly: original classes, processors, parameters (values and memory format).

    Parameters
    ----------
    obj : DiffusionPipeline or nn.Module
        An object patched by :func:`sdkern.patch` (anything else is returned unchanged).

    Returns
    -------
    obj
    """
    state: _State | None = getattr(obj, _STATE, None)
    if state is None:
        return obj
    for fn in reversed(state.runtime_undo):
        fn()
    for comp in reversed(state.components):
        unpatch(comp)
    for fn in reversed(state.undo):
        fn()
    if state.preference is not None:
        state.preference.remove()
    object.__delattr__(obj, _STATE)
    return obj


def patch_report(obj: Any) -> PatchReport | None:
    """The :class:`PatchReport` of a patched object, or None when it is not patched."""
    state: _State | None = getattr(obj, _STATE, None)
    return None if state is None else state.report
