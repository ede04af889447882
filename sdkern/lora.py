"""Fast LoRA load / fuse / unfuse / switch that keeps patched and graph-captured pipelines valid.

LoRA weights are fused *in place* into the existing weight tensors of the U-Net and text
encoder(s): no module is replaced, storage never moves, so sdkern's patched modules (whose fused
QKV/KV projections are views of one tensor) and captured CUDA graphs see the new weights without
recapture. The original weights of every touched layer are kept once (a copy taken before the first
fuse), which makes :func:`unfuse` bit-exact and lets :func:`set_adapters` switch among adapters
without drift: each fuse recomputes ``W = W0 + sum_a weight_a * scale_a * (B_a @ A_a)``.
Updates are batched: targets whose (out, in, rank) agree are fused with one ``bmm`` on the device.

Formats (safetensors only; pickle checkpoints are refused):
- diffusers / PEFT: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (also ``text_encoder.``,
  ``text_encoder_2.``), the older ``<path>.lora.down.weight`` / ``lora.up.weight`` and attention
  processor keys (``...processor.to_q_lora.down.weight``), optional ``<path>.alpha``;
- kohya / A1111: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``lora_up.weight`` /
  ``.alpha`` and ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for the text encoders.
"""

from __future__ import annotations

import builtins
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("sdkern")

__all__ = ["delete", "fuse", "list_adapters", "load", "set_adapters", "unfuse"]

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIX = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


@dataclass
class _Pair:
    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw), float32, on the target's device
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r (1 when no alpha)


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


# ---- reading ------------------------------------------------------------------------------------
def _read(path_or_state_dict: str | os.PathLike[str] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors: 8-byte little-endian header length then a JSON object
    is_safetensors = len(head) >= 9 and head[8:9] == b"{"
    if not is_safetensors or head[:2] == b"PK" or head[:1] == b"\x80":
        raise ValueError(
            f"{path} is not a safetensors file; sdkern refuses pickle checkpoints (.bin/.pt/.ckpt) because "
            "loading them can execute code. Convert it to .safetensors first."
        )
    from safetensors.torch import load_file

    return load_file(path)


_SUFFIXES = [
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
]


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def _normalise_diffusers_path(path: str) -> str:
    # attention-processor format: ...attn1.processor.to_q_lora -> ...attn1.to_q ; to_out_lora -> to_out.0
    path = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", path)
    return re.sub(r"\.processor\.(to_[qkv])_lora$", r".\1", path)


def _module_index(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    modules = {name: m for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    kohya = {name.replace(".", "_"): name for name in modules}
    return modules, kohya


def _resolve(
    pipe: Any, sd: dict[str, torch.Tensor]
) -> tuple[dict[tuple[str, str], dict[str, torch.Tensor]], list[str]]:
    """Group a LoRA state dict by (component, module path); returns groups and unmatched keys."""
    components = {c: getattr(pipe, c) for c in _COMPONENTS if getattr(pipe, c, None) is not None}
    if isinstance(pipe, torch.nn.Module):  # a bare U-Net or text encoder
        components = {"unet": pipe}
    index = {c: _module_index(m) for c, m in components.items()}
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    unmatched: list[str] = []
    for key, tensor in sd.items():
        split = _split_key(key) if isinstance(key, str) else None
        if split is None:
            unmatched.append(key)
            continue
        raw, kind = split
        target: tuple[str, str] | None = None
        for prefix, comp in _KOHYA_PREFIX.items():
            if raw.startswith(prefix) and comp in index:
                name = index[comp][1].get(raw[len(prefix) :])
                target = (comp, name) if name is not None else None
                break
        else:
            comp, _, path = raw.partition(".")
            if comp not in components:  # unprefixed keys address the U-Net (old diffusers files)
                comp, path = "unet", raw
            path = _normalise_diffusers_path(path)
            if comp in index and path in index[comp][0]:
                target = (comp, path)
        if target is None:
            unmatched.append(key)
        else:
            groups[target][kind] = tensor
    return groups, unmatched


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


def dense_weight(m: torch.nn.Module) -> torch.Tensor:
    """``m.weight``, unpacked when the CPU engine holds it prepacked."""
    return m.dense_weight() if m.weight.is_mkldnn else m.weight


def _shape_of(m: torch.nn.Module) -> torch.Tensor:
    """A storage-free stand-in of ``m.weight`` (its logical shape, dtype and device) for validation."""
    w = m.weight
    if not w.is_mkldnn:
        return w
    return torch.empty(m.__dict__["_sdkern_wshape"], dtype=w.dtype, device="meta")  # CPU engine: packed


def write_weight(m: torch.nn.Module, value: torch.Tensor) -> None:
    """Set ``m.weight`` in place (re-packing it when the CPU engine holds it prepacked)."""
    if m.weight.is_mkldnn:
        from sdkern.patch.cpu_engine import write_weight as write_packed

        write_packed(m, value)
    else:
        with torch.no_grad():
            m.weight.copy_(value)


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


def _scalar(what: str, value: Any) -> float:
    """A finite Python float from a number or a one-element tensor; ValueError naming ``what`` otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return float(value)


def _pair(name: str, comp: str, path: str, g: dict[str, Any], weight: torch.Tensor) -> _Pair:
    """Validate one layer's (down, up, alpha) against its weight and convert it; touches no weight.

    Linear weight (out, in): down (r, in) [or (r, in, 1, 1)], up (out, r) [or (out, r, 1, 1)].
    Conv weight (out, in, kh, kw): down (r, in, kh, kw) [or (r, in*kh*kw)], up (out, r, 1, 1) [or (out, r)].
    """
    where = f"LoRA {name!r}: {comp}.{path}"
    if "down" not in g or "up" not in g:
        raise ValueError(f"{where} lacks its {'up' if 'down' in g else 'down'} matrix")
    down, up = g["down"], g["up"]
    for kind, t in (("down", down), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {kind} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {kind} has dtype {t.dtype}; expected a floating-point tensor")
        if t.dim() not in (2, 4):
            raise ValueError(f"{where}: {kind} has shape {tuple(t.shape)}; expected a 2-D or 4-D tensor")
    r = down.shape[0]
    if r == 0:
        raise ValueError(f"{where}: rank 0 (down {tuple(down.shape)}, up {tuple(up.shape)})")
    fits = (
        up.shape[0] == weight.shape[0]
        and up.shape[1] == r
        and all(k == 1 for k in up.shape[2:])
        and down[0].numel() == weight[0].numel()
        and (down.dim() == 2 or down.shape[1:] == weight.shape[1:] or (weight.dim() == 2 and down.shape[2:] == (1, 1)))
    )
    if not fits:
        raise ValueError(
            f"{where}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit weight {tuple(weight.shape)}"
        )
    for kind, t in (("down", down), ("up", up)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: {kind} contains NaN or Inf")
    s = _scalar(f"{where}: alpha", g["alpha"]) / r if "alpha" in g else 1.0
    dev = torch.device("cpu") if weight.is_meta else weight.device  # meta: a CPU-engine weight (see _shape_of)
    return _Pair(down.to(device=dev, dtype=torch.float32), up.to(device=dev, dtype=torch.float32), s)


def _target(pipe: Any, comp: str, path: str) -> torch.nn.Module:
    root = pipe if isinstance(pipe, torch.nn.Module) else getattr(pipe, comp)
    return root.get_submodule(path)


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


list = list_adapters  # the documented name is sdkern.lora.list(pipe)
