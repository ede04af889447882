"""sdkern: fused kernels and a pipeline rewriter that make Stable Diffusion inference fast.

``import sdkern`` needs only torch: no GPU, Triton, ONNX Runtime or diffusers. Features that need
those packages are imported lazily, on first attribute access.

The package is the kernel library (``ops``, ``triton``, ``patch``, ``runtime``, ``lora``, ``deepcache``,
``ort``, ``info``); the tools built on it (command line, bench, generate, serve, ONNX export, model presets)
are in :mod:`sdkern.apps`, also importable by their earlier paths ``sdkern.<tool>`` (:mod:`sdkern._aliases`).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any


def _use_installed_binaries() -> None:
    """Let a source checkout imported ahead of an installed sdkern (``python -m pytest`` in the repository after
    ``pip install .``) load the compiled modules and the ORT library from the installed copy: its directory is
    appended to ``__path__`` when this one has no ``_C`` (an editable install needs none of this)."""
    import glob
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if glob.glob(os.path.join(here, "_C.*")):
        return
    for entry in sys.path:
        d = os.path.abspath(os.path.join(entry or os.curdir, "sdkern"))
        if d != here and d not in __path__ and glob.glob(os.path.join(d, "_C.*")):
            __path__.append(d)


_use_installed_binaries()

from sdkern import _aliases, ops  # noqa: E402
from sdkern._version import __version__  # noqa: E402
from sdkern.info import info  # noqa: E402

logging.getLogger("sdkern").addHandler(logging.NullHandler())
_aliases.install()

# name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "patch": ("sdkern.patch", "patch"),
    "unpatch": ("sdkern.patch", "unpatch"),
    "patch_report": ("sdkern.patch", "patch_report"),
    "PatchConfig": ("sdkern.patch", "PatchConfig"),
    "DeepCacheConfig": ("sdkern.deepcache", "DeepCacheConfig"),
    "deepcache": ("sdkern.deepcache", None),
    "lora": ("sdkern.lora", None),
    "models": ("sdkern.apps.models", None),
    "onnx": ("sdkern.apps.onnx", None),
    "ort": ("sdkern.ort", None),
    "runtime": ("sdkern.runtime", None),
}

__all__ = ["__version__", "info", "ops", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'sdkern' has no attribute {name!r}")
