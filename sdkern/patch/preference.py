"""``PatchConfig.backend="triton"`` / ``"cuda"``: the CUDA implementation preference of one patched model.

The op dispatcher reads the preferred CUDA implementation per call (:func:`sdkern.ops.cuda_impl_order`): a
context-local preference (:func:`sdkern.ops.preferring`) when one is set, else the process-wide one
(``SDKERN_CUDA_IMPL``, :func:`sdkern.ops.set_cuda_impl`). A model patched with one of these backends gets a
forward pre-hook and an always-called forward hook on its root module (on each patched component of a pipeline)
that set the context-local preference for the duration of that module's own forward calls. So:

- the preference applies to the patched model's calls and nothing else: two models patched with different
  backends each run their own, and code outside them keeps the process-wide preference;
- the process-wide preference is never changed, and :func:`sdkern.unpatch` removes the hooks (:meth:`Scope.remove`);
- calls are scoped per thread (a ``ContextVar``), so two threads running two models do not see each other's.

Autograd's backward pass runs in the engine's own threads, outside the forward's scope: a backward through a patched
model uses the process-wide preference.
"""

from __future__ import annotations

import threading
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["PREFERENCES", "Scope", "scope"]

#: backends that name a CUDA implementation preference (the others leave the dispatcher's order alone)
PREFERENCES = ("triton", "cuda")


@dataclass
class Scope:
    """The hooks that give patched modules their CUDA implementation preference."""

    backend: str
    modules: list[nn.Module]
    _handles: list[Any] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove the hooks (idempotent): the modules' calls use the process-wide preference again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def scope(modules: list[nn.Module], backend: str) -> Scope | None:
    """Make ``modules``' forward calls prefer ``backend``'s CUDA implementation until :meth:`Scope.remove`.

    Parameters
    ----------
    modules : list of nn.Module
        The patched model's root module, or the patched components of a pipeline.
    backend : str
        A ``PatchConfig.backend``; only ``"triton"`` and ``"cuda"`` name a preference.

    Returns
    -------
    Scope or None
        None when ``backend`` names no preference.
    """
    if backend not in PREFERENCES:
        return None
    from sdkern.ops._dispatch import _scoped

    s = Scope(backend, list(modules))
    for m in s.modules:
        tokens = threading.local()  # this module's open calls, per thread (a module may call itself)

        def pre(_mod: nn.Module, _args: Any, tokens: threading.local = tokens) -> None:
            stack: list[Token[str | None]] = tokens.__dict__.setdefault("stack", [])
            stack.append(_scoped.set(backend))

        def post(_mod: nn.Module, _args: Any, _out: Any, tokens: threading.local = tokens) -> None:
            stack = tokens.__dict__.get("stack")
            if stack:
                _scoped.reset(stack.pop())

        s._handles.append(m.register_forward_pre_hook(pre))
        s._handles.append(m.register_forward_hook(post, always_call=True))
    return s
