"""Per-U-Net DeepCache state: step counter, mode of the current call, the deep-feature cache, statistics, and
the hooks a graph runner calls."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sdkern.deepcache.schedule import DeepCacheConfig, full_steps

logger = logging.getLogger("sdkern")


class DeepCacheState:
    """Per-U-Net DeepCache state: step counter, schedule, mode, cache buffer, statistics."""

    def __init__(self, unet: torch.nn.Module, cfg: DeepCacheConfig) -> None:
        self.unet = unet
        self.cfg = cfg
        self.mode = "full"
        self.step = 0
        self.num_steps: int | None = None
        self._full: set[int] | None = None
        self.cache: torch.Tensor | None = None
        self._caches: dict[tuple[Any, ...], torch.Tensor] = {}
        self.driven = False  # True while a graph runner calls before()/after() for us
        self.full_calls = 0
        self.shallow_calls = 0
        self.controlnet_shallow_calls = 0  # ControlNet calls that ran only the consumed blocks
        self.controlnet_skipped = 0  # ControlNet calls skipped (conditioning scale 0 on a shallow step)
        self._last_t: float | None = None
        self._restore: list[tuple[torch.nn.Module, str, Any]] = []

    # schedule ---------------------------------------------------------------------------------
    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation (called by the scheduler hook at every pipeline call)."""
        self.step = 0
        self.num_steps = num_steps
        self._full = full_steps(num_steps, self.cfg) if num_steps else None
        self._last_t = None

    def _is_full(self) -> bool:
        if self.cache is None:
            return True
        if self._full is not None:
            return self.step in self._full
        if self.cfg.schedule != "uniform":
            logger.warning("sdkern deepcache: non-uniform schedule without a step count; using uniform")
        return self.step % self.cfg.interval == 0

    def next_is_full(self, timestep: Any) -> bool:
        """Whether the next U-Net call at ``timestep`` will be a full pass (no state change)."""
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_t is not None and t > self._last_t:
            return True  # a new generation starts: step 0
        return self._is_full()

    def begin_call(self, timestep: Any) -> None:
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_t is not None and t > self._last_t:  # timesteps go down within a generation
            self.reset(self.num_steps)
        self._last_t = t
        self.mode = "full" if self._is_full() else "shallow"
        if self.mode == "full":
            self.full_calls += 1
        else:
            self.shallow_calls += 1

    def end_call(self) -> None:
        self.step += 1

    def store(self, value: torch.Tensor) -> torch.Tensor:
        # One persistent buffer per (shape, dtype, device): a captured shallow graph keeps reading
        # the buffer it was captured with, so buffers are never reallocated.
        key = (tuple(value.shape), value.dtype, value.device)
        buf = self._caches.get(key)
        if buf is None:
            buf = self._caches[key] = torch.empty_like(value)
        buf.copy_(value)
        self.cache = buf
        return value

    # graph-runner hooks (see sdkern.runtime.graphs.CallHooks) --------------------------------
    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.begin_call(timestep)
        return ("deepcache", self.mode)

    def after(self) -> None:
        self.end_call()

    def attach(self, runner: Any) -> None:
        """Let a graph runner drive the step counter: one graph per mode (full / shallow)."""
        runner.hooks = self
        self.driven = True
        runner.invalidate("DeepCache enabled")

    def detach(self, runner: Any) -> None:
        if runner.hooks is self:
            runner.__dict__.pop("hooks", None)
        self.driven = False
