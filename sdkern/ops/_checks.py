"""The argument checks under their former names (each op's ``check`` lives in ``sdkern/ops/<op>.py``)."""

from __future__ import annotations

from sdkern.ops.attention import check as check_attention
from sdkern.ops.bias_add import check as check_bias_add
from sdkern.ops.bias_split_gelu import check as check_bias_split_gelu
from sdkern.ops.group_norm import check as check_group_norm
from sdkern.ops.skip_group_norm import check as check_skip_group_norm
from sdkern.ops.skip_layer_norm import check as check_skip_layer_norm

__all__ = [
    "check_attention",
    "check_bias_add",
    "check_bias_split_gelu",
    "check_group_norm",
    "check_skip_group_norm",
    "check_skip_layer_norm",
]
