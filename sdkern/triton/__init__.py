"""Triton kernels for every sdkern op (the default CUDA implementation).

Each launcher has exactly the positional signature of the torch op and returns what it returns; it validates
its arguments with the op's ``check`` (``sdkern/ops/<op>.py``) unless the op dispatcher, which already has,
calls it (``sdkern.ops._spec.call_validated``). They import only the neutral parts of ``sdkern.ops`` (the op
modules' checks, ``_layout``, ``_spec``), never the dispatcher. They run
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
