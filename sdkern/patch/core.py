"""patch / unpatch / patch_report: rewrite diffusers pipelines onto the sdkern fused ops, reversibly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import TemporalDecoder
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel
from torch import nn

from sdkern.patch import cpu_engine, winograd
from sdkern.patch import svd as svd_rules
from sdkern.patch.config import PatchConfig
from sdkern.patch.modules import (
    SdkernAttnProcessor,
    SdkernBasicTransformerBlock,
    SdkernGEGLU,
    SdkernGroupNorm,
    SdkernGroupNormSiLU,
    SdkernLayerNorm,
    SdkernResnetBlock2D,
    SdkernTransformer2DModel,
)

__all__ = ["PatchReport", "ReportEntry", "patch", "patch_report", "unpatch"]

logger = logging.getLogger("sdkern")

_STATE = "_sdkern_patch_state"


@dataclass
class ReportEntry:
    """One module the patcher looked at.

    Attributes
    ----------
    name : str
        Qualified module name (pipeline component first, e.g. ``"unet.down_blocks.0.resnets.1"``).
    module : str
        The module's class name before patching.
    rule : str
        The rewrite rule (``"resnet"``, ``"attention"``, ``"geglu"``, ``"transformer_block"``,
        ``"conv_norm_out"``, ``"group_norm"``, ``"layer_norm"``, ``"clip_layer"``, ``"channels_last"``) or, for modules
        left alone, the kind of module (``"attention"``, ``"layer_norm"``, ...).
    detail : str
        What was fused, or why the module was left as it is.
    """

    name: str
    module: str
    rule: str
    detail: str


@dataclass
class PatchReport:
    """What :func:`sdkern.patch` changed and what it left alone.

    Attributes
    ----------
    config : PatchConfig
        The configuration used.
    rewritten : list of ReportEntry
        Modules rewritten onto fused ops, each with its rule and what it fuses.
    left : list of ReportEntry
        Modules of interest that stay as they are, each with the reason.
    """

    config: PatchConfig
    rewritten: list[ReportEntry] = field(default_factory=list)
    left: list[ReportEntry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of rewritten modules per rule."""
        out: dict[str, int] = {}
        for e in self.rewritten:
            out[e.rule] = out.get(e.rule, 0) + 1
        return out

    def extend(self, other: PatchReport) -> None:
        """Append another report's entries (used for pipelines)."""
        self.rewritten.extend(other.rewritten)
        self.left.extend(other.left)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "backend": self.config.backend,
            "counts": self.counts(),
            "rewritten": [vars(e) for e in self.rewritten],
            "left": [vars(e) for e in self.left],
        }

    def __str__(self) -> str:
        lines = [f"sdkern.patch report (backend={self.config.backend})"]
        lines.append("rewritten: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items())))
        reasons: dict[tuple[str, str], int] = {}
        for e in self.left:
            reasons[(e.module, e.detail)] = reasons.get((e.module, e.detail), 0) + 1
        lines.append(f"left alone: {len(self.left)}")
        lines.extend(f"  {n} x {mod}: {why}" for (mod, why), n in sorted(reasons.items()))
        return "\n".join(lines)


@dataclass
class _State:
    config: PatchConfig
    report: PatchReport
    undo: list[Callable[[], None]] = field(default_factory=list)
    components: list[Any] = field(default_factory=list)
    runtime_undo: list[Callable[[], None]] = field(default_factory=list)  # graphs, DeepCache: undone first


# ---------------------------------------------------------------------------------------------
def _swap_class(m: nn.Module, cls: type, backend: str, undo: list[Callable[[], None]], **attrs: Any) -> None:
    orig = type(m)
    m.__class__ = cls
    m.__dict__["_sdkern_backend"] = backend
    for k, v in attrs.items():
        m.__dict__[k] = v

    def restore() -> None:
        m.__class__ = orig
        for k in ("_sdkern_backend", *attrs):
            m.__dict__.pop(k, None)

    undo.append(restore)


def _affine_group_norm(m: Any) -> bool:
    return type(m) is nn.GroupNorm and m.affine


def _affine_layer_norm(m: Any) -> bool:
    return type(m) is nn.LayerNorm and m.elementwise_affine and m.weight is not None and len(m.normalized_shape) == 1


def _channels_last(root: nn.Module, undo: list[Callable[[], None]]) -> int:
    converted: list[nn.Parameter] = []
    with torch.no_grad():
        for m in root.modules():
            if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
                w = m.weight
                if w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last):
                    w.data = w.data.contiguous(memory_format=torch.channels_last)
                    converted.append(w)

    def restore() -> None:
        with torch.no_grad():
            for w in converted:
                w.data = w.data.contiguous()

    undo.append(restore)
    return len(converted)


def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch; absent: assume no AMX
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def _resnet_problem(m: ResnetBlock2D) -> str | None:
    if m.time_embedding_norm != "default" and (m.time_emb_proj is not None or m.time_embedding_norm == "scale_shift"):
        # without a time embedding projection, the other modes compute norm2 + SiLU like "default"
        return f"time_embedding_norm={m.time_embedding_norm!r} with a time embedding (only 'default' is fused)"
    if type(m.nonlinearity) is not nn.SiLU:
        return f"non-linearity {type(m.nonlinearity).__name__} (only SiLU is fused)"
    if not (_affine_group_norm(m.norm1) and _affine_group_norm(m.norm2)):
        return "norm1/norm2 are not affine nn.GroupNorm"
    return None


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
    if m.group_norm is not None and not _affine_group_norm(m.group_norm):
        return "group_norm is not an affine nn.GroupNorm"
    return None


def _block_problem(m: BasicTransformerBlock) -> str | None:
    if m.norm_type != "layer_norm":
        return f"norm_type={m.norm_type!r} (only 'layer_norm' is fused)"
    if m.pos_embed is not None or m.attn2 is None or hasattr(m, "fuser"):
        return "positional embedding, no cross-attention or GLIGEN fuser"
    if not (_affine_layer_norm(m.norm2) and _affine_layer_norm(m.norm3)):
        return "norm2/norm3 are not affine nn.LayerNorm"
    if type(m.ff) is not FeedForward:
        return f"feed-forward {type(m.ff).__name__} not recognised"
    return None


def _patch_module(root: nn.Module, cfg: PatchConfig, prefix: str) -> _State:
    report = PatchReport(cfg)
    state = _State(cfg, report)
    undo = state.undo
    backend = cfg.backend

    def qual(name: str) -> str:
        return ".".join(p for p in (prefix, name) if p)

    def done(name: str, m: nn.Module, rule: str, detail: str) -> None:
        report.rewritten.append(ReportEntry(qual(name), type(m).__name__, rule, detail))

    def left(name: str, m: nn.Module, rule: str, detail: str) -> None:
        report.left.append(ReportEntry(qual(name), type(m).__name__, rule, detail))

    param = next(root.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"
    dtype = param.dtype if param is not None else torch.float32
    if cfg.dtype is not None and param is not None:
        from sdkern.patch import dtype as dtype_conversion

        n = dtype_conversion.convert(root, cfg.dtype, undo)
        if n:
            report.rewritten.append(
                ReportEntry(prefix or "<root>", type(root).__name__, "dtype", f"{n} tensors {dtype} -> {cfg.dtype}")
            )
        dtype = cfg.dtype
    if (
        cfg.use_channels_last(device_type, dtype)
        and not cfg.use_cpu_engine(device_type, dtype)  # the engine holds its weights in oneDNN's own layout
        and any(isinstance(m, nn.Conv2d) for m in root.modules())
    ):
        n = _channels_last(root, undo)
        report.rewritten.append(
            ReportEntry(prefix or "<root>", type(root).__name__, "channels_last", f"{n} Conv2d weights to NHWC")
        )

    # bf16 attention on CPUs with AMX: PyTorch's flash attention runs its GEMMs on AMX tiles and is
    # 2.5-3x faster than sdkern::attention's AVX-512-BF16 kernel on SD self-attention (benchmarks/results/
    # cpu_engine_session6.md), so the patched processor calls it there (projections stay packed/fused).
    attn_sdpa = cfg.use_cpu_engine(device_type, dtype) and dtype == torch.bfloat16 and _cpu_has_amx()
    # bf16 on the CPU engine: q/k/v stay separate Linears, each prepacked by the engine. A fused QKV weight
    # would run as a dense F.linear that reorders its weight on every call (oneDNN bf16): three prepacked
    # GEMMs were 1.2-1.7x faster on SD shapes (1-thread probe, session 7). fp32 goes through MKL either way
    # (equal times), so there the packed QKV stays.
    qkv_fusion = cfg.qkv_fusion and not (cfg.use_cpu_engine(device_type, dtype) and dtype == torch.bfloat16)
    consumed: set[int] = set()  # GroupNorm / LayerNorm modules folded into a fused rewrite
    clip = None
    for name, m in list(root.named_modules()):
        t = type(m)
        if t is ResnetBlock2D:
            why = "group_norm fusion disabled" if not cfg.group_norm else _resnet_problem(m)
            if why is None:
                _swap_class(m, SdkernResnetBlock2D, backend, undo)
                consumed.update((id(m.norm1), id(m.norm2)))
                done(name, m, "resnet", "norm1+SiLU -> group_norm(silu); h+temb+norm2+SiLU -> skip_group_norm")
            else:
                left(name, m, "resnet", why)
        elif t is Attention:
            why = "attention fusion disabled" if not cfg.attention else _attention_problem(m)
            if why is None:
                orig = m.processor
                scale = None if type(orig) is AttnProcessor2_0 else float(m.scale)
                proc = SdkernAttnProcessor(orig, backend, qkv_fusion, scale, sdpa=attn_sdpa)
                if qkv_fusion:
                    proc.fuse(m)
                m.set_processor(proc)

                def restore_attn(m: Attention = m, proc: SdkernAttnProcessor = proc, orig: Any = orig) -> None:
                    m.set_processor(orig)
                    proc.unfuse(m)

                undo.append(restore_attn)
                kind = "cross" if m.is_cross_attention else "self"
                packed = ("packed KV" if m.is_cross_attention else "packed QKV") if qkv_fusion else "separate q/k/v"
                head_dim = m.to_q.out_features // m.heads
                impl = ", torch SDPA (AMX bf16)" if attn_sdpa else ""
                done(name, m, "attention", f"{kind}-attention, {packed}{impl}, heads={m.heads} head_dim={head_dim}")
            else:
                left(name, m, "attention", why)
        elif t is GEGLU:
            if not cfg.geglu:
                left(name, m, "geglu", "geglu fusion disabled")
            elif type(m.proj) is not nn.Linear or m.proj.bias is None:
                left(name, m, "geglu", "proj is not an nn.Linear with bias")
            else:
                _swap_class(m, SdkernGEGLU, backend, undo)
                done(name, m, "geglu", "Linear without bias + bias_split_gelu")
        elif t is BasicTransformerBlock:
            why = _block_problem(m)
            if why is None and not (cfg.skip_layer_norm or cfg.bias_add):
                why = "skip_layer_norm and bias_add fusions disabled"
            if why is None:
                last = m.ff.net[-1]
                bias_add = cfg.bias_add and type(last) is nn.Linear and last.bias is not None
                _swap_class(
                    m,
                    SdkernBasicTransformerBlock,
                    backend,
                    undo,
                    _sdkern_sln=cfg.skip_layer_norm,
                    _sdkern_bias_add=bias_add,
                )
                parts = []
                if cfg.skip_layer_norm:
                    consumed.update((id(m.norm2), id(m.norm3)))
                    parts.append("residual+norm2, residual+norm3 -> skip_layer_norm")
                if bias_add:
                    parts.append("ff out bias + residual -> bias_add")
                elif cfg.bias_add:
                    left(name + ".ff", m.ff, "bias_add", "feed-forward does not end in a Linear with bias")
                done(name, m, "transformer_block", "; ".join(parts))
            else:
                left(name, m, "transformer_block", why)
        elif t in (UNet2DConditionModel, Encoder, Decoder, UNetSpatioTemporalConditionModel, TemporalDecoder):
            norm, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
            if not cfg.group_norm:
                left(name, m, "conv_norm_out", "group_norm fusion disabled")
            elif _affine_group_norm(norm) and type(act) is nn.SiLU:
                _swap_class(norm, SdkernGroupNormSiLU, backend, undo)
                m.conv_act = nn.Identity()

                def restore_act(m: nn.Module = m, act: nn.Module = act) -> None:
                    m.conv_act = act

                undo.append(restore_act)
                consumed.add(id(norm))
                done(name + ".conv_norm_out", norm, "conv_norm_out", "conv_norm_out + SiLU -> group_norm(silu)")
            elif norm is not None:
                left(name + ".conv_norm_out", norm, "conv_norm_out", "not an affine GroupNorm followed by SiLU")
        elif t in svd_rules.TYPES:  # Stable Video Diffusion's temporal blocks (sdkern/patch/svd.py)
            fusions = {"group_norm": cfg.group_norm, "skip_layer_norm": cfg.skip_layer_norm}
            svd_rules.rewrite(name, m, backend, fusions, _swap_class, undo, done, left, consumed)
        elif t.__name__ == "CLIPEncoderLayer" and t.__module__.startswith("transformers.models.clip"):
            if clip is None:
                from sdkern.patch import clip
            if not (cfg.skip_layer_norm or cfg.bias_add):
                left(name, m, "clip_layer", "skip_layer_norm and bias_add fusions disabled")
            elif not clip.forward_matches():
                left(name, m, "clip_layer", "CLIPEncoderLayer.forward signature differs from the one supported")
            elif not (_affine_layer_norm(m.layer_norm2) and type(m.mlp.fc2) is nn.Linear):
                left(name, m, "clip_layer", "layer_norm2 / mlp.fc2 not recognised")
            else:
                bias_add = cfg.bias_add and m.mlp.fc2.bias is not None
                _swap_class(
                    m,
                    clip.SdkernCLIPEncoderLayer,
                    backend,
                    undo,
                    _sdkern_sln=cfg.skip_layer_norm,
                    _sdkern_bias_add=bias_add,
                )
                if cfg.skip_layer_norm:
                    consumed.add(id(m.layer_norm2))
                parts = ["residual+layer_norm2 -> skip_layer_norm"] if cfg.skip_layer_norm else []
                if bias_add:
                    parts.append("fc2 bias + residual -> bias_add")
                done(name, m, "clip_layer", "; ".join(parts))
        elif t.__name__ == "CLIPAttention" and t.__module__.startswith("transformers.models.clip"):
            if clip is None:
                from sdkern.patch import clip
            why = "attention fusion disabled" if not cfg.attention else clip.attention_problem(m)
            if why is None:
                _swap_class(m, clip.SdkernCLIPAttention, backend, undo, _sdkern_sdpa=attn_sdpa)
                impl = ", torch SDPA (AMX bf16)" if attn_sdpa else ""
                done(
                    name,
                    m,
                    "attention",
                    f"CLIP self-attention (causal when the model asks for it){impl}, separate q/k/v, "
                    f"heads={m.num_heads} head_dim={m.head_dim}; a padding attention_mask runs transformers' attention",
                )
            else:
                left(name, m, "attention", why)
        elif isinstance(m, Attention) or (
            t.__module__.startswith(("diffusers", "transformers"))
            and any(k in t.__name__ for k in ("Attention", "Resnet", "TransformerBlock"))
            and not t.__name__.endswith(("Model", "Block2D", "Blocks"))
        ):
            left(name, m, "unrecognised", f"{t.__name__} has no rewrite rule")

    # standalone group norms (Transformer2DModel.norm, attention group_norm, ...) and what is left
    for name, m in root.named_modules():
        if id(m) in consumed:
            continue
        if _affine_group_norm(m):
            if cfg.group_norm:
                _swap_class(m, SdkernGroupNorm, backend, undo)
                done(name, m, "group_norm", "GroupNorm -> group_norm")
            else:
                left(name, m, "group_norm", "group_norm fusion disabled")
        elif _affine_layer_norm(m):
            if cfg.skip_layer_norm:
                _swap_class(m, SdkernLayerNorm, backend, undo)
                done(name, m, "layer_norm", "LayerNorm -> skip_layer_norm(skip=None)")
            else:
                left(name, m, "layer_norm", "skip_layer_norm fusion disabled")
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            why = "LayerNorm without an affine weight or over more than the last dim"
            if isinstance(m, nn.GroupNorm):
                why = "GroupNorm without affine parameters"
            left(name, m, "layer_norm" if isinstance(m, nn.LayerNorm) else "group_norm", why)

    if cfg.use_cpu_engine(device_type, dtype):
        _engine_pass(root, cfg, undo, done, left)
    return state


# modules whose output leaves the model: the engine gives them back in eager's NCHW layout
_DENSE_OUT = ("conv_out", "decoder.conv_out", "quant_conv", "encoder.conv_out")


def _engine_pass(
    root: nn.Module,
    cfg: PatchConfig,
    undo: list[Callable[[], None]],
    done: Callable[[str, nn.Module, str, str], None],
    left: Callable[[str, nn.Module, str, str], None],
) -> None:
    """Put every Conv2d / Linear the CPU engine can run on prepacked oneDNN primitives (see cpu_engine)."""
    why_not = cpu_engine.unavailable_reason()
    if why_not is not None:
        left("", root, "cpu_engine", why_not)
        return
    in_packed_qkv: set[int] = set()  # Linears whose weights are views of one packed QKV/KV weight
    for m in root.modules():
        proc = getattr(m, "processor", None)
        if isinstance(proc, SdkernAttnProcessor) and getattr(m, "_sdkern_packed", None) is not None:
            in_packed_qkv.update(id(lin) for lin in proc._fused_linears(m))
    for name, m in list(root.named_modules()):
        t = type(m)
        if t is nn.Conv2d and cfg.winograd and name not in _DENSE_OUT and winograd.problem(m) is None:
            winograd.rewrite(m, undo)
            done(name, m, "cpu_winograd", winograd.report_detail(m))
        elif t is nn.Conv2d:
            why = cpu_engine.conv_problem(m)
            if why is None:
                cpu_engine.pack_conv2d(m, undo, dense_out=name in _DENSE_OUT)
                k = "x".join(map(str, m.kernel_size))
                done(name, m, "cpu_conv", f"{k} conv {m.in_channels}->{m.out_channels}: weight prepacked for oneDNN")
            else:
                left(name, m, "cpu_conv", why)
        elif t is nn.Conv3d:  # SVD's temporal (k, 1, 1) convolutions (sdkern/patch/svd.py)
            svd_rules.engine_conv3d(name, m, undo, done, left)
        elif t is nn.Linear and id(m) not in in_packed_qkv:  # packed QKV/KV: one GEMM, reported as attention
            why = cpu_engine.linear_problem(m)
            if why is None:
                cpu_engine.pack_linear(m, undo)
                done(name, m, "cpu_linear", f"{m.in_features}->{m.out_features}: weight prepacked for oneDNN")
            else:
                left(name, m, "cpu_linear", why)
        elif t is Transformer2DModel and getattr(m, "is_input_continuous", False):
            _swap_class(m, SdkernTransformer2DModel, cfg.backend, undo)
            done(name, m, "transformer2d", "proj_out + residual in one primitive, NHWC kept (no .contiguous())")


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

    if cfg.backend in ("triton", "cuda"):
        from sdkern.ops import set_cuda_impl

        set_cuda_impl(cfg.backend)

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
    object.__delattr__(obj, _STATE)
    return obj


def patch_report(obj: Any) -> PatchReport | None:
    """The :class:`PatchReport` of a patched object, or None when it is not patched."""
    state: _State | None = getattr(obj, _STATE, None)
    return None if state is None else state.report
