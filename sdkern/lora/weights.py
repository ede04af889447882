"""The target layers' weights, read and written in place whether dense or prepacked by the CPU engine."""

from __future__ import annotations

from typing import Any

import torch


def dense_weight(m: torch.nn.Module) -> torch.Tensor:
    """``m.weight``, unpacked when the CPU engine holds it prepacked."""
    return m.dense_weight() if m.weight.is_mkldnn else m.weight


def _shape_of(m: torch.nn.Module) -> torch.Tensor:
    """A storage-free stand-in of ``m.weight`` (its logical shape, dtype and device) for validation."""
    w = m.weight
    if not w.is_mkldnn:
        return w
    return torch.empty(m.__dict__["_sdkern_wshape"], dtype=w.dtype, device="meta")  # CPU engine: packed


def write_weight(m: torch.nn.Module, value: torch.Tensor) -> None:
    """Set ``m.weight`` in place (re-packing it when the CPU engine holds it prepacked)."""
    if m.weight.is_mkldnn:
        from sdkern.patch.cpu_engine import write_weight as write_packed

        write_packed(m, value)
    else:
        with torch.no_grad():
            m.weight.copy_(value)


def _target(pipe: Any, comp: str, path: str) -> torch.nn.Module:
    root = pipe if isinstance(pipe, torch.nn.Module) else getattr(pipe, comp)
    return root.get_submodule(path)
