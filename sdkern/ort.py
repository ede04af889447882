"""The ONNX Runtime custom-op library (libsdkern_ort.so) shipped inside the package.

onnxruntime is imported only when :func:`session_options` is called.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("sdkern")


class OrtLibraryMissing(FileNotFoundError):
    """The package was built without the ONNX Runtime custom-op library (tests that need it skip on this)."""


_NAMES = {"linux": "libsdkern_ort.so", "darwin": "libsdkern_ort.dylib", "win32": "sdkern_ort.dll"}


def library_path() -> Path:
    """Path of the custom-op library.

    Raises
    ------
    OrtLibraryMissing
        (a FileNotFoundError) When the package was built without the library.
    """
    name = _NAMES.get(sys.platform, "libsdkern_ort.so")
    # Every directory of the package: in an editable install the built files live apart from the sources.
    import sdkern

    for d in sdkern.__path__:
        path = Path(d) / name
        if path.is_file():
            return path.resolve()
    raise OrtLibraryMissing(
        f"sdkern's ONNX Runtime library {name} is not in this installation (it is built from the vendored "
        "headers in third_party/onnxruntime-1.21; reinstall sdkern from a complete checkout)"
    )


_WARNED = False


def _warn_wait_policy() -> None:
    """Warn once when sdkern's ORT kernels are told to use OpenMP and its threads would spin beside ORT's pool."""
    global _WARNED
    if _WARNED or os.environ.get("SDKERN_ORT_THREADS", "") != "openmp":
        return
    if os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive":
        return
    _WARNED = True
    logger.warning(
        "SDKERN_ORT_THREADS=openmp: sdkern's ORT ops run on their own OpenMP team next to ONNX Runtime's thread "
        "pool; start the process with OMP_WAIT_POLICY=PASSIVE, or spinning OpenMP threads slow the other ops "
        "down (measured 1.22x on the SD1.5 U-Net, benchmarks/results/cpu_engine_session11.md)"
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

    Notes
    -----
    The CPU kernels run their parallel loops on the session's intra-op thread pool (the custom-op
    API's ``KernelContext_ParallelFor``; each loop split into one piece per CPU the process may run
    on), so ``intra_op_num_threads`` bounds them too and no second team of threads spins beside ORT's.
    ``SDKERN_ORT_THREADS=openmp`` (read once per process) gives them their own OpenMP team instead, for
    comparisons; then set ``OMP_WAIT_POLICY=PASSIVE`` (a warning is logged once otherwise).

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
    _warn_wait_policy()
    so.register_custom_ops_library(str(library_path()))
    logger.debug("registered %s", library_path())
    return so
