"""sdkern: fused kernels and a pipeline rewriter that make Stable Diffusion inference fast.

``import sdkern`` needs only torch: no GPU, Triton, ONNX Runtime or diffusers. Optional features
import their packages when first used.
"""

from __future__ import annotations

import logging

from sdkern import ops
from sdkern._version import __version__
from sdkern.info import info

logging.getLogger("sdkern").addHandler(logging.NullHandler())

__all__ = ["__version__", "info", "ops"]
