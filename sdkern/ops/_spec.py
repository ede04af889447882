"""What an op's module (``sdkern/ops/<op>.py``) declares, and the argument checks the ops share.

Neutral: imports torch only (no registration, no dispatcher), so the backends (``sdkern.triton``)
use it too. Each ``check`` raises ``TypeError`` (dtype, not a tensor), ``ValueError`` (shape, stride,
value) or ``RuntimeError`` (device) with a message that names the offending argument.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "FLOAT_DTYPES",
    "Backward",
    "OpSpec",
    "at_least_1d",
    "call_validated",
    "devices",
    "first_is_empty",
    "float_dtype",
    "last_dim_contiguous",
    "on_one_device",
    "optional_tensors",
    "param_dtype",
    "same_dtype",
    "tensors",
    "validated_by_caller",
    "vector",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# backward(args, needs, grads) -> one gradient (or None) per tensor argument, see sdkern.ops._autograd.
Backward = Callable[[Sequence[Any], Sequence[bool], Sequence[torch.Tensor | None]], list[torch.Tensor | None]]


def first_is_empty(x: torch.Tensor, *_: Any) -> bool:
    """The default empty-input test: the first argument has no elements."""
    return x.numel() == 0


def _tensor_positions(schema: str) -> tuple[int, ...]:
    """Positions of the Tensor and Tensor? arguments of a schema."""

    def is_tensor(t: torch._C.JitType) -> bool:
        if isinstance(t, torch._C.OptionalType):
            t = t.getElementType()
        return isinstance(t, torch._C.TensorType)

    parsed = torch._C.parse_schema(f"sdkern::{schema}")
    return tuple(i for i, a in enumerate(parsed.arguments) if is_tensor(a.type))


@dataclass(frozen=True)
class OpSpec:
    """One ``torch.ops.sdkern`` operator: everything the registration loop (``_library``) needs.

    Every callable takes the op's positional arguments in schema order (``launch`` takes the extension
    module first); the checks have run before ``outputs``, ``launch`` and ``reference`` are called.

    Attributes
    ----------
    schema : str
        torch.library schema without the namespace, e.g. ``"bias_add(Tensor x, ...) -> Tensor"``.
    check : callable
        Validates the arguments (the one check of a call: fake kernel, every device's kernel).
    outputs : callable
        Empty outputs with the real kernels' shapes, dtypes and strides: the fake (meta) kernel and the
        result of an empty input.
    launch : callable
        ``launch(module, *args)``: the native kernel of ``sdkern._C`` (CPU) / ``sdkern._C_cuda`` (CUDA).
    reference : callable
        The pure-PyTorch definition (:mod:`sdkern.ops.reference`): float64 oracle and any-device fallback.
    is_empty : callable
        True when the call has nothing to compute (then ``outputs`` is the result).
    backward : callable or None
        Closed-form backward; None: the vector-Jacobian product of ``vjp_of`` (default: ``reference``).
    vjp_of : callable or None
        Differentiable function whose vector-Jacobian product is the backward.
    """

    schema: str
    check: Callable[..., None]
    outputs: Callable[..., Any]
    launch: Callable[..., Any]
    reference: Callable[..., Any]
    is_empty: Callable[..., bool] = first_is_empty
    backward: Backward | None = None
    vjp_of: Callable[..., Any] | None = None
    tensor_args: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensor_args", _tensor_positions(self.schema))

    @property
    def name(self) -> str:
        """The op's name (``torch.ops.sdkern.<name>``)."""
        return self.schema[: self.schema.index("(")]


# ---------------------------------------------------------------------------------------------
# One check per call. The dispatcher validates the arguments, then runs the backend inside
# call_validated(); the Triton launchers, which are also public functions called directly (tests,
# benchmarks), validate only when validated_by_caller() is False.
_state = threading.local()


def validated_by_caller() -> bool:
    """True inside :func:`call_validated`: the sdkern dispatcher has already checked this call's arguments."""
    return getattr(_state, "validated", False)


def call_validated(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on arguments the dispatcher has validated (see :func:`validated_by_caller`)."""
    previous = getattr(_state, "validated", False)
    _state.validated = True
    try:
        return fn(*args)
    finally:
        _state.validated = previous


# ---------------------------------------------------------------------------------------------
# shared argument checks
def tensors(op: str, **named: object) -> None:
    """TypeError naming the first argument that is not a tensor (None included)."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sdkern.{op}: {name} must be a tensor, got {type(t).__name__}")


def optional_tensors(op: str, **named: object) -> None:
    """TypeError naming the first optional argument that is neither None nor a tensor."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"sdkern.{op}: {name} must be a tensor or None, got {type(t).__name__}")


def float_dtype(name: str, t: torch.Tensor, op: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sdkern.{op}: {name} has dtype {t.dtype}; expected float32, float16 or bfloat16")


def same_dtype(name: str, t: torch.Tensor, x: torch.Tensor, op: str) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"sdkern.{op}: {name} has dtype {t.dtype}; expected {x.dtype} (the dtype of x)")


def param_dtype(name: str, t: torch.Tensor, x: torch.Tensor, op: str) -> None:
    if t.dtype != x.dtype and t.dtype != torch.float32:
        raise TypeError(f"sdkern.{op}: {name} has dtype {t.dtype}; expected float32 or {x.dtype} (the dtype of x)")


def vector(name: str, t: torch.Tensor, n: int, op: str) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"sdkern.{op}: {name} must have shape [{n}], got {list(t.shape)}")


def on_one_device(x: object, *required: object, optional: tuple[object, ...] = ()) -> bool:
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


def devices(op: str, **named: torch.Tensor | None) -> None:
    """RuntimeError naming the first tensor on another device than the first one given."""
    devs = {t.device for t in named.values() if t is not None}
    if len(devs) <= 1:
        return
    ref = None
    for name, t in named.items():
        if t is None:
            continue
        if ref is None:
            ref = (name, t.device)
        elif t.device != ref[1]:
            raise RuntimeError(
                f"sdkern.{op}: {name} is on {t.device} but {ref[0]} is on {ref[1]}; all tensors must share a device"
            )


def last_dim_contiguous(name: str, t: torch.Tensor, op: str) -> None:
    if t.is_contiguous():
        return
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"sdkern.{op}: {name} must have a contiguous last dimension (stride {t.stride(-1)})")


def at_least_1d(x: torch.Tensor, op: str) -> None:
    if x.dim() < 1:
        raise ValueError(f"sdkern.{op}: x must have at least one dimension")
