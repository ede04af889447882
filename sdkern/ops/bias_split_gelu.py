"""``sdkern::bias_split_gelu``: (x + b)[..., :D] * gelu_erf((x + b)[..., D:]) (GEGLU, bias out of the Linear).

The op's whole Python contract: schema, argument check, outputs (fake kernel), native launch, the
public keyword wrapper; the semantics are :func:`sdkern.ops.reference.bias_split_gelu`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from sdkern.ops import _native as nat
from sdkern.ops import _spec, reference

SCHEMA = "bias_split_gelu(Tensor x, Tensor bias) -> Tensor"


def check(x: torch.Tensor, bias: torch.Tensor) -> None:
    op = "bias_split_gelu"
    if not _spec.on_one_device(x, bias):
        _spec.tensors(op, x=x, bias=bias)
        _spec.devices(op, x=x, bias=bias)
    _spec.float_dtype("x", x, op)
    _spec.at_least_1d(x, op)
    two_d = x.shape[-1]
    if two_d % 2 != 0:
        raise ValueError(f"sdkern.{op}: the last dimension of x must be even (2*D), got {two_d}")
    _spec.param_dtype("bias", bias, x, op)
    _spec.vector("bias", bias, two_d, op)
    _spec.last_dim_contiguous("x", x, op)


def outputs(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def launch(mod: ModuleType, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x2, m, rs = nat.launch_rows(x)
    bias = nat.vec(bias)
    d = x.shape[-1] // 2
    y = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    mod.bias_split_gelu(
        x2.data_ptr(), bias.data_ptr(), y.data_ptr(), m, d, rs, nat.code(x), nat.code(bias), *nat.stream(x),
    )  # fmt: skip
    return y


def bias_split_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GEGLU with the Linear's bias folded in.

    Parameters
    ----------
    x : Tensor (..., 2D)
        Last dimension contiguous.
    bias : Tensor [2D]

    Returns
    -------
    Tensor (..., D)
        ``(x + bias)[..., :D] * gelu_erf((x + bias)[..., D:])``.
    """
    return torch.ops.sdkern.bias_split_gelu(x, bias)


SPEC = _spec.OpSpec(SCHEMA, check=check, outputs=outputs, launch=launch, reference=reference.bias_split_gelu)
