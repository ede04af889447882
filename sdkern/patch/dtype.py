"""``PatchConfig(dtype=...)``: run a model in another floating dtype (bf16 on an fp32 pipeline) reversibly.

Every floating parameter and buffer is converted once at patch time (so the CPU engine packs bf16
weights for AMX / AVX-512-BF16 primitives and the fused ops run bf16 end to end, with fp32
accumulation inside each kernel). Calls keep the caller's dtype at the boundary, as autocast would:
floating tensor inputs of ``forward`` with two or more dimensions are cast to the run dtype (0-/1-D
floats such as timesteps are left to the model) and floating tensor outputs back to the dtype the
caller passed. The original tensors are kept (``unpatch`` restores them bit-exactly),
so a converted model holds its original weights plus the converted ones (1.5x for fp32 -> bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["convert"]


def _cast(obj: Any, dtype: torch.dtype, seen: list[torch.dtype] | None = None) -> Any:
    """Floating tensors in ``obj`` (tensors, tuples, lists, dicts, diffusers outputs) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        # 0-/1-D floats are timesteps and scalars: models convert them where needed (diffusers computes
        # the sinusoidal timestep embedding in fp32); a bf16 timestep 673 would round to 672.
        if obj.is_floating_point() and obj.dtype != dtype and obj.dim() >= 2:
            if seen is not None:
                seen.append(obj.dtype)
            return obj.to(dtype)
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cast(v, dtype, seen) for v in obj)
    if isinstance(obj, list):
        return [_cast(v, dtype, seen) for v in obj]
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: _cast(v, dtype, seen) for k, v in obj.items()}
        for k in list(obj.keys()):  # diffusers BaseOutput / transformers ModelOutput: update in place
            obj[k] = _cast(obj[k], dtype, seen)
        return obj
    return obj


def convert(module: nn.Module, dtype: torch.dtype, undo: list[Callable[[], None]]) -> int:
    """Convert ``module``'s floating parameters and buffers to ``dtype`` and cast at its forward boundary.

    Parameters
    ----------
    module : nn.Module
        Converted in place (Parameter objects kept; their ``.data`` is replaced).
    dtype : torch.dtype
        The run dtype (``torch.bfloat16``, ``torch.float16`` or ``torch.float32``).
    undo : list
        Receives the function restoring the original tensors and removing the hooks.

    Returns
    -------
    int
        Number of tensors converted (0: nothing to do, no hooks installed).
    """
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                originals.append((p, p.data))
                p.data = p.data.to(dtype)
        for m in module.modules():
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_floating_point() and b.dtype != dtype:
                    buffers.append((m, name, b))
                    m._buffers[name] = b.to(dtype)
    if not originals and not buffers:
        return 0
    caller: list[list[torch.dtype]] = []  # a stack: nested / re-entrant calls keep their own dtype

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        seen: list[torch.dtype] = []
        args, kwargs = _cast(args, dtype, seen), _cast(kwargs, dtype, seen)
        caller.append(seen)
        return args, kwargs

    def post(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> Any:
        seen = caller.pop() if caller else []
        return _cast(out, seen[0]) if seen else out

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)

    def restore() -> None:
        h1.remove()
        h2.remove()
        with torch.no_grad():
            for p, data in originals:
                p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b

    undo.append(restore)
    return len(originals) + len(buffers)
