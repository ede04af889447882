"""Timing and peak-memory measurement for bench runs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:
        try:
            with open(f"/proc/{os.getpid()}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return None


def _nvml_used_bytes(index: int) -> int | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


@dataclass
class MemoryPeak:
    """Peak memory of one measured call, in MB (``None`` where a source is unavailable).

    Attributes
    ----------
    rss_mb : float or None
        Peak resident set size of this process (sampled every few ms).
    cuda_mb : float or None
        Peak of the CUDA caching allocator (``torch.cuda.max_memory_allocated``).
    nvml_mb : float or None
        Peak device memory in use as NVML reports it (all processes), when pynvml is present.
    """

    rss_mb: float | None = None
    cuda_mb: float | None = None
    nvml_mb: float | None = None

    def headline(self, device: torch.device) -> float | None:
        """The figure of the ``*_memory_MB`` columns: CUDA allocator peak on CUDA, RSS peak elsewhere."""
        if device.type == "cuda":
            return self.cuda_mb
        return self.rss_mb


class MemoryMonitor:
    """Context manager sampling process RSS (and NVML) in a thread; CUDA peak from the allocator."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.result = MemoryPeak()
        self._stop = threading.Event()
        self._rss = 0
        self._nvml = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        index = self.device.index or 0
        while True:
            rss = _rss_bytes()
            if rss is not None:
                self._rss = max(self._rss, rss)
            if self.device.type == "cuda":
                used = _nvml_used_bytes(index)
                if used is not None:
                    self._nvml = max(self._nvml, used)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> MemoryMonitor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.cuda_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss = _rss_bytes()
        if rss is not None:
            self._rss = max(self._rss, rss)
        self.result.rss_mb = self._rss / 2**20 if self._rss else None
        self.result.nvml_mb = self._nvml / 2**20 if self._nvml else None


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimedCall:
    """One timed pipeline call."""

    seconds: float
    output: Any
    memory: MemoryPeak
    step_times: list[float]


def timed_call(fn: Callable[[Callable[..., Any]], Any], device: torch.device) -> TimedCall:
    """Time ``fn(step_callback)`` end to end with peak memory, recording per-step timestamps.

    ``fn`` receives a ``callback_on_step_end``-compatible function; the timestamps it records give the
    denoising-loop time without text encoding and VAE decoding.
    """
    stamps: list[float] = []

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        synchronize(device)
        stamps.append(time.perf_counter())
        return kwargs

    with MemoryMonitor(device) as mon:
        synchronize(device)
        t0 = time.perf_counter()
        out = fn(on_step)
        synchronize(device)
        seconds = time.perf_counter() - t0
    return TimedCall(seconds, out, mon.result, [t0, *stamps])


def unet_steps_per_s(step_times: list[float]) -> float | None:
    """Denoising steps per second from step timestamps, skipping the first step (text encoding is in it)."""
    if len(step_times) < 3:
        return None
    span = step_times[-1] - step_times[1]
    return (len(step_times) - 2) / span if span > 0 else None
