"""``sdkern::skip_group_norm``: s = x + skip + bias; y = GroupNorm(s) (+SiLU); returns (y, s).

The op's whole Python contract: schema, argument check, outputs (fake kernel), native launch, the
public keyword wrapper; the semantics are :func:`sdkern.ops.reference.skip_group_norm`.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from sdkern.ops import _native as nat
from sdkern.ops import _spec, reference
from sdkern.ops._layout import nchw_view, norm_output, skip_strides
from sdkern.ops.group_norm import check as check_group_norm

SCHEMA = (
    "skip_group_norm(Tensor x, Tensor skip, Tensor? bias, Tensor gamma, Tensor beta, int groups, "
    "float eps, bool silu) -> (Tensor, Tensor)"
)


def check(
    x: Tensor, skip: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, groups: int, eps: float, *_: object
) -> None:
    op = "skip_group_norm"
    check_group_norm(x, gamma, beta, groups, eps, op=op)
    if not _spec.on_one_device(x, skip, optional=(bias,)):
        _spec.tensors(op, skip=skip)
        _spec.optional_tensors(op, bias=bias)
        _spec.devices(op, x=x, skip=skip, bias=bias)
    _spec.same_dtype("skip", skip, x, op)
    n, c, h, w = x.shape
    ok = tuple(skip.shape) in ((n, c, h, w), (n, c, 1, 1), (n, c))
    if not ok:
        raise ValueError(
            f"sdkern.{op}: skip must have shape {[n, c, h, w]}, {[n, c, 1, 1]} or {[n, c]}, got {list(skip.shape)}"
        )
    if bias is not None:
        _spec.param_dtype("bias", bias, x, op)
        _spec.vector("bias", bias, c, op)


def outputs(x: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
    return norm_output(x), norm_output(x)


def launch(mod: ModuleType, x: torch.Tensor, skip, bias, gamma, beta, groups: int, eps: float, silu: bool):
    xd, sn, sc, sp = nchw_view(x)
    sk, kn, kc, kp = skip_strides(skip, x)
    gamma, bias = nat.vec(gamma), (None if bias is None else nat.vec(bias))
    beta = nat.like(beta, gamma)
    y, s = torch.empty_like(xd), torch.empty_like(xd)  # xd is dense (NCHW or NHWC): same strides
    n, c, h, w = x.shape
    ws = nat.group_norm_workspace(mod, x, n, c, h * w, groups)  # referenced until the kernels are enqueued
    mod.skip_group_norm(
        xd.data_ptr(), sk.data_ptr(), nat.ptr(bias), gamma.data_ptr(), beta.data_ptr(),
        y.data_ptr(), s.data_ptr(), n, c, h * w, groups, eps, silu, sn, sc, sp, kn, kc, kp,
        nat.code(x), nat.code(gamma), nat.code(bias) if bias is not None else 0,
        *nat.workspace_arg(ws), *nat.stream(x),
    )  # fmt: skip
    return y, s


def skip_group_norm(
    x: torch.Tensor,
    skip: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None = None,
    groups: int = 32,
    eps: float = 1e-5,
    silu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + skip + bias``; ``y = GroupNorm(s)`` (+SiLU). Returns ``(y, s)``.

    Parameters
    ----------
    x : Tensor (N, C, H, W)
        Any memory format (NHWC fast path).
    skip : Tensor (N, C, H, W), (N, C, 1, 1) or (N, C)
        Same dtype as x; the (N, C) forms broadcast over H, W (ResnetBlock2D's time embedding).
    gamma, beta : Tensor [C]
        float32 or x's dtype.
    bias : Tensor [C], optional
    groups, eps, silu
        As in :func:`sdkern.ops.group_norm`.

    Returns
    -------
    y, s : Tensor (N, C, H, W)
        Both in x's dtype and memory format. ``y`` normalises the fp32 sum.

    Notes
    -----
    The torch op's positional order is ``(x, skip, bias, gamma, beta, groups, eps, silu)``.
    """
    return torch.ops.sdkern.skip_group_norm(x, skip, bias, gamma, beta, groups, eps, silu)


SPEC = _spec.OpSpec(SCHEMA, check=check, outputs=outputs, launch=launch, reference=reference.skip_group_norm)
