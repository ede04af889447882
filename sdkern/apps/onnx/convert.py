"""Rewrite com.microsoft diffusion ops to sdkern's ONNX Runtime custom-op domain.

ONNX Runtime's transformer optimiser (``onnxruntime.transformers.optimizer``, model types "unet",
"vae", "clip") emits com.microsoft GroupNorm, SkipGroupNorm, BiasSplitGelu and BiasAdd, which ONNX
Runtime implements only for CUDA/ROCm/DirectML. sdkern's library (``sdkern.ort``) implements the same
ops, with the same inputs, outputs and attributes, in the domain ``sdkern``, so converting a graph is a
domain rename plus an opset import.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable

import onnx

logger = logging.getLogger("sdkern")

SDKERN_DOMAIN = "sdkern"
MS_DOMAIN = "com.microsoft"

#: Every com.microsoft op sdkern's library implements.
CONTRIB_OPS: tuple[str, ...] = (
    "GroupNorm",
    "SkipGroupNorm",
    "BiasSplitGelu",
    "BiasAdd",
    "SkipLayerNormalization",
    "MultiHeadAttention",
)
#: Converted by default: the ops ONNX Runtime's CPU execution provider lacks. SkipLayerNormalization
#: and MultiHeadAttention exist on the CPU EP (MHA fp32-only) and are converted only when asked.
DEFAULT_OPS: tuple[str, ...] = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd")

ModelLike = onnx.ModelProto | str | os.PathLike


def _graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def convert_contrib(
    model: ModelLike, ops: Iterable[str] | None = None, *, load_external_data: bool = True
) -> onnx.ModelProto:
    """Move com.microsoft diffusion ops to the ``sdkern`` domain.

    Parameters
    ----------
    model : onnx.ModelProto or path
        The model; a ModelProto is modified in place (and returned), a path is loaded first.
    ops : iterable of str, optional
        Op types to convert, a subset of :data:`CONTRIB_OPS`. Default :data:`DEFAULT_OPS`
        (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd); pass ``CONTRIB_OPS`` to also take
        SkipLayerNormalization and MultiHeadAttention.
    load_external_data : bool
        Passed to ``onnx.load`` when ``model`` is a path.

    Returns
    -------
    onnx.ModelProto
        The model with the selected nodes in domain ``sdkern`` and an ``sdkern`` opset import
        (version 1). Run it with ``sdkern.ort.session_options()``.

    Raises
    ------
    ValueError
        For an op name sdkern does not implement.
    """
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model), load_external_data=load_external_data)
    selected = set(DEFAULT_OPS if ops is None else ops)
    unknown = selected - set(CONTRIB_OPS)
    if unknown:
        raise ValueError(f"convert_contrib: sdkern implements {CONTRIB_OPS}; cannot convert {sorted(unknown)}")
    converted: Counter[str] = Counter()
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain == MS_DOMAIN and node.op_type in selected:
                node.domain = SDKERN_DOMAIN
                converted[node.op_type] += 1
    if converted and not any(o.domain == SDKERN_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(SDKERN_DOMAIN, 1))
    logger.info("convert_contrib: moved to domain sdkern: %s", dict(converted) or "nothing")
    return model


def count_ops(model: onnx.ModelProto, domain: str | None = None) -> dict[str, int]:
    """Node counts by ``op_type`` over the graph and its subgraphs.

    Parameters
    ----------
    model : onnx.ModelProto
        The model.
    domain : str, optional
        Count only nodes of this domain ("" is the default ONNX domain).

    Returns
    -------
    dict[str, int]
        ``{op_type: count}``.
    """
    counts: Counter[str] = Counter()
    for graph in _graphs(model.graph):
        for node in graph.node:
            if domain is None or node.domain == domain:
                counts[node.op_type] += 1
    return dict(counts)
