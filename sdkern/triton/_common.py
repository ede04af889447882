"""Shared launcher helpers for the Triton kernels: interpreter detection, device checks, config keys."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["arch_key", "check_device", "device_guard", "interpreting", "next_pow2", "num_sms", "to_dtype"]

# The Triton kernels are compiled and resource-checked for sm_80 and sm_90 (setup_tools/check_triton.py);
# older GPUs (T4 sm_75, V100 sm_70) take the next implementation instead of failing at compile time.
MIN_CAPABILITY = (8, 0)
_CAPABILITY: dict[int, tuple[int, int]] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(op: str, t: torch.Tensor) -> None:
    """Raise ``NotImplementedError`` (so the op falls back) when ``t`` cannot run through Triton.

    CUDA tensors run compiled; CPU tensors only under the interpreter.
    """
    if t.device.type == "cuda":
        idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
        cap = _CAPABILITY.get(idx)
        if cap is None:
            cap = _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
        if cap < MIN_CAPABILITY:
            raise NotImplementedError(
                f"sdkern.triton.{op}: {t.device} is sm_{cap[0]}{cap[1]}; the Triton kernels need sm_80 or newer"
            )
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise NotImplementedError(f"sdkern.triton.{op}: tensors on {t.device} need CUDA (or CPU with TRITON_INTERPRET=1)")


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current device for a launch (Triton launches on the current device and stream)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


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
