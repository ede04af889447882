"""Triton kernels for every sdkern op (the default CUDA implementation).

Each launcher has exactly the positional signature of the torch op and returns what it returns. They run
on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before Triton is imported; other
devices raise ``NotImplementedError`` so the op's dispatch falls back. Importing this package needs
``triton`` but no GPU.
"""

from __future__ import annotations

from sdkern.triton.attention import attention
from sdkern.triton.bias_add import bias_add
from sdkern.triton.bias_split_gelu import bias_split_gelu
from sdkern.triton.group_norm import group_norm
from sdkern.triton.skip_group_norm import skip_group_norm
from sdkern.triton.skip_layer_norm import skip_layer_norm

__all__ = ["attention", "bias_add", "bias_split_gelu", "group_norm", "skip_group_norm", "skip_layer_norm"]
