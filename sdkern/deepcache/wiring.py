"""How the shallow branch is wired: instance-level ``forward`` overrides that run the original on full steps and
return a placeholder or the cached feature on shallow steps, for the U-Net's blocks and a ControlNet's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdkern.deepcache.schedule import DeepCacheConfig
from sdkern.deepcache.state import DeepCacheState


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
