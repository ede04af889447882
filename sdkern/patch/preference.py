"""``PatchConfig.backend="triton"`` / ``"cuda"``: the CUDA implementation preference, held while a model is patched.

The op dispatcher (:mod:`sdkern.ops`) keeps one CUDA preference per process (``sdkern.ops.set_cuda_impl``,
``sdkern.ops.cuda_impl_order``). A patch with one of these backends takes a *hold* on it and :func:`sdkern.unpatch`
releases the hold, so the preference lasts exactly as long as the model stays patched:

- while holds exist, the preference of the most recent one still held is in effect;
- when the last hold is released, the preference from before the first one comes back (or, when the preference was
  changed by ``set_cuda_impl`` while held, that choice stays).

The dispatcher has no per-call preference, so two models patched at once with different preferences share the most
recent one (a warning says so) — the preference is scoped to the patched lifetime, not to the model's own calls.
"""

from __future__ import annotations

import itertools
import logging
import threading

__all__ = ["PREFERENCES", "hold", "holding", "release"]

logger = logging.getLogger("sdkern")

#: backends that name a CUDA implementation preference (the others leave the dispatcher's order alone)
PREFERENCES = ("triton", "cuda")

_lock = threading.Lock()
_tokens = itertools.count(1)
_held: list[tuple[int, str]] = []  # (token, preferred implementation), oldest first
_base: str | None = None  # the preference before the first hold
_applied: str | None = None  # the preference the holds last set


def _current() -> str:
    from sdkern.ops import cuda_impl_order

    return cuda_impl_order()[0]


def _apply(name: str) -> None:
    global _applied
    from sdkern.ops import set_cuda_impl

    set_cuda_impl(name)
    _applied = name


def hold(backend: str) -> int | None:
    """Make ``backend``'s CUDA implementation the preferred one until :func:`release` of the returned token.

    Parameters
    ----------
    backend : str
        A ``PatchConfig.backend``; only ``"triton"`` and ``"cuda"`` take a hold.

    Returns
    -------
    int or None
        The token to release, or None when ``backend`` names no preference.
    """
    global _base
    if backend not in PREFERENCES:
        return None
    with _lock:
        current = _current()
        if not _held or current != _applied:  # first hold, or set_cuda_impl was called meanwhile: remember it
            _base = current
        if _held and _held[-1][1] != backend:
            logger.warning(
                "sdkern.patch: backend=%r while a model patched with backend=%r is still patched; the CUDA "
                "implementation preference is process-wide, so %r now applies to both until one is unpatched",
                backend,
                _held[-1][1],
                backend,
            )
        token = next(_tokens)
        _held.append((token, backend))
        _apply(backend)
    return token


def release(token: int | None) -> None:
    """Drop the hold ``token`` (None: nothing) and restore the preference it covered (see the module docstring)."""
    global _base, _applied
    if token is None:
        return
    with _lock:
        if not any(t == token for t, _ in _held):
            return
        _held[:] = [(t, b) for t, b in _held if t != token]
        current = _current()
        if current != _applied:  # set_cuda_impl was called while held: that choice stays
            _base = current
        if _held:
            _apply(_held[-1][1])
        else:
            if _base is not None:
                _apply(_base)
            _base = _applied = None


def holding() -> list[str]:
    """The backends of the holds in effect, oldest first (for tests and ``sdkern info``)."""
    with _lock:
        return [b for _, b in _held]
