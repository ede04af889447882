"""Per-primitive timings behind the CPU engine's choices (sdkern.patch.cpu_engine), SD1.5 shapes, batch 2.

Three tables, each contender interleaved call by call in one process (median of ``--reps``):

* ``conv``: 3x3 / 1x1 convolutions — eager ``F.conv2d`` (NCHW, plain weight: oneDNN reorders the weight
  every call) vs the engine's prepacked primitive on NHWC input, and for 1x1 the GEMM route the engine
  takes (``_linear_pointwise`` on the NHWC pixels) next to the packed convolution it avoids;
* ``linear``: ``F.linear`` vs the prepacked inner product;
* ``attention``: ``sdkern::attention`` vs ``F.scaled_dot_product_attention`` on the same strided views.

``--cpu-time`` times the calling thread's CPU time instead of wall time (with ``--threads 1`` this is
robust to other processes on a shared machine; wall time is the default). Example::

    python benchmarks/cpu_engine_micro.py --dtypes fp32 bf16 --threads 1 --cpu-time
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

import sdkern.ops  # noqa: F401  (registers torch.ops.sdkern)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONVS = [  # (Cin, H=W, Cout, k) at 32x32 latents (256 px) and the deeper levels
    (320, 32, 320, 3),
    (640, 16, 640, 3),
    (1280, 8, 1280, 3),
    (1280, 4, 1280, 3),
    (640, 32, 320, 3),
    (320, 32, 320, 1),
    (1280, 8, 1280, 1),
    (2560, 16, 1280, 1),
]
LINEARS = [(2048, 320, 2560), (2048, 1280, 320), (512, 640, 5120), (128, 1280, 10240), (154, 768, 1280)]
ATTN = [(1024, 1024, 8, 40), (1024, 77, 8, 40), (256, 256, 8, 80), (64, 64, 8, 160), (4096, 4096, 8, 40)]


def conv_rows(dtype: torch.dtype, reps: int, cpu_time: bool) -> list[dict[str, Any]]:
    mk = torch.ops.mkldnn
    rows = []
    for cin, hw, cout, k in CONVS:
        p = k // 2
        x = torch.randn(2, cin, hw, hw).to(dtype)
        w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
        b = torch.randn(cout).to(dtype)
        xcl = x.contiguous(memory_format=torch.channels_last)
        wp = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [p, p], [1, 1], [1, 1], 1, None)
        fns: dict[str, Callable[[], Any]] = {
            "eager": lambda x=x, w=w, b=b, p=p: F.conv2d(x, w, b, padding=p),
            "packed_conv": lambda xcl=xcl, wp=wp, b=b, p=p: mk._convolution_pointwise(
                xcl, wp, b, [p, p], [1, 1], [1, 1], 1, "none", [], ""
            ),
        }
        if k == 1:
            wl = mk._reorder_linear_weight(w.reshape(cout, cin), None)
            tokens = xcl.permute(0, 2, 3, 1).reshape(-1, cin)
            fns["packed_gemm"] = lambda t=tokens, wl=wl, b=b: mk._linear_pointwise(t, wl, b, "none", [], "")
        ms = _race(fns, reps, cpu_time)
        rows.append({"op": "conv", "shape": [2, cin, hw, hw, cout, k], "ms": ms})
    return rows


def linear_rows(dtype: torch.dtype, reps: int, cpu_time: bool) -> list[dict[str, Any]]:
    mk = torch.ops.mkldnn
    rows = []
    for m, kdim, n in LINEARS:
        x = torch.randn(m, kdim).to(dtype)
        w = (torch.randn(n, kdim) / kdim**0.5).to(dtype)
        b = torch.randn(n).to(dtype)
        wp = mk._reorder_linear_weight(w, None)
        ms = _race(
            {
                "eager": lambda x=x, w=w, b=b: F.linear(x, w, b),
                "packed": lambda x=x, wp=wp, b=b: mk._linear_pointwise(x, wp, b, "none", [], ""),
            },
            reps,
            cpu_time,
        )
        rows.append({"op": "linear", "shape": [m, kdim, n], "ms": ms})
    return rows


def attention_rows(dtype: torch.dtype, reps: int, cpu_time: bool) -> list[dict[str, Any]]:
    rows = []
    for s, sk, h, d in ATTN:
        q = torch.randn(2, s, 3, h, d).to(dtype)[:, :, 0]
        kv = torch.randn(2, sk, 2, h, d).to(dtype)
        k, v = kv[:, :, 0], kv[:, :, 1]
        ms = _race(
            {
                "sdkern": lambda q=q, k=k, v=v: torch.ops.sdkern.attention(q, k, v, None),
                "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                ).transpose(1, 2),
            },
            reps,
            cpu_time,
        )
        rows.append({"op": "attention", "shape": [2, s, sk, h, d], "ms": ms})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--tables", nargs="+", default=["conv", "linear", "attention"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--cpu-time", action="store_true", help="time the calling thread's CPU time (use with --threads 1)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    makers = {"conv": conv_rows, "linear": linear_rows, "attention": attention_rows}
    rows = []
    for dname in args.dtypes:
        for table in args.tables:
            for row in makers[table](DTYPES[dname], args.reps, args.cpu_time):
                row["dtype"] = dname
                rows.append(row)
                ms = row["ms"]
                base = ms.get("eager", ms.get("sdkern"))
                cols = "  ".join(f"{n} {v:8.2f} ms ({base / v:4.2f}x)" for n, v in ms.items())
                print(f"{dname} {row['op']:9s} {row['shape']!s:28s} {cols}", flush=True)
    if args.out:
        write_results(args.out, "cpu_engine_micro", args.cpu_time, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
