"""Shared launcher helpers for the Triton kernels: interpreter detection, device checks, config keys."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["arch_key", "check_device", "interpreting", "next_pow2", "num_sms", "to_dtype"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(op: str, t: torch.Tensor) -> None:
    """Raise ``NotImplementedError`` (so the op falls back) when ``t`` cannot run through Triton.

    CUDA tensors run compiled; CPU tensors only under the interpreter.
    """
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise NotImplementedError(f"sdkern.triton.{op}: tensors on {t.device} need CUDA (or CPU with TRITON_INTERPRET=1)")


def arch_key(t: torch.Tensor) -> str:
    """Config key of the device ``t`` lives on: ``"interp"``, ``"sm80"`` (Ampere/Ada) or ``"sm90"`` (Hopper+)."""
    if t.device.type != "cuda":
        return "interp"
    major, _minor = torch.cuda.get_device_capability(t.device)
    return "sm90" if major >= 9 else "sm80"


_SMS: dict[int, int] = {}


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s device (a fixed 8 under the interpreter)."""
    if t.device.type != "cuda":
        return 8
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


# The Triton 3.9 interpreter truncates fp32 -> bf16 (compiled code rounds to nearest even).
_MANUAL_BF16_RNE = tl.constexpr(interpreting())


@triton.jit
def to_dtype(y, ptr):
    """fp32 ``y`` converted to ``ptr``'s element type, rounding to nearest even on every backend."""
    if _MANUAL_BF16_RNE and ptr.dtype.element_ty == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(ptr.dtype.element_ty)
