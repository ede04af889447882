"""``sdkern::group_norm``: GroupNorm over (C/groups, H, W) per (n, group), then SiLU if asked.

The op's whole Python contract: schema, argument check, outputs (fake kernel), native launch, the
public keyword wrapper; the semantics are :func:`sdkern.ops.reference.group_norm`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from sdkern.ops import _native as nat
from sdkern.ops import _spec, reference
from sdkern.ops._layout import nchw_view, norm_output

SCHEMA = "group_norm(Tensor x, Tensor gamma, Tensor beta, int groups, float eps, bool silu) -> Tensor"


def check(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    groups: int,
    eps: float,
    silu: bool = False,
    *,
    op: str = "group_norm",
) -> None:
    """Validate the arguments (``op``: the name in the messages; skip_group_norm checks these too)."""
    if not _spec.on_one_device(x, gamma, beta):
        _spec.tensors(op, x=x, gamma=gamma, beta=beta)
        _spec.devices(op, x=x, gamma=gamma, beta=beta)
    _spec.float_dtype("x", x, op)
    if x.dim() != 4:
        raise ValueError(f"sdkern.{op}: x must be 4-D (N, C, H, W), got shape {list(x.shape)}")
    c = x.shape[1]
    if groups <= 0:
        raise ValueError(f"sdkern.{op}: groups must be positive, got {groups}")
    if c % groups != 0:
        raise ValueError(f"sdkern.{op}: channels C={c} of x are not divisible by groups={groups}")
    if not eps >= 0.0:
        raise ValueError(f"sdkern.{op}: eps must be >= 0, got {eps}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        _spec.param_dtype(name, t, x, op)
        _spec.vector(name, t, c, op)


def outputs(x: torch.Tensor, *_: object) -> torch.Tensor:
    return norm_output(x)


def launch(mod: ModuleType, x: torch.Tensor, gamma, beta, groups: int, eps: float, silu: bool) -> torch.Tensor:
    xd, sn, sc, sp = nchw_view(x)
    gamma = nat.vec(gamma)
    beta = nat.like(beta, gamma)
    y = torch.empty_like(xd)  # xd is dense (NCHW or NHWC): same strides
    n, c, h, w = x.shape
    ws = nat.group_norm_workspace(mod, x, n, c, h * w, groups)  # referenced until the kernels are enqueued
    mod.group_norm(
        xd.data_ptr(), gamma.data_ptr(), beta.data_ptr(), y.data_ptr(),
        n, c, h * w, groups, eps, silu, sn, sc, sp, nat.code(x), nat.code(gamma),
        *nat.workspace_arg(ws), *nat.stream(x),
    )  # fmt: skip
    return y


def group_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    groups: int = 32,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm over (C/groups, H, W) per (n, group), then SiLU if ``silu``.

    Parameters
    ----------
    x : Tensor (N, C, H, W)
        Any memory format; channels-last (NHWC) is the fast path and is preserved.
    gamma, beta : Tensor [C]
        float32 or x's dtype.
    groups : int
        Number of groups; must divide C.
    eps : float
        Added to the variance.
    silu : bool
        Apply SiLU to the output.

    Returns
    -------
    Tensor (N, C, H, W)
        Same dtype and memory format as ``x``.
    """
    return torch.ops.sdkern.group_norm(x, gamma, beta, groups, eps, silu)


SPEC = _spec.OpSpec(SCHEMA, check=check, outputs=outputs, launch=launch, reference=reference.group_norm)
