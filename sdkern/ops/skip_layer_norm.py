"""``sdkern::skip_layer_norm``: s = x (+ skip) (+ bias); y = LayerNorm(s) * gamma (+ beta); returns (y, s).

The op's whole Python contract: schema, argument check, outputs (fake kernel), native launch, the
public keyword wrapper; the semantics are :func:`sdkern.ops.reference.skip_layer_norm`.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from sdkern.ops import _native as nat
from sdkern.ops import _spec, reference
from sdkern.ops._layout import dense_like

SCHEMA = (
    "skip_layer_norm(Tensor x, Tensor? skip, Tensor gamma, Tensor? beta, Tensor? bias, float eps) -> (Tensor, Tensor)"
)


def check(x: Tensor, skip: Tensor | None, gamma: Tensor, beta: Tensor | None, bias: Tensor | None, eps: float) -> None:
    op = "skip_layer_norm"
    if not _spec.on_one_device(x, gamma, optional=(skip, beta, bias)):
        _spec.tensors(op, x=x, gamma=gamma)
        _spec.optional_tensors(op, skip=skip, beta=beta, bias=bias)
        _spec.devices(op, x=x, skip=skip, gamma=gamma, beta=beta, bias=bias)
    _spec.float_dtype("x", x, op)
    _spec.at_least_1d(x, op)
    if skip is not None:
        _spec.same_dtype("skip", skip, x, op)
        if skip.shape != x.shape:
            raise ValueError(f"sdkern.{op}: skip must have the shape of x {list(x.shape)}, got {list(skip.shape)}")
    c = x.shape[-1]
    for name, t in (("gamma", gamma), ("beta", beta), ("bias", bias)):
        if t is not None:
            _spec.param_dtype(name, t, x, op)
            _spec.vector(name, t, c, op)
    if not eps >= 0.0:
        raise ValueError(f"sdkern.{op}: eps must be >= 0, got {eps}")
    _spec.last_dim_contiguous("x", x, op)
    if skip is not None:
        _spec.last_dim_contiguous("skip", skip, op)


def outputs(x: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


def launch(mod: ModuleType, x: torch.Tensor, skip, gamma, beta, bias, eps: float):
    x2, m, xrs = nat.launch_rows(x)
    k2, _, krs = nat.launch_rows(skip) if skip is not None else (None, m, 0)  # no skip: a plain LayerNorm
    gamma = nat.vec(gamma)
    beta, bias = nat.like(beta, gamma), nat.like(bias, gamma)
    y, s = dense_like(x), dense_like(x)
    mod.skip_layer_norm(
        x2.data_ptr(), nat.ptr(k2), gamma.data_ptr(), nat.ptr(beta), nat.ptr(bias),
        y.data_ptr(), s.data_ptr(), m, x.shape[-1], xrs, krs, eps, nat.code(x), nat.code(gamma),
        *nat.stream(x),
    )  # fmt: skip
    return y, s


def skip_layer_norm(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x (+ skip) (+ bias)``; ``y = LayerNorm(s) * gamma (+ beta)``. Returns ``(y, s)``.

    With ``skip=None`` this is a plain LayerNorm over the last dim (``y`` is ``F.layer_norm``; ``s`` is x
    plus bias, a copy of x without one).

    Parameters
    ----------
    x : Tensor (..., C)
        Last dimension contiguous.
    skip : Tensor (..., C) or None
        x's shape and dtype, last dimension contiguous.
    gamma : Tensor [C]
    beta, bias : Tensor [C], optional

    Returns
    -------
    y, s : Tensor (..., C)
    """
    return torch.ops.sdkern.skip_layer_norm(x, skip, gamma, beta, bias, eps)


SPEC = _spec.OpSpec(SCHEMA, check=check, outputs=outputs, launch=launch, reference=reference.skip_layer_norm)
