"""Adapters of a pipeline: :func:`load`, :func:`fuse`, :func:`unfuse`, :func:`set_adapters`, :func:`delete`,
:func:`list_adapters` (``sdkern.lora.list``), and the per-pipeline state they share."""

from __future__ import annotations

import builtins
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from sdkern.lora.checkpoint import _Pair, _pair, _read, _resolve, _scalar
from sdkern.lora.weights import _shape_of, _target, dense_weight, write_weight

logger = logging.getLogger("sdkern")


@dataclass
class _Adapter:
    pairs: dict[tuple[str, str], _Pair]  # (component, module path) -> pair
    weight: float = 1.0


@dataclass
class _State:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=builtins.list)
    base: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # original weights
    fused: bool = False


def _state(pipe: Any) -> _State:
    st = getattr(pipe, "_sdkern_lora", None)
    if st is None:
        st = _State()
        pipe._sdkern_lora = st
    return st


# ---- public API -----------------------------------------------------------------------------
def load(
    pipe: Any,
    path_or_state_dict: str | os.PathLike[str] | dict[str, torch.Tensor],
    adapter_name: str | None = None,
    scale: float = 1.0,
    fuse: bool = True,
) -> str:
    """Load a LoRA (safetensors file or state dict) into a pipeline's U-Net and text encoder(s).

    Parameters
    ----------
    pipe : DiffusionPipeline or torch.nn.Module
        Target; patched and graph-captured pipelines stay valid.
    path_or_state_dict : path or dict
        A ``.safetensors`` file (diffusers/PEFT or kohya/A1111 keys) or its state dict.
    adapter_name : str, optional
        Name to refer to it (default ``adapter_<n>``).
    scale : float
        The adapter's weight.
    fuse : bool
        Make it the active set and fuse it now (``set_adapters([name], [scale])``).

    Returns
    -------
    str
        The adapter name.

    Raises
    ------
    ValueError
        A tensor that does not fit its layer (shape, rank 0, dtype, NaN/Inf), a non-scalar alpha, no
        matching key, a duplicate name. Everything is validated before any weight is touched, and a
        failure while fusing restores the previous weights bit-exactly: a failed load changes nothing
        and registers no adapter.
    """
    st = _state(pipe)
    scale = _scalar("LoRA scale", scale)
    name = adapter_name or f"adapter_{len(st.adapters)}"
    if name in st.adapters:
        raise ValueError(f"an adapter named {name!r} is already loaded (delete it first)")
    sd = _read(path_or_state_dict)
    groups, unmatched = _resolve(pipe, sd)
    if not groups:
        raise ValueError(f"no LoRA weights in {name!r} match this pipeline ({len(unmatched)} keys unmatched)")
    if unmatched:
        logger.warning("sdkern lora %s: %d keys matched no module, e.g. %s", name, len(unmatched), unmatched[:3])
    pairs = {
        (comp, path): _pair(name, comp, path, g, _shape_of(_target(pipe, comp, path)))
        for (comp, path), g in groups.items()
    }
    # Everything is validated and converted; from here on a failure rolls back to the state before.
    previous = (builtins.list(st.active), {n: a.weight for n, a in st.adapters.items()})
    st.adapters[name] = _Adapter(pairs, scale)
    if fuse:
        try:
            set_adapters(pipe, [name], [scale])
        except BaseException:
            del st.adapters[name]
            _restore(pipe, st, *previous)
            raise
    logger.info("sdkern lora: loaded %s (%d layers)", name, len(pairs))
    return name


def _restore(pipe: Any, st: _State, active: builtins.list[str], weights: dict[str, float]) -> None:
    """Bring the weights back to the fused state of ``active`` (bit-exact: originals, then the same fuse)."""
    for key, base in st.base.items():
        write_weight(_target(pipe, *key), base)
    st.base.clear()
    st.fused = False
    for n, w in weights.items():
        st.adapters[n].weight = w
    st.active = active
    if active:
        fuse(pipe)


def set_adapters(pipe: Any, names: list[str] | str, weights: list[float] | float | None = None) -> None:
    """Make ``names`` the active adapters with ``weights`` and fuse them as one weighted update."""
    st = _state(pipe)
    names = [names] if isinstance(names, str) else builtins.list(names)
    if weights is None:
        weights = [st.adapters[n].weight if n in st.adapters else 1.0 for n in names]
    elif not isinstance(weights, (builtins.list, tuple)):
        weights = [float(weights)] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
    missing = [n for n in names if n not in st.adapters]
    if missing:
        raise KeyError(f"unknown LoRA adapter(s) {missing}; loaded: {builtins.list(st.adapters)}")
    for n, w in zip(names, weights, strict=True):
        st.adapters[n].weight = float(w)
    st.active = names
    fuse(pipe)


@torch.no_grad()
def fuse(pipe: Any) -> None:
    """Fuse the active adapters into the weights, in place: ``W = W0 + sum_a w_a * s_a * B_a @ A_a``."""
    st = _state(pipe)
    targets: dict[tuple[str, str], list[tuple[_Pair, float]]] = defaultdict(builtins.list)
    for n in st.active:
        ad = st.adapters[n]
        for key, pair in ad.pairs.items():
            targets[key].append((pair, ad.weight * pair.scale))
    # layers touched before but not by the new set go back to their base weights
    for key in builtins.list(st.base):
        if key not in targets:
            write_weight(_target(pipe, *key), st.base.pop(key))
    # batch: same (device, out, in, rank) -> one bmm
    Item = tuple[tuple[str, str], torch.Tensor, torch.Tensor]
    buckets: dict[tuple[Any, ...], builtins.list[Item]] = defaultdict(builtins.list)
    for key, contribs in targets.items():
        w = dense_weight(_target(pipe, *key))
        if key not in st.base:
            st.base[key] = w.detach().clone()
        ups = torch.cat([p.up.flatten(1) * c for p, c in contribs], dim=1)  # (out, R)
        downs = torch.cat([p.down.flatten(1) for p, _ in contribs], dim=0)  # (R, in)
        buckets[(w.device, ups.shape[0], downs.shape[1], ups.shape[1])].append((key, ups, downs))
    for items in buckets.values():
        ups = torch.stack([u for _, u, _ in items])
        downs = torch.stack([d for _, _, d in items])
        deltas = torch.bmm(ups, downs)  # (n, out, in) fp32
        for (key, _, _), delta in zip(items, deltas, strict=True):
            m = _target(pipe, *key)
            base = st.base[key]
            write_weight(m, (base.float() + delta.reshape(base.shape)).to(base.dtype))
    st.fused = bool(targets)


@torch.no_grad()
def unfuse(pipe: Any) -> None:
    """Restore every touched weight to its original value, bit-exactly. Adapters stay loaded."""
    st = _state(pipe)
    for key, base in st.base.items():
        write_weight(_target(pipe, *key), base)
    st.base.clear()
    st.active = []
    st.fused = False


def delete(pipe: Any, names: list[str] | str) -> None:
    """Unload adapters (the active set is refused without them)."""
    st = _state(pipe)
    names = [names] if isinstance(names, str) else builtins.list(names)
    for n in names:
        if n not in st.adapters:
            raise KeyError(f"unknown LoRA adapter {n!r}")
    remaining = [n for n in st.active if n not in names]
    for n in names:
        del st.adapters[n]
    if remaining != st.active:
        if remaining:
            set_adapters(pipe, remaining, [st.adapters[n].weight for n in remaining])
        else:
            unfuse(pipe)


def list_adapters(pipe: Any) -> dict[str, dict[str, Any]]:
    """Loaded adapters: ``{name: {"active": bool, "weight": float, "layers": int}}``."""
    st = _state(pipe)
    return {n: {"active": n in st.active, "weight": a.weight, "layers": len(a.pairs)} for n, a in st.adapters.items()}
