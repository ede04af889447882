"""DeepCache: reuse the U-Net's deep features across denoising steps.

Every ``interval``-th step (or on a non-uniform schedule, denser near the start) runs the full U-Net
and stores the feature that the chosen shallow up-block receives from the deep part. The steps in
between run only the shallow branch — ``conv_in``, the down blocks above ``layer_id``, the first
``block_id + 1`` sub-blocks of down block ``layer_id``, the tail of the matching up block and
``conv_out`` — and take the deep feature from the cache.

It works by giving the skipped sub-modules an instance-level ``forward`` that either runs the
original (full steps) or returns a placeholder / the cached tensor (shallow steps), so diffusers'
own ``UNet2DConditionModel.forward`` still drives the computation, the module tree and state_dict
are untouched, and disabling restores everything. The cache is a persistent buffer written with
``copy_`` so a CUDA-graph runner can capture one graph for the full pass and one for the shallow
pass (the DeepCache mode is part of the graph signature).

Layout of the shallow branch for a U-Net with ``m`` sub-blocks (resnet[+attention]) per down block:
up block ``U = up_blocks[n-1-layer_id]`` has ``m+1`` sub-blocks; its sub-block ``k`` consumes the
residual of down sub-block ``m-1-k``. With down sub-blocks ``0..block_id`` computed, ``U``'s sub-blocks
``k >= m-1-block_id`` can run; the cache is the output of sub-block ``m-2-block_id`` (or the input of
``U`` when ``block_id = m-1``). ``block_id = m`` is the authors' (horseee/DeepCache) "whole level": down level
``layer_id`` including its downsampler runs, and so does the last sub-block of the next deeper up block (the one
that consumes the downsampler's output) with its upsampler; the cache is that sub-block's input. It is the
``(layer_id + 1, -1)`` branch: nothing of level ``layer_id + 1`` runs.

ControlNet pipelines (``pipe.controlnet``, one ControlNetModel or a MultiControlNetModel): on shallow steps the
ControlNet runs only the blocks whose residuals the shallow branch consumes (the same down sub-blocks as the U-Net);
its other residuals and the mid-block residual are left unconsumed (the U-Net's skipped blocks ignore them). When a
shallow step's conditioning scale is 0 (``controlnet_conditioning_scale=0`` or outside ``control_guidance_start/end``)
no residual is consumed at all and the ControlNet is not run; ``(1, 1, 1, 1)`` zeros are returned (they broadcast).
Full steps run everything, bit-identical to the plain pipeline. (Before, a ControlNet pipeline failed on the first
shallow step: the whole ControlNet's deep residuals do not match the shapes of the skipped U-Net blocks' placeholders.)

img2img / inpainting: the pipeline's ``get_timesteps`` (the strength-shortened timesteps) and the scheduler's
``set_begin_index`` are hooked too, so the schedule is laid over the steps that actually run.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("sdkern")

__all__ = [
    "DeepCacheConfig",
    "DeepCacheState",
    "disable",
    "enable",
    "flops_fraction",
    "full_steps",
    "quad_center_steps",
    "state_of",
]

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


# ---- wiring -------------------------------------------------------------------------------------
def _override(state: DeepCacheState, module: torch.nn.Module, fn: Callable[..., Any]) -> None:
    state._restore.append((module, "forward", module.__dict__.get("forward")))
    module.forward = fn


class _Mode:
    """The mode of a ControlNet call ("full" or "shallow"), decided before the U-Net call of the same step."""

    def __init__(self) -> None:
        self.mode = "full"


def _skip_or_run(
    state: DeepCacheState,
    module: torch.nn.Module,
    placeholder: Callable[..., Any],
    cache_point: bool = False,
    mode: DeepCacheState | _Mode | None = None,
) -> None:
    original = module.forward
    holder = state if mode is None else mode

    def forward(*args: Any, **kwargs: Any) -> Any:
        if holder.mode == "full":
            out = original(*args, **kwargs)
            if cache_point:
                state.store(out[0] if isinstance(out, tuple) else out)
            return out
        if cache_point:
            assert state.cache is not None
            return placeholder(state.cache)
        return placeholder(*args, **kwargs)

    _override(state, module, forward)


def _identity(x: Any) -> Any:
    return x


def _first(*args: Any, **kwargs: Any) -> Any:
    # the block's input: SD U-Nets pass it positionally, the SVD U-Net as hidden_states=
    return args[0] if args else kwargs["hidden_states"]


def _first_tuple(x: Any, *args: Any, **kwargs: Any) -> tuple[Any]:
    return (x,)


def _sub_blocks(block: torch.nn.Module) -> list[list[torch.nn.Module]]:
    resnets = list(block.resnets)
    attentions = list(getattr(block, "attentions", None) or [])
    return [[r, attentions[i]] if i < len(attentions) else [r] for i, r in enumerate(resnets)]


def _kind_placeholder(module: torch.nn.Module, sub_index: int) -> Callable[..., Any]:
    # resnets return a tensor; Transformer2DModel is called with return_dict=False -> tuple
    return _first if sub_index == 0 else _first_tuple


def enable(
    obj: Any,
    config: DeepCacheConfig | None = None,
    *,
    cache_interval: int | None = None,
    cache_branch: int | None = None,
    **overrides: Any,
) -> DeepCacheState:
    """Turn DeepCache on for a pipeline (its ``unet``), a UNet2DConditionModel or a UNetSpatioTemporalConditionModel.

    Parameters
    ----------
    obj : DiffusionPipeline or UNet2DConditionModel or UNetSpatioTemporalConditionModel
        Stable Video Diffusion works like SD: its spatio-temporal down/up blocks have the same
        sub-block structure (resnet [+ transformer] per level), so the same shallow branch applies.
    config : DeepCacheConfig, optional
    cache_interval : int, optional
        OneDiffX's name for ``interval``.
    cache_branch : int, optional
        OneDiffX's flat branch index: down sub-block ``cache_branch`` counted level by level, i.e.
        ``layer_id = cache_branch // m`` and ``block_id = cache_branch % m`` (``m`` sub-blocks per down block).
    **overrides
        Fields of DeepCacheConfig.

    Returns
    -------
    DeepCacheState
        Live statistics (``full_calls``, ``shallow_calls``) and the schedule.
    """
    cfg = config or DeepCacheConfig()
    unet = getattr(obj, "unet", obj)
    if cache_interval is not None:
        overrides["interval"] = cache_interval
    if cache_branch is not None:
        if cache_branch < 0:
            raise ValueError(f"cache_branch must be >= 0, got {cache_branch}")
        per_level = len(unet.down_blocks[0].resnets)
        overrides["layer_id"], overrides["block_id"] = divmod(cache_branch, per_level)
    if overrides:
        cfg = DeepCacheConfig(**{**cfg.__dict__, **overrides})
    if state_of(unet) is not None:
        disable(unet)
    downs, ups = list(unet.down_blocks), list(unet.up_blocks)
    n = len(downs)
    L, b = _branch(cfg, downs)
    m = len(downs[L].resnets)
    up = ups[n - 1 - L]
    if len(up.resnets) != m + 1:
        raise ValueError(
            f"unsupported U-Net layout: up block {n - 1 - L} has {len(up.resnets)} sub-blocks, expected {m + 1}"
        )

    state = DeepCacheState(unet, cfg)

    # down level L (sub-blocks after b, downsamplers), deeper down blocks, mid block: pass-through on shallow steps
    _skip_down_part(state, downs, L, b, unet.mid_block)
    k_cache = m - 2 - b
    deep_ups = ups[: n - 1 - L]
    for blk in deep_ups:
        if k_cache < 0 and blk is deep_ups[-1]:
            # block_id = m-1: the cache is the input of U, i.e. the output of the last deep up block
            _skip_or_run(state, blk, _identity, cache_point=True)
        else:
            _skip_or_run(state, blk, lambda hidden_states=None, *a, **k: hidden_states)
    for k, sub in enumerate(_sub_blocks(up)[: k_cache + 1]):
        for i, mod in enumerate(sub):
            if k == k_cache and i == len(sub) - 1:
                _skip_or_run(state, mod, _identity if i == 0 else _first_tuple, cache_point=True)
            else:
                _skip_or_run(state, mod, _kind_placeholder(mod, i))

    # U-Net entry: decide the mode per call and count steps, unless a graph runner does it
    unet._sdkern_deepcache = state
    runner = unet.__dict__.get("forward")
    if runner is not None and hasattr(runner, "hooks") and hasattr(runner, "fn"):
        state._restore.append((runner, "fn", runner.fn))
        state.attach(runner)
        state._restore.append((runner, "hooks", None))
    else:
        inner = unet.forward

        def forward(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
            if state.driven:
                return inner(sample, timestep, *args, **kwargs)
            state.begin_call(timestep)
            try:
                return inner(sample, timestep, *args, **kwargs)
            finally:
                state.end_call()

        _override(state, unet, forward)

    # pipeline: reset at every generation through the scheduler's set_timesteps; img2img / inpainting start later
    # (set_begin_index), and the schedule is laid over the steps that run
    sched = getattr(obj, "scheduler", None)
    if sched is not None:
        set_timesteps = sched.set_timesteps

        def hooked(num_inference_steps: int | None = None, *args: Any, **kwargs: Any) -> Any:
            out = set_timesteps(num_inference_steps, *args, **kwargs)
            state.reset(len(sched.timesteps))
            return out

        state._restore.append((sched, "set_timesteps", sched.__dict__.get("set_timesteps")))
        sched.set_timesteps = hooked
        if hasattr(sched, "set_begin_index"):
            set_begin_index = sched.set_begin_index

            def hooked_begin(begin_index: int = 0, *args: Any, **kwargs: Any) -> Any:
                out = set_begin_index(begin_index, *args, **kwargs)
                if getattr(sched, "timesteps", None) is not None:
                    state.reset(max(len(sched.timesteps) - int(begin_index), 0))
                return out

            state._restore.append((sched, "set_begin_index", sched.__dict__.get("set_begin_index")))
            sched.set_begin_index = hooked_begin
    get_timesteps = getattr(obj, "get_timesteps", None) if obj is not unet else None
    if callable(get_timesteps):
        # img2img / inpainting pipelines: (timesteps[t_start:], count) for schedulers without set_begin_index too

        def hooked_get_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = get_timesteps(*args, **kwargs)
            timesteps = out[0] if isinstance(out, tuple) else out
            if timesteps is not None:
                state.reset(len(timesteps))
            return out

        state._restore.append((obj, "get_timesteps", obj.__dict__.get("get_timesteps")))
        obj.get_timesteps = hooked_get_timesteps

    controlnet = getattr(obj, "controlnet", None) if obj is not unet else None
    if controlnet is not None:
        nets = list(getattr(controlnet, "nets", None) or [controlnet])
        try:
            for net in nets:
                _wire_controlnet(state, net, L, b)
        except BaseException:
            disable(unet)  # nothing stays half wired
            raise
    logger.info("sdkern deepcache: enabled (%s)", cfg)
    return state


def _branch(cfg: DeepCacheConfig, downs: list[torch.nn.Module]) -> tuple[int, int]:
    """The shallow branch ``(L, b)``: down sub-blocks ``0..b`` of level ``L`` run (``b = -1``: none of level ``L``).

    ``block_id = m`` (the authors' whole level ``layer_id``, downsampler included) is ``(layer_id + 1, -1)``.
    """
    n = len(downs)
    L, b = cfg.layer_id, cfg.block_id
    if L >= n:
        raise ValueError(f"DeepCacheConfig.layer_id={L} but the U-Net has {n} down blocks")
    m = len(downs[L].resnets)
    if b > m:
        raise ValueError(f"DeepCacheConfig.block_id={b} but down block {L} has {m} sub-blocks (block_id <= {m})")
    if b == m:
        if L == n - 1 or not getattr(downs[L], "downsamplers", None):
            raise ValueError(
                f"DeepCacheConfig.block_id={b} (the whole level with its downsampler) needs a downsampler and a deeper "
                f"level; down block {L} has {'no downsampler' if L < n - 1 else 'none deeper'}"
            )
        return L + 1, -1
    if L == n - 1 and b == m - 1:
        raise ValueError("DeepCache with the deepest layer and last block skips nothing")
    return L, b


def _skip_down_part(
    state: DeepCacheState,
    downs: list[torch.nn.Module],
    L: int,
    b: int,
    mid_block: torch.nn.Module | None,
    mode: DeepCacheState | _Mode | None = None,
) -> None:
    """Pass-through placeholders (on shallow steps) for what the branch ``(L, b)`` does not compute of the down path:
    level ``L``'s sub-blocks after ``b`` and downsamplers, the deeper down blocks and the mid block."""
    for j, sub in enumerate(_sub_blocks(downs[L])):
        if j > b:
            for i, mod in enumerate(sub):
                _skip_or_run(state, mod, _kind_placeholder(mod, i), mode=mode)
    for ds in getattr(downs[L], "downsamplers", None) or []:
        _skip_or_run(state, ds, _first, mode=mode)
    for blk in downs[L + 1 :]:
        n_res = len(blk.resnets) + (1 if getattr(blk, "downsamplers", None) else 0)
        _skip_or_run(
            state,
            blk,
            lambda hidden_states=None, *a, _n=n_res, **k: (hidden_states, (hidden_states,) * _n),
            mode=mode,
        )
    if mid_block is not None:
        _skip_or_run(state, mid_block, _first, mode=mode)


def _wire_controlnet(state: DeepCacheState, net: torch.nn.Module, L: int, b: int) -> None:
    """DeepCache for a ControlNetModel next to the U-Net (see the module docstring).

    A ControlNet repeats the U-Net's down path (its ``down_blocks`` and ``mid_block``) and returns one residual per
    U-Net down residual (``controlnet_down_blocks``, 1x1 convolutions: conv_in's output, then each sub-block and
    downsampler) plus the mid-block residual. On shallow steps it computes the same down sub-blocks as the U-Net's
    branch ``(L, b)`` and the residuals those feed; the others are placeholders the U-Net's skipped blocks ignore.
    """
    downs = list(getattr(net, "down_blocks", None) or [])
    zero_convs = list(getattr(net, "controlnet_down_blocks", None) or [])
    if len(downs) != len(state.unet.down_blocks) or L >= len(downs):
        raise ValueError(
            f"DeepCache: the {type(net).__name__} does not mirror the U-Net's {len(state.unet.down_blocks)} down "
            "blocks; its residuals could not follow the shallow branch"
        )
    mode = _Mode()
    _skip_down_part(state, downs, L, b, getattr(net, "mid_block", None), mode=mode)
    # residuals consumed on shallow steps: conv_in's, the levels above L (sub-blocks and downsampler), b + 1 of L
    used = 1 + sum(len(d.resnets) + (1 if getattr(d, "downsamplers", None) else 0) for d in downs[:L]) + b + 1
    for conv in zero_convs[used:]:
        _skip_or_run(state, conv, _first, mode=mode)
    mid_conv = getattr(net, "controlnet_mid_block", None)
    if mid_conv is not None:
        _skip_or_run(state, mid_conv, _first, mode=mode)
    original = net.forward
    n_res = len(zero_convs)

    def forward(sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if state.next_is_full(timestep):
            return original(sample, timestep, *args, **kwargs)
        scale = kwargs.get("conditioning_scale", args[2] if len(args) > 2 else 1.0)
        if isinstance(scale, (int, float)) and scale == 0:
            # nothing consumed: skip the ControlNet. (1, 1, 1, 1) zeros broadcast against every residual the U-Net
            # (or a MultiControlNetModel's sum) adds them to, and x + 0 == x.
            zero = torch.zeros((1, 1, 1, 1), dtype=sample.dtype, device=sample.device)
            down = tuple(zero for _ in range(n_res))
            state.controlnet_skipped += 1
            if kwargs.get("return_dict", True):
                from diffusers.models.controlnets.controlnet import ControlNetOutput

                return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=zero)
            return down, zero
        mode.mode = "shallow"
        try:
            state.controlnet_shallow_calls += 1
            return original(sample, timestep, *args, **kwargs)
        finally:
            mode.mode = "full"

    _override(state, net, forward)


def state_of(obj: Any) -> DeepCacheState | None:
    unet = getattr(obj, "unet", obj)
    return getattr(unet, "_sdkern_deepcache", None)


def disable(obj: Any) -> bool:
    """Remove DeepCache from a pipeline or U-Net; returns whether it was enabled."""
    unet = getattr(obj, "unet", obj)
    state = state_of(unet)
    if state is None:
        return False
    for module, attr, prev in reversed(state._restore):
        if prev is None:
            module.__dict__.pop(attr, None)
        else:
            setattr(module, attr, prev)
    state.driven = False
    state._restore.clear()
    del unet._sdkern_deepcache
    return True


def flops_fraction(unet: torch.nn.Module, *inputs: Any, **kwargs: Any) -> float:
    """FLOPs of a shallow step relative to a full step, counted with torch's FlopCounterMode.

    ``inputs``/``kwargs`` are one U-Net call (e.g. sample, timestep, encoder_hidden_states).
    DeepCache must be enabled on ``unet``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    state = state_of(unet)
    if state is None:
        raise ValueError("DeepCache is not enabled on this U-Net")
    saved = (state.step, state.num_steps, state._full, state._last_t, state.full_calls, state.shallow_calls)
    counts = []
    with torch.no_grad():
        for _ in range(2):
            state._last_t = None
            state._full = {0}  # first call full, second shallow
            state.step = len(counts)
            with FlopCounterMode(display=False) as fc:
                unet(*inputs, **kwargs)
            counts.append(fc.get_total_flops())
    state.step, state.num_steps, state._full, state._last_t, state.full_calls, state.shallow_calls = saved
    return counts[1] / counts[0]
