"""Roofline of one U-Net step: FLOPs and minimum bytes by op class, and the floor time on a device.

The U-Net is built on the meta device (no memory, no arithmetic) and run once under a
``TorchFunctionMode`` that sees every functional call: ``conv2d`` -> conv, ``linear`` -> linear,
``scaled_dot_product_attention`` (and any matmul inside an ``Attention`` module) -> attention,
``group_norm``/``layer_norm`` -> norms, every other op that makes a new tensor -> elementwise
(views and layout-only ops are free).

Minimum bytes assume each op reads its inputs (weights included) once and writes its output once,
attention being fused (q, k, v read, output written: the score matrix never reaches memory). The floor
time of an op is ``max(flops / peak, bytes / bandwidth)``; conv/linear/attention use the matrix
(tensor-core) peak of the dtype, norms and elementwise ops the vector peak.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

CLASSES = ("conv", "linear", "attention", "norms", "elementwise")


@dataclass(frozen=True)
class DeviceSpec:
    """Peak throughput of a device.

    Attributes
    ----------
    name : str
        Device name.
    matrix_tflops : dict
        Dense matrix peak in TFLOP/s per dtype name (``"float16"``, ``"bfloat16"``, ``"float32"``).
    vector_tflops : float
        Non-matrix (CUDA core / SIMD) fp32 peak in TFLOP/s.
    bandwidth_gbs : float
        Memory bandwidth in GB/s (10^9 bytes).
    """

    name: str
    matrix_tflops: dict[str, float]
    vector_tflops: float
    bandwidth_gbs: float
    note: str = ""


# Datasheet numbers, dense (no sparsity). fp32 matrix peak = TF32 tensor cores (PyTorch's default for
# convolutions; matmuls use it with torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision).
DEVICES: dict[str, DeviceSpec] = {
    "A100": DeviceSpec(
        "A100-SXM4-80GB", {"float16": 312.0, "bfloat16": 312.0, "float32": 156.0}, 19.5, 2039.0, "fp32 via TF32"
    ),
    "H100": DeviceSpec(
        "H100-SXM5-80GB", {"float16": 989.4, "bfloat16": 989.4, "float32": 494.7}, 66.9, 3352.0, "fp32 via TF32"
    ),
}


def custom_device(name: str, tflops: float, bandwidth_gbs: float) -> DeviceSpec:
    """A user-described device: one peak for every dtype and op class."""
    return DeviceSpec(name, {"float16": tflops, "bfloat16": tflops, "float32": tflops}, tflops, bandwidth_gbs)


def measure_cpu(seconds: float = 0.5) -> DeviceSpec:
    """Measure this CPU: fp32 matmul throughput (1024²) and copy bandwidth (64 MB tensors), best repetition.

    Parameters
    ----------
    seconds : float
        Rough time spent on each of the two measurements.
    """
    # Best of many short repetitions: on a shared machine the fastest repetition is the closest to the peak.
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    best, t0 = math.inf, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    tflops = 2 * 1024**3 / best / 1e12
    x = torch.empty(16 * 2**20)
    y = torch.empty_like(x)
    best, t0 = math.inf, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t)
    gbs = 2 * x.numel() * 4 / best / 1e9
    return DeviceSpec(
        "this CPU (measured)",
        {"float16": tflops, "bfloat16": tflops, "float32": tflops},
        tflops,
        gbs,
        f"{torch.get_num_threads()} threads, best of repeated fp32 mm and copy",
    )


@dataclass
class OpCount:
    """FLOPs, minimum bytes and per-op floor inputs of one op class."""

    flops: float = 0.0
    bytes: float = 0.0
    calls: int = 0
    ops: list[tuple[float, float]] = field(default_factory=list)  # (flops, bytes) per call


_FREE = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "chunk",
    "split",
    "__getitem__",
    "unsqueeze",
    "squeeze",
    "flatten",
    "expand",
    "contiguous",
    "size",
    "dim",
    "__get__",
    "numel",
    "unbind",
    "narrow",
    "t",
    "detach",
    "requires_grad_",
    "type_as",
    "is_floating_point",
    "__len__",
    "stride",
    "is_contiguous",
    "data_ptr",
    "new_empty",
    "empty",
    "zeros",
    "ones",
    "arange",
    "to",
    "float",
    "__setitem__",
}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _nbytes(ts: list[torch.Tensor]) -> float:
    return float(sum(t.numel() * t.element_size() for t in ts))


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts = {c: OpCount() for c in CLASSES}
        self.module_stack: list[type] = []

    def _in(self, *names: str) -> bool:
        return any(cls.__name__ in names for cls in self.module_stack)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        outs = _tensors(out)
        if not outs or name in _FREE:
            return out
        ins = _tensors(args) + _tensors(kwargs)
        o = outs[0]
        if func in (F.conv2d, torch.conv2d, F.conv_transpose2d):
            w = args[1] if len(args) > 1 else kwargs["weight"]
            flops = 2.0 * o.numel() * w[0].numel()
            cls = "conv"
        elif func is F.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            flops = 2.0 * o.numel() * w.shape[-1]
            cls = "linear"
        elif func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            sq, sk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], o.shape[-1]
            batch = o.numel() // (sq * dv)
            flops = 2.0 * batch * sq * sk * (d + dv) + 5.0 * batch * sq * sk  # two GEMMs + softmax
            cls = "attention"
        elif name in ("matmul", "bmm", "baddbmm", "mm", "addmm", "einsum"):
            a = ins[0]
            flops = 2.0 * o.numel() * a.shape[-1]
            cls = "attention" if self._in("Attention") and not self._in("Linear") else "linear"
        elif func in (F.group_norm, F.layer_norm, torch.group_norm, torch.layer_norm):
            flops = 8.0 * o.numel()
            cls = "norms"
        else:
            flops = float(o.numel())
            cls = "elementwise"
        nbytes = _nbytes(ins) + _nbytes(outs)
        c = self.counts[cls]
        c.flops += flops
        c.bytes += nbytes
        c.calls += 1
        c.ops.append((flops, nbytes))
        return out


def count_unet(
    preset: str, height: int, width: int, batch: int, dtype: torch.dtype = torch.float16
) -> dict[str, OpCount]:
    """Count one U-Net call of ``preset`` on a latent batch of ``batch`` (include the CFG doubling yourself).

    Parameters
    ----------
    preset : str
        Preset name of :mod:`sdkern.models`.
    height, width : int
        Image size in pixels (latents are 8x smaller; the tiny preset's VAE downsamples 2x).
    batch : int
        U-Net batch (2x the image batch with classifier-free guidance).
    dtype : torch.dtype
        Element type that sets the byte counts.
    """
    from sdkern.apps.models import PRESETS, build_component

    cfg = PRESETS[preset]
    unet = build_component(preset, "unet")
    for p in unet.parameters():
        p.data = p.data.to(dtype)
    factor = 2 ** (len(cfg.vae["block_out_channels"]) - 1)
    h, w = height // factor, width // factor
    dev = torch.device("meta")
    sample = torch.empty(batch, unet.config.in_channels, h, w, device=dev, dtype=dtype)
    ctx = torch.empty(batch, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
    t = torch.full((batch,), 500.0, device=dev)
    extra: dict[str, Any] = {}
    if cfg.kind == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, 1280, device=dev, dtype=dtype),
            "time_ids": torch.empty(batch, 6, device=dev, dtype=dtype),
        }
    counter = _Counter()

    def enter(mod: torch.nn.Module, _args: Any) -> None:
        counter.module_stack.append(type(mod))

    def leave(mod: torch.nn.Module, _args: Any, _out: Any) -> None:
        counter.module_stack.pop()

    handles = []
    for m in unet.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad(), counter:
            unet(sample, t, encoder_hidden_states=ctx, **extra)
    finally:
        for hd in handles:
            hd.remove()
    return counter.counts


def floor_seconds(counts: dict[str, OpCount], device: DeviceSpec, dtype: torch.dtype) -> dict[str, float]:
    """Floor time per op class on ``device``: sum over calls of max(compute time, memory time)."""
    dname = str(dtype).replace("torch.", "")
    matrix = device.matrix_tflops.get(dname, device.vector_tflops) * 1e12
    vector = device.vector_tflops * 1e12
    bw = device.bandwidth_gbs * 1e9
    out: dict[str, float] = {}
    for cls, c in counts.items():
        peak = matrix if cls in ("conv", "linear", "attention") else vector
        out[cls] = sum(max(f / peak, b / bw) for f, b in c.ops)
    out["total"] = sum(out[c] for c in CLASSES)
    return out


def roofline(
    preset: str,
    height: int,
    width: int,
    batch: int,
    dtype: torch.dtype = torch.float16,
    devices: list[DeviceSpec] | None = None,
) -> dict[str, Any]:
    """FLOPs, bytes and floor times of one U-Net step as a JSON-ready dict.

    Returns
    -------
    dict
        ``{"preset", "height", "width", "unet_batch", "dtype", "classes": {cls: {"gflop", "mbytes", "calls"}},
        "total": {...}, "floor_ms": {device name: {cls: ms, "total": ms}}, "devices": {name: spec}}``.
    """
    counts = count_unet(preset, height, width, batch, dtype)
    devices = devices if devices is not None else list(DEVICES.values())
    classes = {c: {"gflop": v.flops / 1e9, "mbytes": v.bytes / 1e6, "calls": v.calls} for c, v in counts.items()}
    total = {k: sum(classes[c][k] for c in CLASSES) for k in ("gflop", "mbytes", "calls")}
    floors = {d.name: {k: v * 1e3 for k, v in floor_seconds(counts, d, dtype).items()} for d in devices}
    return {
        "preset": preset,
        "height": height,
        "width": width,
        "unet_batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "classes": classes,
        "total": total,
        "floor_ms": floors,
        "devices": {
            d.name: {
                "matrix_tflops": d.matrix_tflops,
                "vector_tflops": d.vector_tflops,
                "bandwidth_gbs": d.bandwidth_gbs,
                "note": d.note,
            }
            for d in devices
        },
    }


def format_roofline(r: dict[str, Any]) -> str:
    """Human-readable table of :func:`roofline`'s result."""
    names = list(r["floor_ms"])
    head = f"{'class':<12}{'GFLOP':>12}{'min MB':>12}{'calls':>8}" + "".join(f"{n[:22]:>24}" for n in names)
    lines = [
        f"U-Net step roofline: preset {r['preset']}, {r['height']}x{r['width']}, U-Net batch {r['unet_batch']}, "
        f"{r['dtype']} (floor ms per device)",
        head,
    ]
    for c in (*CLASSES, "total"):
        row = r["classes"][c] if c != "total" else r["total"]
        lines.append(
            f"{c:<12}{row['gflop']:>12.2f}{row['mbytes']:>12.1f}{row['calls']:>8d}"
            + "".join(f"{r['floor_ms'][n][c]:>24.4f}" for n in names)
        )
    gflop, mb = r["total"]["gflop"], r["total"]["mbytes"]
    lines.append(f"arithmetic intensity {gflop * 1e3 / max(mb, 1e-9):.1f} FLOP/byte")
    return "\n".join(lines)
