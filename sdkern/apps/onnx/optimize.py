"""One exported component through ONNX Runtime's transformer optimiser: fusions per target, fp16, sdkern ops.

Stages 2 and 3 of ``sdkern optimize`` (:mod:`sdkern.apps.onnx.build`): ORT's optimiser with the fusions the target's
execution provider implements, fp16 conversion, and on the CPU target :func:`~sdkern.apps.onnx.convert.convert_contrib`
into the ``sdkern`` domain.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

MODEL_TYPES = {
    "text_encoder": "clip",
    "text_encoder_2": "clip",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
    "controlnet": "unet",  # a U-Net's down and mid blocks: the same fusions apply
    "safety_checker": "clip",  # a CLIP vision transformer and two projections
}


FUSED_OPS = (
    "GroupNorm",
    "SkipGroupNorm",
    "BiasSplitGelu",
    "BiasAdd",
    "MultiHeadAttention",
    "Attention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "NhwcConv",
    "BiasGelu",
    "FastGelu",
    "Gelu",
)


#: com.microsoft ops ORT's optimiser emits that the CPU execution provider has no kernel for (checked
#: with onnxruntime 1.32 by creating CPU sessions: "Could not find an implementation for GroupNorm(1)",
#: likewise SkipGroupNorm, BiasSplitGelu, BiasAdd; NhwcConv is CUDA-only). SkipLayerNormalization,
#: LayerNormalization, Attention, MultiHeadAttention (unpacked QKV) and the Gelu family do run on the CPU
#: EP. In fp16 the CPU EP has no kernel for Conv, MatMul and Gemm: ORT inserts
#: Casts and runs them in fp32 (seen in the session-optimised graph).
CPU_EP_MISSING = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv")


def _fusion_options(model_type: str, target: str, fp16: bool, sdkern_ops: bool = True) -> Any:
    from onnxruntime.transformers.fusion_options import FusionOptions

    fo = FusionOptions(model_type)
    if model_type == "unet":
        fo.enable_packed_kv = fp16
        fo.enable_packed_qkv = fp16
        fo.enable_bias_add = True
    if target != "cuda":
        fo.enable_nhwc_conv = False
    if target == "cpu" and not sdkern_ops:
        # ORT alone on the CPU EP: only the fusions it has CPU kernels for (see CPU_EP_MISSING)
        fo.enable_group_norm = False
        fo.enable_skip_group_norm = False
        fo.enable_bias_splitgelu = False
        fo.enable_bias_add = False
        # ORT's CPU MultiHeadAttention rejects packed QKV / KV ("Packed QKV of shape (B, L, N, 3, H) not
        # implemented for CPU"); fp16 runs there through Casts to fp32 that ORT inserts
        fo.enable_packed_qkv = False
        fo.enable_packed_kv = False
    if target == "dml":
        fo.enable_bias_splitgelu = False
        fo.enable_bias_add = False
        fo.enable_skip_layer_norm = False
        fo.enable_bias_skip_layer_norm = False
        fo.enable_skip_group_norm = False
        fo.group_norm_channels_last = False
    return fo


def optimize_component(
    src: Path,
    dst: Path,
    component: str,
    target: str,
    fp16: bool,
    force_fp32_ops: tuple[str, ...] = (),
    sdkern_ops: bool = True,
) -> dict[str, int]:
    """Optimise one exported model into ``dst``; returns op-type counts of the result.

    Parameters
    ----------
    src, dst : Path
        Exported model and where to write the optimised one (checked with onnx.checker).
    component : str
        One of :data:`sdkern.apps.onnx.export.SDXL_COMPONENTS` (selects ORT's model type).
    target : {"cpu", "cuda", "dml"}
        Execution provider the model is for.
    fp16 : bool
        Convert to float16.
    force_fp32_ops : tuple of str
        Extra op types kept in float32.
    sdkern_ops : bool
        ``target="cpu"`` only: True (default) fuses everything and moves the ops the CPU EP lacks to
        sdkern's custom-op domain; False keeps to ONNX Runtime alone (no fusion into
        :data:`CPU_EP_MISSING` ops, no sdkern library needed).

    Returns
    -------
    dict[str, int]
        Op-type counts of the written model.
    """
    import onnx
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.optimizer import optimize_model

    from sdkern.apps.onnx._ort_compat import patched_fusions

    model_type = MODEL_TYPES[component]
    with patched_fusions():
        m = optimize_model(
            str(src),
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            opt_level=0,
            optimization_options=_fusion_options(model_type, target, fp16, sdkern_ops),
            use_gpu=target != "cpu",
        )
    if fp16:
        block = [*float16.DEFAULT_OP_BLOCK_LIST, "RandomNormalLike", "RandomNormal", *force_fp32_ops]
        keep: bool | list[str] = False
        nodes: list[str] = []
        if component in ("unet", "controlnet"):
            # The sinusoidal timestep embedding stays float32, as in diffusers (Timesteps computes in
            # fp32 and casts after): sin/cos of t * freq with t up to 999 in fp16 is off by up to ~0.5 rad
            # (measured: tiny U-Net relative error vs float64 5.4e-3 with it in fp16, see tests/onnx).
            # SDXL's added time ids (image sizes, up to 1024 and more) go through the same sinusoidal
            # embedding (add_time_proj): kept float32 likewise.
            inputs = {i.name for i in m.model.graph.input}
            keep = [n for n in ("timestep", "time_ids") if n in inputs]
            nodes = [
                n.name
                for n in m.model.graph.node
                if "/time_proj/" in n.name or "/add_time_proj/" in n.name or set(keep) & set(n.input)
            ]
        m.convert_float_to_float16(keep_io_types=keep, op_block_list=block, node_block_list=nodes)
        m.topological_sort()  # the converter appends Cast nodes out of order
    model = m.model
    _ensure_opset_imports(model)
    if target == "cpu" and sdkern_ops:
        from sdkern.apps.onnx.convert import convert_contrib

        ops = ["GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"]
        if fp16:
            ops.append("MultiHeadAttention")  # ORT's CPU MultiHeadAttention is fp32-only
        model = convert_contrib(model, ops=ops)
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = _past_protobuf_limit(model)
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location="model.onnx.data" if big else None,
    )
    onnx.checker.check_model(str(dst))
    return dict(Counter(n.op_type for n in model.graph.node))


def _past_protobuf_limit(model: Any) -> bool:
    """Whether ``model`` must be saved with external data (protobuf messages stop at 2 GB).

    ``ByteSize()`` itself raises ``EncodeError`` past 2 GB (seen with the fp32 SD1.5 U-Net, 3.4 GB), so a
    failure to size the message means "too big" too.
    """
    try:
        return model.ByteSize() > 1_900_000_000
    except Exception:  # noqa: BLE001 - google.protobuf.message.EncodeError, or no ByteSize at all
        return True


def _ensure_opset_imports(model: Any) -> None:
    """The optimiser adds contrib-domain nodes without their opset import until it saves: add it."""
    import onnx

    have = {o.domain for o in model.opset_import}
    for domain in {n.domain for n in model.graph.node} - have - {"", "ai.onnx"}:
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
