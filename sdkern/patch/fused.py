"""What the patched modules call at run time: the op namespace for a ``PatchConfig.backend``, and the Linear /
convolution types a fused ``forward`` may call directly (anything else runs the original code)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdkern.ops import reference
from sdkern.patch.cpu_engine_modules import SdkernConv2d, SdkernLinear
from sdkern.patch.winograd import SdkernWinogradConv2d

__all__ = ["ENGINE_CONV2D", "PLAIN_LINEAR", "ops_for"]

# A Linear the fused forwards may call directly: PyTorch's, or the CPU engine's prepacked one (anything
# else, e.g. a LoRA wrapper installed after patching, makes them run the original code).
PLAIN_LINEAR = (nn.Linear, SdkernLinear)
ENGINE_CONV2D = (SdkernConv2d, SdkernWinogradConv2d)  # convolutions conv2d_add runs with a fused residual


def _torch_ops() -> Any:
    import sdkern.ops  # noqa: F401  (registers torch.ops.sdkern)

    return torch.ops.sdkern


def ops_for(backend: str) -> Any:
    """The op namespace a patched module calls: ``sdkern.ops.reference`` for ``"reference"`` (the references take
    the positional arguments of the ``torch.ops.sdkern`` schemas, in the same order), else ``torch.ops.sdkern``."""
    return reference if backend == "reference" else _torch_ops()
