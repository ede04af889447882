"""Turning DeepCache on and off: :func:`enable`, :func:`disable`, :func:`state_of`, :func:`flops_fraction`."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sdkern.deepcache.schedule import DeepCacheConfig
from sdkern.deepcache.state import DeepCacheState
from sdkern.deepcache.wiring import (
    _branch,
    _first_tuple,
    _identity,
    _kind_placeholder,
    _override,
    _skip_down_part,
    _skip_or_run,
    _sub_blocks,
    _wire_controlnet,
)

logger = logging.getLogger("sdkern")


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
