"""``sdkern::bias_add``: x + bias + skip over the last dim.

The op's whole Python contract: schema, argument check, outputs (fake kernel), native launch, the
closed-form backward, the public keyword wrapper; the semantics are :func:`sdkern.ops.reference.bias_add`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from sdkern.ops import _native as nat
from sdkern.ops import _spec, reference
from sdkern.ops._layout import dense_like

SCHEMA = "bias_add(Tensor x, Tensor bias, Tensor skip) -> Tensor"


def check(x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> None:
    op = "bias_add"
    if not _spec.on_one_device(x, bias, skip):
        _spec.tensors(op, x=x, bias=bias, skip=skip)
        _spec.devices(op, x=x, bias=bias, skip=skip)
    _spec.float_dtype("x", x, op)
    _spec.at_least_1d(x, op)
    _spec.same_dtype("skip", skip, x, op)
    if skip.shape != x.shape:
        raise ValueError(f"sdkern.{op}: skip must have the shape of x {list(x.shape)}, got {list(skip.shape)}")
    _spec.param_dtype("bias", bias, x, op)
    _spec.vector("bias", bias, x.shape[-1], op)
    _spec.last_dim_contiguous("x", x, op)
    _spec.last_dim_contiguous("skip", skip, op)


def outputs(x: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty(x.shape)


def launch(mod: ModuleType, x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    x2, m, xrs = nat.launch_rows(x)
    k2, _, krs = nat.launch_rows(skip)
    bias = nat.vec(bias)
    y = dense_like(x)
    mod.bias_add(
        x2.data_ptr(), bias.data_ptr(), k2.data_ptr(), y.data_ptr(), m, x.shape[-1],
        xrs, krs, nat.code(x), nat.code(bias), *nat.stream(x),
    )  # fmt: skip
    return y


def backward(args: Sequence[Any], needs: Sequence[bool], grads: Sequence[torch.Tensor | None]) -> list:
    """dx = dskip = g; dbias = g summed over rows (in fp32 for half g)."""
    x, bias, skip = args[0], args[1], args[2]
    (g,) = grads
    if g is None:
        return [None, None, None]
    gx = g.to(x.dtype) if needs[0] else None
    gskip = g.to(skip.dtype) if needs[2] else None
    gbias = (
        g.reshape(-1, g.shape[-1]).sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(bias.dtype)
        if needs[1]
        else None
    )
    return [gx, gbias, gskip]


def bias_add(x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``x + bias + skip``.

    Parameters
    ----------
    x, skip : Tensor (..., C)
    bias : Tensor [C]

    Returns
    -------
    Tensor (..., C)
    """
    return torch.ops.sdkern.bias_add(x, bias, skip)


SPEC = _spec.OpSpec(
    SCHEMA, check=check, outputs=outputs, launch=launch, reference=reference.bias_add, backward=backward
)
