"""Process-wide tuning of glibc's malloc for CPU inference.

PyTorch's CPU allocator is plain ``posix_memalign``/``free``. With glibc's defaults, a freed block at
the top of the heap beyond the (dynamic) trim threshold goes back to the kernel, and blocks above the
(dynamic, at most 32 MiB) mmap threshold are mapped and unmapped per allocation. A diffusion step
allocates and frees the same multi-megabyte activations every step, so the process keeps handing
memory back and faulting it in again: measured on the dev VM, an SD1.5-architecture U-Net step at
32x32 latents, batch 2, fp32, took 2.73 s eager by default and 1.83 s with freed memory kept
(``benchmarks/unet_cpu.py [--tune-malloc]``; bf16 steps did not change). A single sdkern op call could
take 1303 minor page faults in one process and 62 in the next, depending only on where glibc's dynamic
thresholds had drifted.

:func:`tune_cpu_allocator` sets fixed thresholds (the same effect as jemalloc/tcmalloc or the
``MALLOC_*_`` environment variables, but callable at run time): allocations come from the heap, and
freed memory stays in the process for the next step. The cost is that the process's resident size
stays at its peak. ``sdkern bench`` and ``sdkern generate`` call it on CPU unless told not to
(``--no-malloc-tuning`` or ``SDKERN_MALLOC_TUNING=0``); the library itself never calls it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from dataclasses import dataclass, field

log = logging.getLogger("sdkern")

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

ENV_SWITCH = "SDKERN_MALLOC_TUNING"


@dataclass(frozen=True)
class AllocatorTuning:
    """What :func:`tune_cpu_allocator` did.

    Attributes
    ----------
    applied : bool
        True when every setting was accepted by the C library.
    reason : str
        Why nothing (or not everything) was applied; empty when ``applied``.
    settings : dict[str, int]
        The ``mallopt`` settings that were accepted (name -> value).
    """

    applied: bool
    reason: str = ""
    settings: dict[str, int] = field(default_factory=dict)


_done: AllocatorTuning | None = None


def _libc_mallopt() -> tuple[object | None, str]:
    if not sys.platform.startswith("linux"):
        return None, f"not Linux ({sys.platform})"
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return None, f"C library is {libc_name or 'unknown'}, not glibc"
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        return None, f"mallopt not available ({e})"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt, ""


def tune_cpu_allocator(
    *, trim_threshold: int = 1 << 30, top_pad: int = 64 << 20, use_mmap: bool = False
) -> AllocatorTuning:
    """Keep freed memory in the process (glibc only; a no-op elsewhere).

    Parameters
    ----------
    trim_threshold : int
        Free memory at the top of the heap is returned to the kernel only beyond this many bytes
        (glibc's default is dynamic, 128 KiB to 64 MiB). Default 1 GiB.
    top_pad : int
        Extra bytes requested each time the heap grows (default 64 MiB: fewer, larger ``brk`` calls).
    use_mmap : bool
        Keep serving large requests with ``mmap`` (False, the default, sets ``M_MMAP_MAX`` to 0 so
        that blocks above 32 MiB are reused too instead of being mapped and faulted in per call).

    Returns
    -------
    AllocatorTuning
        What was applied. Calling again returns the first call's result without changing anything.
    """
    global _done
    for name, value in (("trim_threshold", trim_threshold), ("top_pad", top_pad)):
        if not 0 <= value < 2**31:
            raise ValueError(f"{name} must be in [0, 2**31) bytes (mallopt takes an int), got {value}")
    if _done is not None:
        return _done
    mallopt, why = _libc_mallopt()
    if mallopt is None:
        _done = AllocatorTuning(False, why)
        log.info("CPU allocator left as is: %s", why)
        return _done
    wanted = {"M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, trim_threshold), "M_TOP_PAD": (M_TOP_PAD, top_pad)}
    if not use_mmap:
        wanted["M_MMAP_MAX"] = (M_MMAP_MAX, 0)
    accepted: dict[str, int] = {}
    refused: list[str] = []
    for name, (param, value) in wanted.items():
        if mallopt(param, value) == 1:
            accepted[name] = value
        else:
            refused.append(name)
    reason = f"mallopt refused {', '.join(refused)}" if refused else ""
    _done = AllocatorTuning(not refused, reason, accepted)
    log.info("CPU allocator tuned (glibc mallopt): %s%s", accepted, f" ({reason})" if reason else "")
    return _done


def tuning_enabled(flag_off: bool = False) -> bool:
    """Whether a command should tune the allocator: not when ``--no-malloc-tuning`` was given or
    ``SDKERN_MALLOC_TUNING`` is ``0``/``off``/``false``/``no``."""
    if flag_off:
        return False
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def release_free_memory() -> int:
    """Hand the free memory the process holds back to the kernel (glibc ``malloc_trim(0)``; a no-op elsewhere).

    With :func:`tune_cpu_allocator` freed blocks stay in the process on purpose (the next step reuses them), so a
    process that is done with a large model -- ``sdkern bench`` between engines: an ONNX Runtime session holds
    ~9 GB for the fp32 SD1.5 U-Net -- would keep that memory resident until it exits. This runs the garbage
    collector (so that unreachable tensors and sessions are freed first) and asks glibc to return every whole
    free page of its heaps.

    Returns
    -------
    int
        The resident set size given back, in bytes (0 when unknown or nothing was released).
    """
    import gc

    gc.collect()
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return 0
    before = _rss_bytes()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError) as e:
        log.info("malloc_trim not available (%s)", e)
        return 0
    after = _rss_bytes()
    return max(before - after, 0) if before and after else 0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
