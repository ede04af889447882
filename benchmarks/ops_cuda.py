#!/usr/bin/env python3
"""Benchmark every sdkern op on a CUDA GPU: Triton vs the torch eager sequence it replaces vs a bandwidth floor.

Memory-bound ops are compared with the time a device-to-device copy would need to move their minimal
bytes (every input read once, every output written once) at the copy bandwidth measured in the same
run. Attention is compared with torch SDPA restricted to the flash backend at SD shapes. When
``sdkern._C_cuda`` is importable the CUDA C++ implementation is timed too.

Usage: python benchmarks/ops_cuda.py --out results.json [--dtype float16] [--reps 50] [--ops attention ...]
Needs a CUDA GPU (exits 2 without one); ``--help`` and the case bookkeeping work anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPS = ("group_norm", "skip_group_norm", "bias_split_gelu", "skip_layer_norm", "bias_add", "attention")


@dataclass(frozen=True)
class Case:
    """One benchmark point: op name, a label and the shape parameters."""

    op: str
    label: str
    params: dict[str, Any] = field(hash=False)


def cases() -> list[Case]:
    """SD shapes for every op (B=2 batch, NHWC feature maps, head dims 40/80/160 and 64)."""
    out: list[Case] = []
    for c, hw in ((320, 64), (640, 32), (1280, 16), (1280, 8)):
        for op in ("group_norm", "skip_group_norm"):
            out.append(Case(op, f"N2 C{c} {hw}x{hw} G32 silu", {"n": 2, "c": c, "hw": hw, "groups": 32}))
    for m, d2 in ((4096, 2560), (1024, 5120), (256, 10240)):
        out.append(Case("bias_split_gelu", f"2x{m}x{d2}", {"rows": 2 * m, "c": d2}))
    for m, c in ((4096, 320), (1024, 640), (256, 1280), (77, 768)):
        out.append(Case("skip_layer_norm", f"2x{m}x{c}", {"rows": 2 * m, "c": c}))
        out.append(Case("bias_add", f"2x{m}x{c}", {"rows": 2 * m, "c": c}))
    for s in (4096, 1024, 256, 64):
        for d in (40, 80, 160):
            for sk in (s, 77):
                out.append(Case("attention", f"B2 H8 S{s} Sk{sk} D{d}", {"b": 2, "h": 8, "sq": s, "sk": sk, "d": d}))
    for h in (10, 20):
        for s in (4096, 1024):
            out.append(Case("attention", f"B2 H{h} S{s} Sk{s} D64", {"b": 2, "h": h, "sq": s, "sk": s, "d": 64}))
    return out


def make_inputs(case: Case, dtype: torch.dtype, device: str | torch.device) -> tuple:
    """Positional arguments of the sdkern op for ``case`` (device "meta" allocates nothing)."""
    p = case.params

    def r(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        if str(device) == "meta":
            return torch.empty(*shape, dtype=dt, device="meta")
        return torch.randn(*shape, dtype=dt, device=device)

    if case.op in ("group_norm", "skip_group_norm"):
        x = r(p["n"], p["c"], p["hw"], p["hw"]).contiguous(memory_format=torch.channels_last)
        g, b = r(p["c"]), r(p["c"])
        if case.op == "group_norm":
            return (x, g, b, p["groups"], 1e-5, True)
        return (x, r(p["n"], p["c"]), r(p["c"]), g, b, p["groups"], 1e-5, True)
    if case.op == "bias_split_gelu":
        return (r(p["rows"], p["c"]), r(p["c"]))
    if case.op == "skip_layer_norm":
        c = p["c"]
        return (r(p["rows"], c), r(p["rows"], c), r(c), r(c), r(c), 1e-5)
    if case.op == "bias_add":
        return (r(p["rows"], p["c"]), r(p["c"]), r(p["rows"], p["c"]))
    q = r(p["b"], p["sq"], p["h"], p["d"])
    return (q, r(p["b"], p["sk"], p["h"], p["d"]), r(p["b"], p["sk"], p["h"], p["d"]), None)


def output_shapes(case: Case, args: tuple) -> list[tuple[int, ...]]:
    """Shapes of the op's outputs."""
    x = args[0]
    if case.op == "group_norm":
        return [tuple(x.shape)]
    if case.op in ("skip_group_norm", "skip_layer_norm"):
        return [tuple(x.shape), tuple(x.shape)]
    if case.op == "bias_split_gelu":
        return [(*x.shape[:-1], x.shape[-1] // 2)]
    if case.op == "bias_add":
        return [tuple(x.shape)]
    return [(*x.shape[:3], args[2].shape[3])]


def min_bytes(case: Case, dtype: torch.dtype) -> int:
    """Bytes a perfect kernel must move: every tensor input read once, every output written once."""
    args = make_inputs(case, dtype, "meta")
    read = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    esize = torch.empty((), dtype=dtype).element_size()
    written = sum(math.prod(s) * esize for s in output_shapes(case, args))
    return read + written


def attention_flops(case: Case) -> int:
    """2 GEMMs of 2*Sq*Sk*D flops per (batch, head)."""
    p = case.params
    return 4 * p["b"] * p["h"] * p["sq"] * p["sk"] * p["d"]


def eager(case: Case) -> Callable[..., Any]:
    """The torch eager sequence each op replaces (what diffusers runs without sdkern)."""
    if case.op == "group_norm":
        return lambda x, g, b, groups, eps, silu: F.silu(F.group_norm(x, groups, g, b, eps))
    if case.op == "skip_group_norm":

        def sgn(x, skip, bias, g, b, groups, eps, silu):
            s = x + skip[:, :, None, None] + bias[None, :, None, None]
            return F.silu(F.group_norm(s, groups, g, b, eps)), s

        return sgn
    if case.op == "bias_split_gelu":

        def bsg(x, bias):
            a, gate = (x + bias).chunk(2, dim=-1)
            return a * F.gelu(gate)

        return bsg
    if case.op == "skip_layer_norm":

        def sln(x, skip, g, b, bias, eps):
            s = x + skip + bias
            return F.layer_norm(s, (s.shape[-1],), g, b, eps), s

        return sln
    if case.op == "bias_add":
        return lambda x, bias, skip: x + bias + skip

    def sdpa_flash(q, k, v, scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)

    return sdpa_flash


def bench_ms(fn: Callable[[], Any], reps: int, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, timed with CUDA events (no per-call sync)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return times[len(times) // 2]


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def run(args: argparse.Namespace) -> dict:
    import sdkern.triton as tri
    from sdkern.ops import _launch
    from sdkern.ops import _native as nat

    dtype = getattr(torch, args.dtype)
    cuda_mod = nat.load("_C_cuda")
    bw = copy_bandwidth(args.reps)
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s")
    rows = []
    for case in cases():
        if args.ops and case.op not in args.ops:
            continue
        torch.manual_seed(0)
        inputs = make_inputs(case, dtype, "cuda")
        impls: dict[str, Callable[[], Any]] = {
            "triton": lambda inputs=inputs, case=case: getattr(tri, case.op)(*inputs),
            "eager": lambda inputs=inputs, case=case: eager(case)(*inputs),
        }
        if cuda_mod is not None and hasattr(cuda_mod, case.op):
            impls["cuda"] = lambda inputs=inputs, case=case: getattr(_launch, case.op)(cuda_mod, *inputs)
        times = {}
        for name, fn in impls.items():
            try:
                times[name] = bench_ms(fn, args.reps)
            except Exception as e:  # noqa: BLE001 -- a backend that cannot run this case is recorded, not fatal
                times[name] = None
                print(f"  {case.op} {case.label} {name}: {type(e).__name__}: {e}")
        nbytes = min_bytes(case, dtype)
        row: dict[str, Any] = {"op": case.op, "case": case.label, "dtype": args.dtype, "bytes": nbytes, "ms": times}
        row["floor_ms"] = nbytes / bw * 1e3
        if case.op == "attention":
            fl = attention_flops(case)
            row["tflops"] = {k: (fl / (t * 1e-3) / 1e12 if t else None) for k, t in times.items()}
            ref = "eager"
        else:
            row["bw_fraction"] = {k: (row["floor_ms"] / t if t else None) for k, t in times.items()}
            ref = "eager"
        if times.get("triton") and times.get(ref):
            row["triton_speedup_vs_eager"] = times[ref] / times["triton"]
        rows.append(row)
        extra = " ".join(f"{k}={v:.4f}ms" for k, v in times.items() if v is not None)
        print(f"{case.op:16s} {case.label:28s} {extra} floor={row['floor_ms']:.4f}ms")
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "reps": args.reps,
        "copy_bandwidth_GBps": bw / 1e9,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }
    import triton

    info["triton"] = triton.__version__
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--ops", nargs="+", choices=OPS, help="only these ops")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ops_cuda.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    info = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
