"""The native launch of every op by name: ``_launch.<op>(module, *args)`` is ``SPECS[op].launch``.

The dispatcher reads the launch from here on every call (``sdkern.ops._library``), so wrapping
``_launch.<op>`` (``monkeypatch.setattr``) sees every native launch: the CUDA tests count them to prove
nothing fell back. The names appear on first access; each op defines its launch in ``sdkern/ops/<op>.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def __getattr__(name: str) -> Callable[..., Any]:
    from sdkern.ops._library import SPECS

    spec = SPECS.get(name)
    if spec is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = spec.launch  # a plain module attribute from now on
    return spec.launch
