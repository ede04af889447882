"""sdkern's fused operators.

Importing this package registers ``torch.ops.sdkern.*`` (see :mod:`sdkern.ops._library`). The
functions below are thin keyword-friendly wrappers over those ops; they accept fp32, fp16 and bf16,
accumulate in fp32 and return the input dtype. Each op is defined in one module, ``<op>.py``
(schema, argument check, outputs, native launch, wrapper), and registered from its spec.
"""

from __future__ import annotations

from sdkern.ops import _autograd, _library, reference
from sdkern.ops._dispatch import cuda_impl_order, preferring, set_cuda_impl
from sdkern.ops._library import OPS, SCHEMAS
from sdkern.ops.attention import attention
from sdkern.ops.bias_add import bias_add
from sdkern.ops.bias_split_gelu import bias_split_gelu
from sdkern.ops.group_norm import group_norm
from sdkern.ops.skip_group_norm import skip_group_norm
from sdkern.ops.skip_layer_norm import skip_layer_norm

__all__ = [
    "OPS",
    "SCHEMAS",
    "attention",
    "bias_add",
    "bias_split_gelu",
    "cuda_impl_order",
    "group_norm",
    "preferring",
    "reference",
    "set_cuda_impl",
    "skip_group_norm",
    "skip_layer_norm",
]

_autograd.register(_library._lib)  # backward formulas of every op
