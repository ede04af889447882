"""Implementation chains: which implementation runs an op on a device, with logged fallbacks.

Each device type has an ordered list of :class:`Impl`. An implementation either cannot be used at
all (``unavailable()`` returns the reason: not built, package missing) or refuses one call by raising
``NotImplementedError`` with the reason; the next one is tried and the fallback is logged once per
(op, device, implementation). When nothing can run, ``RuntimeError`` lists every reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("sdkern")

_logged: set[tuple[str, ...]] = set()


def log_once(key: tuple[str, ...], msg: str, *args: Any, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


@dataclass(frozen=True)
class Impl:
    """One implementation of an op for one device type."""

    name: str
    fn: Callable[..., Any]
    unavailable: Callable[[], str | None] = lambda: None


_CUDA_IMPLS = ("triton", "cuda")
_cuda_order: list[str] = []


#: the preferred CUDA implementation of the code running now (a patched model's forward), or None: the process's
_scoped: ContextVar[str | None] = ContextVar("sdkern_cuda_impl", default=None)


def cuda_impl_order() -> list[str]:
    """Preferred CUDA implementations, first to last, for the code running now.

    Inside :func:`preferring` (a model patched with ``backend="triton"`` / ``"cuda"`` runs its forward there), that
    preference; otherwise the process-wide one (``SDKERN_CUDA_IMPL`` or :func:`set_cuda_impl`).
    """
    if not _cuda_order:
        set_cuda_impl(os.environ.get("SDKERN_CUDA_IMPL", "triton"))
    first = _scoped.get()
    if first is not None:
        return [first] + [n for n in _CUDA_IMPLS if n != first]
    return list(_cuda_order)


def set_cuda_impl(name: str) -> None:
    """Choose the process-wide preferred CUDA implementation: ``"triton"`` (default) or ``"cuda"`` (CUDA C++).

    The other one stays as the fallback, then the PyTorch reference. Code inside :func:`preferring` keeps its own.
    """
    if name not in _CUDA_IMPLS:
        raise ValueError(f"SDKERN_CUDA_IMPL must be one of {_CUDA_IMPLS}, got {name!r}")
    _cuda_order[:] = [name] + [n for n in _CUDA_IMPLS if n != name]


@contextlib.contextmanager
def preferring(name: str) -> Iterator[None]:
    """Prefer the CUDA implementation ``name`` for the calls made inside this block (this thread or task only)."""
    if name not in _CUDA_IMPLS:
        raise ValueError(f"the CUDA implementation must be one of {_CUDA_IMPLS}, got {name!r}")
    token = _scoped.set(name)
    try:
        yield
    finally:
        _scoped.reset(token)


def resolve(impls: list[Impl]) -> list[tuple[Impl, str | None]]:
    """Pair each implementation with the reason it cannot be used at all (None: usable).

    Availability (module built, package importable) does not change during a process, so callers
    resolve a chain once and reuse it with :func:`run_chain`.
    """
    return [(impl, impl.unavailable()) for impl in impls]


def run_chain(
    op: str,
    device: str,
    impls: list[Impl] | list[tuple[Impl, str | None]],
    *args: Any,
    start: int = 0,
    reasons: list[str] | None = None,
) -> Any:
    """Run the first implementation that accepts the call; log fallbacks once; raise with every reason.

    ``start`` and ``reasons`` let a caller that already tried ``impls[:start]`` (and collected why
    they declined) continue the chain without running them again.
    """
    reasons = [] if reasons is None else reasons
    for entry in impls[start:]:
        impl, why = entry if isinstance(entry, tuple) else (entry, entry.unavailable())
        if why is None:
            try:
                out = impl.fn(*args)
            except NotImplementedError as e:
                why = str(e) or "unsupported input"
            else:
                if reasons:
                    log_once(
                        ("fallback", op, device, impl.name),
                        "sdkern.%s on %s: using %s (%s)",
                        op,
                        device,
                        impl.name,
                        "; ".join(reasons),
                    )
                return out
        reasons.append(f"{impl.name}: {why}")
    raise RuntimeError(f"sdkern.{op} on {device}: no implementation can run: " + "; ".join(reasons))
