"""Argument validation shared by every implementation (and the fake kernels).

Each ``check_<op>`` raises ``TypeError`` (dtype), ``ValueError`` (shape/stride/value) or
``RuntimeError`` (device) with a message that names the offending argument.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tensors(op: str, **tensors: object) -> None:
    """TypeError naming the first argument that is not a tensor (None included)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sdkern.{op}: {name} must be a tensor, got {type(t).__name__}")


def _optional_tensors(op: str, **tensors: object) -> None:
    """TypeError naming the first optional argument that is neither None nor a tensor."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"sdkern.{op}: {name} must be a tensor or None, got {type(t).__name__}")


def _dtype(name: str, t: torch.Tensor, op: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sdkern.{op}: {name} has dtype {t.dtype}; expected float32, float16 or bfloat16")


def _same_dtype(name: str, t: torch.Tensor, x: torch.Tensor, op: str) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"sdkern.{op}: {name} has dtype {t.dtype}; expected {x.dtype} (the dtype of x)")


def _param_dtype(name: str, t: torch.Tensor, x: torch.Tensor, op: str) -> None:
    if t.dtype != x.dtype and t.dtype != torch.float32:
        raise TypeError(f"sdkern.{op}: {name} has dtype {t.dtype}; expected float32 or {x.dtype} (the dtype of x)")


def _vector(name: str, t: torch.Tensor, n: int, op: str) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"sdkern.{op}: {name} must have shape [{n}], got {list(t.shape)}")


def _same_device(x: torch.Tensor, *required: torch.Tensor, optional: tuple[torch.Tensor | None, ...] = ()) -> bool:
    """True when x and every required argument are tensors, every optional one a tensor or None, all
    on x's device: the cheap per-call test; the checks find the culprit (not a tensor, other device)
    only when it fails."""
    if not isinstance(x, torch.Tensor):
        return False
    d = x.device
    for t in required:
        if not isinstance(t, torch.Tensor) or t.device != d:
            return False
    for t in optional:
        if t is not None and (not isinstance(t, torch.Tensor) or t.device != d):
            return False
    return True


def _devices(op: str, **tensors: torch.Tensor | None) -> None:
    devs = {t.device for t in tensors.values() if t is not None}
    if len(devs) <= 1:
        return
    ref = None
    for name, t in tensors.items():
        if t is None:
            continue
        if ref is None:
            ref = (name, t.device)
        elif t.device != ref[1]:
            raise RuntimeError(
                f"sdkern.{op}: {name} is on {t.device} but {ref[0]} is on {ref[1]}; all tensors must share a device"
            )


def _last_dim_contiguous(name: str, t: torch.Tensor, op: str) -> None:
    if t.is_contiguous():
        return
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"sdkern.{op}: {name} must have a contiguous last dimension (stride {t.stride(-1)})")


def check_group_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float, op: str = "group_norm"
) -> None:
    if not _same_device(x, gamma, beta):
        _tensors(op, x=x, gamma=gamma, beta=beta)
        _devices(op, x=x, gamma=gamma, beta=beta)
    _dtype("x", x, op)
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
        _param_dtype(name, t, x, op)
        _vector(name, t, c, op)


def check_skip_group_norm(
    x: torch.Tensor,
    skip: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    groups: int,
    eps: float,
) -> None:
    op = "skip_group_norm"
    check_group_norm(x, gamma, beta, groups, eps, op)
    if not _same_device(x, skip, optional=(bias,)):
        _tensors(op, skip=skip)
        _optional_tensors(op, bias=bias)
        _devices(op, x=x, skip=skip, bias=bias)
    _same_dtype("skip", skip, x, op)
    n, c, h, w = x.shape
    ok = tuple(skip.shape) in ((n, c, h, w), (n, c, 1, 1), (n, c))
    if not ok:
        raise ValueError(
            f"sdkern.{op}: skip must have shape {[n, c, h, w]}, {[n, c, 1, 1]} or {[n, c]}, got {list(skip.shape)}"
        )
    if bias is not None:
        _param_dtype("bias", bias, x, op)
        _vector("bias", bias, c, op)


def check_bias_split_gelu(x: torch.Tensor, bias: torch.Tensor) -> None:
    op = "bias_split_gelu"
    if not _same_device(x, bias):
        _tensors(op, x=x, bias=bias)
        _devices(op, x=x, bias=bias)
    _dtype("x", x, op)
    if x.dim() < 1:
        raise ValueError(f"sdkern.{op}: x must have at least one dimension")
    two_d = x.shape[-1]
    if two_d % 2 != 0:
        raise ValueError(f"sdkern.{op}: the last dimension of x must be even (2*D), got {two_d}")
    _param_dtype("bias", bias, x, op)
    _vector("bias", bias, two_d, op)
    _last_dim_contiguous("x", x, op)


def check_skip_layer_norm(
    x: torch.Tensor,
    skip: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> None:
    op = "skip_layer_norm"
    if not _same_device(x, gamma, optional=(skip, beta, bias)):
        _tensors(op, x=x, gamma=gamma)
        _optional_tensors(op, skip=skip, beta=beta, bias=bias)
        _devices(op, x=x, skip=skip, gamma=gamma, beta=beta, bias=bias)
    _dtype("x", x, op)
    if x.dim() < 1:
        raise ValueError(f"sdkern.{op}: x must have at least one dimension")
    if skip is not None:
        _same_dtype("skip", skip, x, op)
        if skip.shape != x.shape:
            raise ValueError(f"sdkern.{op}: skip must have the shape of x {list(x.shape)}, got {list(skip.shape)}")
    c = x.shape[-1]
    for name, t in (("gamma", gamma), ("beta", beta), ("bias", bias)):
        if t is not None:
            _param_dtype(name, t, x, op)
            _vector(name, t, c, op)
    if not eps >= 0.0:
        raise ValueError(f"sdkern.{op}: eps must be >= 0, got {eps}")
    _last_dim_contiguous("x", x, op)
    if skip is not None:
        _last_dim_contiguous("skip", skip, op)


def check_bias_add(x: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor) -> None:
    op = "bias_add"
    if not _same_device(x, bias, skip):
        _tensors(op, x=x, bias=bias, skip=skip)
        _devices(op, x=x, bias=bias, skip=skip)
    _dtype("x", x, op)
    if x.dim() < 1:
        raise ValueError(f"sdkern.{op}: x must have at least one dimension")
    _same_dtype("skip", skip, x, op)
    if skip.shape != x.shape:
        raise ValueError(f"sdkern.{op}: skip must have the shape of x {list(x.shape)}, got {list(skip.shape)}")
    _param_dtype("bias", bias, x, op)
    _vector("bias", bias, x.shape[-1], op)
    _last_dim_contiguous("x", x, op)
    _last_dim_contiguous("skip", skip, op)


def check_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool = False
) -> None:
    op = "attention"
    if not _same_device(q, k, v):
        _tensors(op, q=q, k=k, v=v)
        _devices(op, q=q, k=k, v=v)
    _dtype("q", q, op)
    _same_dtype("k", k, q, op)
    _same_dtype("v", v, q, op)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"sdkern.{op}: {name} must be 4-D (B, S, H, D), got shape {list(t.shape)}")
        _last_dim_contiguous(name, t, op)
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"sdkern.{op}: k must have shape (B={b}, Sk, H={h}, D={d}) to match q, got {list(k.shape)}")
    if v.shape[0] != b or v.shape[1] != k.shape[1] or v.shape[2] != h:
        raise ValueError(f"sdkern.{op}: v must have shape (B={b}, Sk={k.shape[1]}, H={h}, Dv), got {list(v.shape)}")
    if d == 0 or v.shape[3] == 0:
        raise ValueError(f"sdkern.{op}: head dims must be positive (D={d}, Dv={v.shape[3]})")
    if k.shape[1] == 0:
        raise ValueError(f"sdkern.{op}: k/v must have at least one key (Sk=0)")
    if scale is not None and not (scale == scale):  # NaN
        raise ValueError(f"sdkern.{op}: scale must be a number, got {scale}")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(
            f"sdkern.{op}: causal attention needs Sq <= Sk (query i sees keys j <= i + Sk - Sq, bottom-right "
            f"aligned), got Sq={q.shape[1]} > Sk={k.shape[1]}"
        )
