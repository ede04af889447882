"""Which denoising steps run the full U-Net: :class:`DeepCacheConfig` and the uniform, non-uniform and
quad-center schedules."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

_SCHEDULES = ("uniform", "non-uniform", "quad-center")


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache settings.

    Attributes
    ----------
    interval : int
        Mean number of steps per full U-Net pass (1 disables caching).
    layer_id : int
        Index of the down block whose level forms the shallow branch (0 = shallowest).
    block_id : int
        Sub-blocks ``0..block_id`` of that down block run on shallow steps (0 = fastest). ``block_id`` equal
        to the number of sub-blocks ``m`` is the authors' whole level: the downsampler runs too (see the module
        docstring); it needs a deeper level.
    schedule : {"uniform", "non-uniform", "quad-center"}
        ``"uniform"``: full passes every ``interval`` steps. ``"non-uniform"``: sdkern's, denser near the start
        (``power``). ``"quad-center"``: the authors' non-uniform schedule, ``ceil(steps / interval)`` full steps
        sampled quadratically around step ``center`` (their ``sample_from_quad_center`` with ``pow=power``; see
        :func:`quad_center_steps`). The non-uniform schedules need the step count, taken from the scheduler's
        ``set_timesteps`` and ``set_begin_index``.
    power : float
        Exponent of the non-uniform schedules: sdkern's (> 1 moves full passes towards the start), or the authors'
        ``pow`` (the starting exponent; lowered in 0.02 steps until the sampling gives the wanted count).
    center : int, optional
        Step around which ``"quad-center"`` samples densest (the authors' ``center``); required for it.
    """

    interval: int = 3
    layer_id: int = 0
    block_id: int = 0
    schedule: str = "uniform"
    power: float = 1.4
    center: int | None = None

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"DeepCacheConfig.interval must be >= 1, got {self.interval}")
        if self.layer_id < 0 or self.block_id < 0:
            raise ValueError("DeepCacheConfig.layer_id and block_id must be >= 0")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"DeepCacheConfig.schedule must be one of {', '.join(_SCHEDULES)}, got {self.schedule!r}")
        if not self.power > 0:
            raise ValueError(f"DeepCacheConfig.power must be > 0, got {self.power}")
        if self.schedule == "quad-center" and self.center is None:
            raise ValueError("DeepCacheConfig(schedule='quad-center') needs center (the step sampled densest)")
        if self.center is not None and self.center < 0:
            raise ValueError(f"DeepCacheConfig.center must be >= 0, got {self.center}")


def quad_center_steps(num_steps: int, count: int, center: int, power: float) -> tuple[list[int], float]:
    """The authors' non-uniform schedule: ``count`` full-step indices sampled quadratically around ``center``.

    The rule of horseee/DeepCache's ``sample_from_quad_center(num_steps, count, center, pow)``, reproduced exactly:
    ``count + 1`` points evenly spaced between ``(-center) ** (1 / p)`` and ``(num_steps - center) ** (1 / p)``
    (complex when the base is negative, as Python computes it), raised to ``p``, real parts truncated to int32,
    deduplicated and sorted; the first and last are dropped, ``center`` added and step 0 prepended. If that does not
    give ``count`` indices, ``p`` is lowered by 0.02 and the sampling repeated while ``p > 1``.

    Parameters
    ----------
    num_steps : int
        Denoising steps of the generation.
    count : int
        Full steps wanted (the authors use ``ceil(num_steps / interval)``).
    center : int
        Step around which the sampling is densest.
    power : float
        Starting exponent ``p`` (> 1).

    Returns
    -------
    (list of int, float)
        The sorted step indices (with the authors' duplicates, if their rule makes any) and the exponent used.

    Raises
    ------
    ValueError
        No exponent above 1 gives ``count`` indices (the authors raise too).
    """
    import numpy as np

    p = power
    while p > 1:
        lo = (-center) ** (1 / p)  # a complex number for center > 0, as in the authors' code
        hi = (num_steps - center) ** (1 / p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's ComplexWarning when the imaginary parts are dropped
            points = np.linspace(lo, hi, count + 1) ** p
            ints = np.asarray(points).astype(np.int32)
        inner = np.unique(ints)[1:-1]
        indices = [0, *(int(x) + center for x in inner)]
        if len(indices) == count:
            return sorted(indices), p
        p -= 0.02
    raise ValueError(
        f"DeepCache quad-center schedule: no exponent in (1, {power}] gives {count} full steps of {num_steps} "
        f"around center {center}; lower the interval or move the center"
    )


def full_steps(num_steps: int, cfg: DeepCacheConfig) -> set[int]:
    """Indices of the steps that run the full U-Net."""
    if cfg.interval == 1 or num_steps <= 1:
        return set(range(num_steps))
    if cfg.schedule == "uniform":
        return set(range(0, num_steps, cfg.interval))
    k = math.ceil(num_steps / cfg.interval)
    if cfg.schedule == "quad-center":
        assert cfg.center is not None
        return set(quad_center_steps(num_steps, k, cfg.center, cfg.power)[0])
    steps = {min(num_steps - 1, round(num_steps * (i / k) ** cfg.power)) for i in range(k)}
    return steps | {0}
