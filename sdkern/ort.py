"""The ONNX Runtime custom-op library (libsdkern_ort.so) shipped inside the package."""

from __future__ import annotations

import sys
from pathlib import Path

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
