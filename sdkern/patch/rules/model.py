"""Model-wide rules, offered only the root of each patched tree: ``dtype`` (``PatchConfig.dtype``) and
``channels_last`` (convolution weights to NHWC)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from sdkern.patch.rule import Rule, Site, Undo, undo_all

logger = logging.getLogger("sdkern")

__all__ = ["RULES_DTYPE", "RULES_LAYOUT"]


def _wants_dtype(site: Site) -> bool:
    return site.ctx.cfg.dtype is not None and next(site.module.parameters(), None) is not None


def _dtype(site: Site) -> Undo:
    from sdkern.patch import dtype as dtype_conversion

    ctx, undos = site.ctx, []
    n = dtype_conversion.convert(site.module, ctx.cfg.dtype, undos)
    if n:
        note = ""
        if ctx.device_type == "cpu" and ctx.cfg.dtype == torch.bfloat16:
            from sdkern.patch.cpu_engine import dtype_problem

            why = dtype_problem(torch.bfloat16)
            if why is not None:  # honoured, but it buys nothing here: say so
                note = " (no gain on this CPU: it has no bf16 primitives, convolutions and GEMMs compute in fp32)"
                logger.warning("PatchConfig(dtype=torch.bfloat16): %s; float32 is as fast and more accurate", why)
        site.done(f"{n} tensors {ctx.dtype} -> {ctx.cfg.dtype}{note}")
    ctx.dtype = ctx.cfg.dtype  # the later rules see the run dtype
    return undo_all(undos)


def _wants_channels_last(site: Site) -> bool:
    ctx = site.ctx
    return (
        ctx.cfg.use_channels_last(ctx.device_type, ctx.dtype)
        and not ctx.engine  # the engine holds its weights in oneDNN's own layout
        and any(isinstance(m, nn.Conv2d) for m in site.module.modules())
    )


def _channels_last(site: Site) -> Undo:
    converted: list[nn.Parameter] = []
    with torch.no_grad():
        for m in site.module.modules():
            if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
                w = m.weight
                if w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last):
                    w.data = w.data.contiguous(memory_format=torch.channels_last)
                    converted.append(w)
    site.done(f"{len(converted)} Conv2d weights to NHWC")

    def restore() -> None:
        with torch.no_grad():
            for w in converted:
                w.data = w.data.contiguous()

    return restore


RULES_DTYPE = (Rule("dtype", _wants_dtype, _dtype),)
RULES_LAYOUT = (Rule("channels_last", _wants_channels_last, _channels_last),)
