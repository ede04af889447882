"""The ONNX Runtime custom-op library (libsdkern_ort.so) shipped inside the package.

onnxruntime is imported only when :func:`session_options` is called.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("sdkern")

_NAMES = {"linux": "libsdkern_ort.so", "darwin": "libsdkern_ort.dylib", "win32": "sdkern_ort.dll"}


def library_path() -> Path:
    """Path of the custom-op library.

    Raises
    ------
    FileNotFoundError
        When the package was built without ONNX Runtime headers.
    """
    name = _NAMES.get(sys.platform, "libsdkern_ort.so")
    # Every directory of the package: in an editable install the built files live apart from the sources.
    import sdkern

    for d in sdkern.__path__:
        path = Path(d) / name
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"{name} was not built (no ONNX Runtime headers at build time; set SDKERN_ORT_INCLUDE_DIR and reinstall)"
    )


def session_options(so: Any = None, *, log_severity_level: int | None = None) -> Any:
    """SessionOptions with sdkern's custom-op library (domain ``sdkern``) registered.

    Parameters
    ----------
    so : onnxruntime.SessionOptions, optional
        Options to register the library on (modified in place and returned); a new one when None.
        Register the library once per options object.
    log_severity_level : int, optional
        Sets ``so.log_severity_level`` when given.

    Returns
    -------
    onnxruntime.SessionOptions
        ``so`` (or the new options) with the library registered.

    Raises
    ------
    FileNotFoundError
        When the package was built without the ORT library (see :func:`library_path`).
    ImportError
        When onnxruntime is not installed.
    """
    import onnxruntime as ort

    if so is None:
        so = ort.SessionOptions()
    if log_severity_level is not None:
        so.log_severity_level = log_severity_level
    so.register_custom_ops_library(str(library_path()))
    logger.debug("registered %s", library_path())
    return so
