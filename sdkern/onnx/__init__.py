"""ONNX graph utilities for sdkern's ONNX Runtime custom-op library.

Importing this package needs ``onnx`` (``import sdkern`` does not: ``sdkern.onnx`` is loaded lazily).
"""

from __future__ import annotations

from sdkern.onnx.convert import CONTRIB_OPS, DEFAULT_OPS, SDKERN_DOMAIN, convert_contrib, count_ops

__all__ = ["CONTRIB_OPS", "DEFAULT_OPS", "SDKERN_DOMAIN", "convert_contrib", "count_ops"]
