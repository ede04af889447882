"""ONNX path: export, fusion into sdkern / com.microsoft ops, the optimised pipeline directory
(``sdkern optimize``) and running it with ONNX Runtime.

Importing this package needs ``onnx`` (``import sdkern`` does not: ``sdkern.onnx`` is loaded lazily).
"""

from __future__ import annotations

from sdkern.apps.onnx.build import clean_cache, optimize_pipeline
from sdkern.apps.onnx.convert import CONTRIB_OPS, DEFAULT_OPS, SDKERN_DOMAIN, convert_contrib, count_ops
from sdkern.apps.onnx.pipeline import OrtStableDiffusionPipeline, session_options
from sdkern.apps.onnx.unet import OrtUNet

__all__ = [
    "CONTRIB_OPS",
    "DEFAULT_OPS",
    "SDKERN_DOMAIN",
    "OrtStableDiffusionPipeline",
    "OrtUNet",
    "clean_cache",
    "convert_contrib",
    "count_ops",
    "optimize_pipeline",
    "session_options",
]
