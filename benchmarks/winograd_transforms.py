"""Winograd F(2x2,3x3) convolution on CPU: fused C++ transforms vs the old torch-op transforms vs direct.

For each 3x3 convolution shape (SD1.5's Winograd layers: >= 640 channels, batch 2, 64x64 and 32x32 latents'
levels), contenders run interleaved call by call in one process (median of ``--reps``), all on the same
channels-last input and residual, float32:

* ``direct``      the CPU engine's prepacked oneDNN convolution with the residual in its epilogue
                  (what ``sdkern.patch`` runs without ``winograd=True``);
* ``wino-torch``  Winograd with the torch-op transforms (``SDKERN_WINOGRAD_TRANSFORMS=torch``: the old path);
* ``wino-fused``  Winograd with sdkern's fused C++ transforms (the default when ``sdkern._C`` has them).

and, with ``--phases``, the parts of one Winograd call: input transform (torch / fused), the 16 GEMMs
(``torch.bmm``), output transform + bias + residual (torch / fused). Each row also gives the rel. L2 error vs
float64 of every contender. ``--cpu-time`` times the calling thread's CPU time (robust on a shared machine
with ``--threads 1``). Example (idle machine)::

    python benchmarks/winograd_transforms.py --threads 2 --reps 15 --phases --out benchmarks/results/winograd.json
    python benchmarks/winograd_transforms.py --threads 1 --cpu-time --phases

The step-level comparison is ``benchmarks/cpu_peers.py --contenders sdkern,sdkern-wino,sdkern-wino-torch``.
``--shapes tiny`` runs small shapes only (a smoke check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import race as _race
from _common import write_results  # benchmarks/ is on sys.path when run as a script
from torch import nn

from sdkern.patch import cpu_engine, winograd

SHAPES = {  # (Cin, Cout, N, H, W)
    "sd": [
        (640, 640, 2, 32, 32),  # 64x64 latents, level 1
        (1280, 1280, 2, 16, 16),  # 64x64 latents, level 2
        (1280, 1280, 2, 8, 8),  # 64x64 latents, level 3 (mid block); 32x32 latents, level 2
        (640, 640, 2, 16, 16),  # 32x32 latents, level 1
        (1280, 1280, 2, 4, 4),  # 32x32 latents, level 3
        (1920, 1280, 2, 16, 16),  # up-block concat input (64x64 latents)
        (1280, 640, 2, 32, 32),  # up-block concat input, level 1 (64x64 latents)
    ],
    "tiny": [(64, 64, 2, 8, 8), (48, 32, 1, 5, 7)],
}


def _rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def _with_transforms(mode: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        prev, winograd.TRANSFORMS = winograd.TRANSFORMS, mode
        try:
            return fn()
        finally:
            winograd.TRANSFORMS = prev

    return run


@torch.inference_mode()
def shape_row(cin: int, cout: int, n: int, h: int, w: int, reps: int, cpu_time: bool, phases: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    other = torch.randn(n, cout, h, w).contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1) + other.double()
    direct = nn.Conv2d(cin, cout, 3, padding=1)
    direct.load_state_dict(conv.state_dict())
    cpu_engine.pack_conv2d(direct, [])
    winograd.rewrite(conv, [])
    fns: dict[str, Callable[[], Any]] = {"direct": lambda: cpu_engine.conv2d_add(direct, x, other)}
    whole = lambda: cpu_engine.conv2d_add(conv, x, other)
    fns["wino-torch"] = _with_transforms("torch", whole)
    fused_why = winograd.transforms_unavailable_reason()
    if fused_why is None:
        fns["wino-fused"] = _with_transforms("fused", whole)
    err = {k: _rel_l2(f(), ref) for k, f in fns.items()}
    if phases:
        u = conv.__dict__["_sdkern_wino"]
        v = winograd.input_transform_torch(x)
        prod = torch.bmm(v, u)
        fns["in-torch"] = lambda: winograd.input_transform_torch(x)
        fns["gemm"] = lambda: torch.bmm(v, u)
        fns["out-torch"] = lambda: winograd.output_transform_torch(prod, conv.bias, other, n, h, w)
        if fused_why is None:
            fns["in-fused"] = lambda: torch.ops.sdkern.winograd_input(x)
            fns["out-fused"] = lambda: torch.ops.sdkern.winograd_output(prod, conv.bias, other, n, h, w)
    ms = _race(fns, reps, cpu_time)
    row: dict[str, Any] = {"shape": [cin, cout, n, h, w], "ms": ms, "rel_l2": err}
    if fused_why is not None:
        row["fused_unavailable"] = fused_why
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="sd")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--phases", action="store_true", help="also time the transforms and the GEMMs separately")
    p.add_argument("--cpu-time", action="store_true", help="time the calling thread's CPU time (use with --threads 1)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES[args.shapes]:
        row = shape_row(*shape, reps=args.reps, cpu_time=args.cpu_time, phases=args.phases)
        rows.append(row)
        ms, err = row["ms"], row["rel_l2"]
        base = ms["direct"]
        cols = "  ".join(f"{k} {v:8.2f} ms ({base / v:4.2f}x)" for k, v in ms.items() if k in err)
        errs = " / ".join(f"{e:.1e}" for e in err.values())
        print(f"{row['shape']!s:26s} {cols}  rel L2 {errs}", flush=True)
        if args.phases:
            print("    " + "  ".join(f"{k} {v:7.2f} ms" for k, v in ms.items() if k not in err), flush=True)
        if "fused_unavailable" in row:
            print(f"    fused transforms unavailable: {row['fused_unavailable']}", flush=True)
    if args.out:
        write_results(args.out, "winograd_transforms", args.cpu_time, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
