"""Work-arounds for onnxruntime.transformers (ORT 1.32) while its optimiser runs.

- NumPy: ORT's U-Net attention fusion (``FusionAttentionUnet.get_num_heads``) converts a one-element
  1-D array with ``int(array)``, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be
  converted to Python scalars"), so every U-Net attention fusion dies. :func:`patched_fusions` swaps
  in an equivalent that reads the head count with ``.item()``.
- Memory: several fusions (SkipGroupNorm, Shape, useless-Reshape removal, ...) each build a new
  ``SymbolicShapeInferenceHelper``, which copies the whole model, weights included, and the fusion
  objects keep their helper alive. On the fp32 SD1.5 U-Net (3.4 GB of weights) the optimiser's RSS
  climbed to 24 GB, past what a 24 GB machine has (measured; CI's run was killed). Shape inference
  needs only the weights' shapes, so the helper is given a view of the model in which every large
  initializer is a graph input of the same type and shape: the peak drops to the model plus small
  change (see :func:`_weightless`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

#: Initializers with more elements than this are shown to shape inference as typed graph inputs.
#: Shape-carrying constants (Reshape/Slice/Expand operands) are far below it; weights far above.
WEIGHTLESS_ABOVE = 4096


def _scalar(value: Any) -> int:
    if isinstance(value, np.ndarray) and value.size == 1:
        return int(value.reshape(()).item())
    return 0


def _get_num_heads(self: Any, reshape_q: Any, is_torch2: bool = False) -> int:
    if is_torch2:
        # shape given by Concat(0, 0, num_heads, head_size) after reshape fusion
        concat = self.model.get_parent(reshape_q, 1)
        heads = 0
        if concat is not None and concat.op_type == "Concat" and len(concat.input) == 4:
            heads = _scalar(self.model.get_constant_value(concat.input[2]))
    else:
        shape = self.model.get_constant_value(reshape_q.input[1])
        heads = int(shape[2]) if isinstance(shape, np.ndarray) and shape.shape == (4,) else 0
    return heads if heads > 0 else 0


def _weightless(model: Any) -> Any:
    """A copy of ``model`` whose large initializers are graph inputs of the same dtype and shape.

    Parameters
    ----------
    model : onnx.ModelProto
        The model being optimised; not modified.

    Returns
    -------
    onnx.ModelProto
        Same nodes, inputs, outputs, value_info and small initializers; every initializer with more
        than :data:`WEIGHTLESS_ABOVE` elements becomes a graph input (no data is copied).
    """
    import math

    import onnx

    graph = model.graph
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = graph.name
    lg.node.extend(graph.node)
    lg.input.extend(graph.input)
    lg.output.extend(graph.output)
    lg.value_info.extend(graph.value_info)
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        if math.prod(init.dims) <= WEIGHTLESS_ABOVE:
            lg.initializer.append(init)
        elif init.name not in inputs:
            lg.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _helper_classes() -> list[type]:
    import sys

    return list(
        {
            id(cls): cls
            for name in ("onnxruntime.transformers.shape_infer_helper", "shape_infer_helper")
            if (mod := sys.modules.get(name)) is not None
            and (cls := getattr(mod, "SymbolicShapeInferenceHelper", None)) is not None
        }.values()
    )


@contextlib.contextmanager
def patched_fusions() -> Iterator[None]:
    """Apply the work-arounds for the duration of a ``with`` block."""
    import sys

    try:
        import onnxruntime.transformers.optimizer  # noqa: F401 - loads the fusion modules
    except ImportError:
        yield
        return
    # onnxruntime.transformers imports its modules both as a package and top-level (it puts its
    # folder on sys.path), so the class can exist twice: patch every copy.
    classes = [
        mod.FusionAttentionUnet
        for name in ("onnxruntime.transformers.fusion_attention_unet", "fusion_attention_unet")
        if (mod := sys.modules.get(name)) is not None and hasattr(mod, "FusionAttentionUnet")
    ]
    originals = [(cls, "get_num_heads", cls.__dict__["get_num_heads"]) for cls in classes]
    for cls in classes:
        cls.get_num_heads = _get_num_heads
    for helper in _helper_classes():
        # _preprocess is inherited from SymbolicShapeInference: shadow it on the helper subclass only.
        base = helper._preprocess
        originals.append((helper, "_preprocess", helper.__dict__.get("_preprocess")))
        helper._preprocess = lambda self, in_mp, _base=base: _base(self, _weightless(in_mp))
    try:
        yield
    finally:
        for cls, attr, fn in originals:
            if fn is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, fn)
