"""Glue between torch tensors and the pointer-based native launchers (sdkern._C, sdkern._C_cuda).

Both extension modules expose the same functions with the same positional arguments; the CUDA one
takes the stream handle (and, for the group norms, a workspace pointer) as trailing arguments.
Status codes come back as exceptions: ValueError (invalid argument), NotImplementedError
(unsupported here: the caller falls back), RuntimeError (device error). Each op's ``launch``
(``sdkern/ops/<op>.py``) takes already-validated arguments, allocates the outputs (and the CUDA
workspace) with torch's allocator and calls its launcher with the helpers below; the launchers
release the GIL and re-validate sizes on the C++ side.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from sdkern.ops._layout import rows

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def load(name: str) -> ModuleType | None:
    """Import ``sdkern.<name>`` once; None (with the reason in :func:`load_error`) when unavailable."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"sdkern.{name}")
        except ImportError as e:  # not built, or built against a missing runtime library
            _modules[name] = None
            _errors[name] = f"sdkern.{name} is not importable ({e})"
    return _modules[name]


def load_error(name: str) -> str:
    return _errors.get(name, "")


def code(t: torch.Tensor) -> int:
    """The launchers' dtype code of t (0 fp32, 1 fp16, 2 bf16)."""
    return DTYPE_CODE[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer, 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def stream(x: torch.Tensor) -> tuple[int, ...]:
    """Trailing stream argument: () on CPU, (cuda_stream,) on CUDA."""
    if x.is_cuda:
        return (torch.cuda.current_stream(x.device).cuda_stream,)
    return ()


def group_norm_workspace(mod: ModuleType, x: torch.Tensor, n: int, c: int, p: int, groups: int) -> torch.Tensor | None:
    """Workspace of the CUDA group norms (allocated by torch on the current stream, no sync); None on CPU.

    The caller keeps the tensor referenced until the launcher has returned (the kernels are then
    enqueued on the stream it was allocated on), so the memory is not handed to another allocation
    before they run -- with the caching allocator and with ``cudaMallocAsync`` alike.
    """
    if not x.is_cuda:
        return None
    nbytes = mod.group_norm_workspace_bytes(n, c, p, groups)
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)


def workspace_arg(ws: torch.Tensor | None) -> tuple[int, ...]:
    """Trailing workspace pointer argument: () on CPU."""
    return () if ws is None else (ws.data_ptr(),)


def like(t: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """Bring an optional parameter to ref's dtype (the launchers read all parameters in one dtype)
    and make it contiguous (the launchers read parameter vectors [C] densely from data_ptr())."""
    if t is None:
        return t
    if t.dtype != ref.dtype:
        t = t.to(ref.dtype)
    return t if t.is_contiguous() else t.contiguous()


def vec(t: torch.Tensor) -> torch.Tensor:
    """A parameter vector [C] the launchers can read densely: strided or stride-0 (expanded) vectors
    are copied (C elements: cheap); contiguous ones are passed as they are."""
    return t if t.is_contiguous() else t.contiguous()


def launch_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """:func:`sdkern.ops._layout.rows`, with overlapping rows (row stride < C, e.g. an expanded row)
    copied: the launchers require rows at least C apart."""
    t2, m, rs = rows(t)
    if m > 1 and rs < t.shape[-1]:
        t2 = t2.contiguous()
        rs = t2.stride(0)
    return t2, m, rs
