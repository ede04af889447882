"""Work-arounds for onnxruntime.transformers on current NumPy.

ORT's U-Net attention fusion (``FusionAttentionUnet.get_num_heads``, ORT 1.32) converts a
one-element 1-D array with ``int(array)``, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can
be converted to Python scalars"), so every U-Net attention fusion dies. :func:`patched_fusions`
swaps in an equivalent that reads the head count with ``.item()`` while the optimiser runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np


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
    originals = [(cls, cls.__dict__["get_num_heads"]) for cls in classes]
    for cls in classes:
        cls.get_num_heads = _get_num_heads
    try:
        yield
    finally:
        for cls, fn in originals:
            cls.get_num_heads = fn
