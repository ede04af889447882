"""Running an exported pipeline directory with ONNX Runtime and sdkern's custom-op library."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("sdkern")


def session_options(so: Any = None) -> Any:
    """``onnxruntime.SessionOptions`` with sdkern's custom-op library registered (once per object)."""
    import onnxruntime as ort

    from sdkern import ort as sdkern_ort

    if hasattr(sdkern_ort, "session_options"):
        return sdkern_ort.session_options(so)
    so = so if so is not None else ort.SessionOptions()
    if not getattr(so, "_sdkern_registered", False):
        so.register_custom_ops_library(str(sdkern_ort.library_path()))
    return so


class OrtStableDiffusionPipeline:
    """Factory for diffusers' ``OnnxStableDiffusionPipeline`` bound to sdkern's ORT library.

    ``from_pretrained(DIR, provider="CPUExecutionProvider")`` loads a directory written by
    ``sdkern optimize`` (or any diffusers ONNX pipeline directory) with SessionOptions that have
    the sdkern custom ops registered, so graphs using the ``sdkern`` domain run on the CPU EP.
    """

    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str],
        provider: str = "CPUExecutionProvider",
        sess_options: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Load the pipeline.

        Parameters
        ----------
        path : directory
            Output of ``sdkern optimize``.
        provider : str
            ONNX Runtime execution provider ("CPUExecutionProvider", "CUDAExecutionProvider",
            "DmlExecutionProvider").
        sess_options : onnxruntime.SessionOptions, optional
            Base options; the sdkern library is registered on them.
        """
        import diffusers

        so = session_options(sess_options)
        pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(
            str(path), provider=provider, sess_options=so, **kwargs
        )
        logger.info("sdkern onnx: loaded %s on %s", path, provider)
        return pipe
