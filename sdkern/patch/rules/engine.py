"""CPU-engine rules (:mod:`sdkern.patch.cpu_engine`): every ``nn.Conv2d`` / ``nn.Linear`` onto prepacked oneDNN
primitives (or Winograd, :mod:`sdkern.patch.winograd`), and ``Transformer2DModel``'s output projection with the
residual in its epilogue. They run after the block rules, which decide the layouts (packed QKV) they see."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from sdkern.patch import cpu_engine, winograd
from sdkern.patch.modules import SdkernAttnProcessor, SdkernGEGLU, SdkernTransformer2DModel
from sdkern.patch.rule import Context, Rule, Site, Undo, undo_all

__all__ = ["DENSE_OUT", "RULES", "prepare"]

#: modules whose output leaves the model: the engine gives them back in eager's NCHW layout
DENSE_OUT = ("conv_out", "decoder.conv_out", "quant_conv", "encoder.conv_out")


def prepare(root: nn.Module, ctx: Context) -> str | None:
    """Before the engine phase: why the engine cannot run in this PyTorch (None: it can); note the packed QKVs."""
    why_not = cpu_engine.unavailable_reason()
    if why_not is not None:
        return why_not
    for m in root.modules():  # Linears whose weights are views of one packed QKV/KV weight: one GEMM, not three
        proc = getattr(m, "processor", None)
        if isinstance(proc, SdkernAttnProcessor) and getattr(m, "_sdkern_packed", None) is not None:
            ctx.packed_qkv.update(id(lin) for lin in proc._fused_linears(m))
        if type(m) is SdkernGEGLU:
            ctx.geglu_proj.add(id(m.proj))
    return None


def _winograd_applies(site: Site) -> bool:
    m = site.module
    return type(m) is nn.Conv2d and site.name not in DENSE_OUT and winograd.problem(m) is None


def _winograd(site: Site) -> Undo:
    m, undos = site.module, []
    winograd.rewrite(m, undos)  # type: ignore[arg-type]
    site.done(winograd.report_detail(m))
    return undo_all(undos)


def held_detail(dtype: torch.dtype) -> str:
    """The report's note for a weight of ``dtype`` the engine holds in another dtype ("" when it holds it as is)."""
    held = cpu_engine.compute_dtype(dtype)
    if held == dtype:
        return ""
    name, as_ = str(dtype).removeprefix("torch."), str(held).removeprefix("torch.")
    return f" (held and computed as {as_}: this CPU has no {name} primitives)"


def _conv(site: Site) -> Undo | None:
    m = site.module
    why = cpu_engine.conv_problem(m)
    if why is not None:
        return site.left(why)
    undos: list[Undo] = []
    held = held_detail(m.weight.dtype)
    cpu_engine.pack_conv2d(m, undos, dense_out=site.name in DENSE_OUT)  # type: ignore[arg-type]
    k = "x".join(map(str, m.kernel_size))
    site.done(f"{k} conv {m.in_channels}->{m.out_channels}: weight prepacked for oneDNN{held}")
    return undo_all(undos)


def _linear_applies(site: Site) -> bool:
    # a Linear of a packed QKV/KV runs as one GEMM inside the attention (reported there)
    return type(site.module) is nn.Linear and id(site.module) not in site.ctx.packed_qkv


def _linear(site: Site) -> Undo | None:
    m = site.module
    why = cpu_engine.linear_problem(m)
    if why is not None:
        return site.left(why)
    undos: list[Undo] = []
    # bf16 only: whole step 1.04-1.05x in bf16, 0.95-0.99x in fp32 (benchmarks/results/cpu_engine_session10.md)
    dt = m.weight.dtype
    geglu = id(m) in site.ctx.geglu_proj and dt == cpu_engine.compute_dtype(dt) == torch.bfloat16
    held = held_detail(m.weight.dtype)
    cpu_engine.pack_linear(m, undos, gated=geglu)  # type: ignore[arg-type]
    how = " as value and gate GEMMs (GELU and product in their epilogues)" if geglu else ""
    site.done(f"{m.in_features}->{m.out_features}: weight prepacked for oneDNN{how}{held}")
    return undo_all(undos)


def _transformer2d(site: Site) -> Undo:
    return site.swap(SdkernTransformer2DModel, "proj_out + residual in one primitive, NHWC kept (no .contiguous())")


RULES = (
    Rule("cpu_winograd", _winograd_applies, _winograd, flags=("winograd",), when_off="pass"),
    Rule("cpu_conv", nn.Conv2d, _conv),
    Rule("cpu_linear", _linear_applies, _linear),
    Rule(
        "transformer2d",
        lambda site: type(site.module) is Transformer2DModel and getattr(site.module, "is_input_continuous", False),
        _transformer2d,
    ),
)
