"""Reading a LoRA checkpoint: safetensors files or state dicts in the diffusers / PEFT and kohya / A1111 key formats,
grouped by target layer and checked against that layer's weight."""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

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
