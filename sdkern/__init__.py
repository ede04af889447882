"""sdkern: fused kernels and a pipeline rewriter that make Stable Diffusion inference fast.

``import sdkern`` needs only torch: no GPU, Triton, ONNX Runtime or diffusers. Features that need
those packages are imported lazily, on first attribute access.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from sdkern import ops
from sdkern._version import __version__
from sdkern.info import info

logging.getLogger("sdkern").addHandler(logging.NullHandler())

# name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "patch": ("sdkern.patch", "patch"),
    "unpatch": ("sdkern.patch", "unpatch"),
    "patch_report": ("sdkern.patch", "patch_report"),
    "PatchConfig": ("sdkern.patch", "PatchConfig"),
    "DeepCacheConfig": ("sdkern.deepcache", "DeepCacheConfig"),
    "deepcache": ("sdkern.deepcache", None),
    "lora": ("sdkern.lora", None),
    "models": ("sdkern.models", None),
    "onnx": ("sdkern.onnx", None),
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
