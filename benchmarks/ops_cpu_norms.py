"""CPU benchmark: sdkern group_norm(+SiLU) / skip_group_norm vs the unfused torch sequences they replace.

Measured side by side in one run (interleaved repetitions, median of each), NHWC (channels-last)
inputs at SD shapes: batch 2, C in {320, 640, 1280}, 32 groups, 32x32 and 64x64 pixels, fp32 and
bf16. Baselines:

* group_norm:      ``silu(F.group_norm(x, 32, gamma, beta))``
* skip_group_norm: ``s = x + skip + bias; silu(F.group_norm(s, 32, gamma, beta))`` (returns y, s)

Also reports the achieved bandwidth of sdkern (bytes that must move: read x [+ skip], write y [+ s])
next to a plain copy (``clone``) of the same tensor.

Usage: ``python benchmarks/ops_cpu_norms.py [--reps 15] [--stat min|median] [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import sdkern

SHAPES = [(2, c, hw, hw) for hw in (32, 64) for c in (320, 640, 1280)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time(fns: dict[str, Callable[[], object]], reps: int, stat: str) -> dict[str, float]:
    """Seconds per call of each function (min or median over reps), repetitions interleaved.

    Interleaving makes background load hit every contender alike; on a shared, oversubscribed
    machine the minimum is the most stable estimate of the undisturbed time.
    """
    for f in fns.values():  # warm-up (first call allocates scratch, spins up the thread pool)
        f()
        f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    agg = min if stat == "min" else statistics.median
    return {k: agg(v) for k, v in samples.items()}


def _gn_case(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[dict[str, Callable[[], object]], int]:
    c = shape[1]
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    fns = {
        "torch": lambda: F.silu(F.group_norm(x, 32, gamma, beta, 1e-5)),
        "sdkern": lambda: sdkern.ops.group_norm(x, gamma, beta, groups=32, eps=1e-5, silu=True),
        "copy": lambda: x.clone(memory_format=torch.channels_last),
    }
    return fns, 2 * x.numel() * x.element_size()  # read x, write y


def _sgn_case(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[dict[str, Callable[[], object]], int]:
    c = shape[1]
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(c, dtype=dtype)
    gamma, beta = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    b4 = bias[None, :, None, None]

    def unfused():
        s = x + skip + b4
        return F.silu(F.group_norm(s, 32, gamma, beta, 1e-5)), s

    fns = {
        "torch": unfused,
        "sdkern": lambda: sdkern.ops.skip_group_norm(x, skip, gamma, beta, bias=bias, groups=32, eps=1e-5, silu=True),
        "copy": lambda: x.clone(memory_format=torch.channels_last),
    }
    return fns, 4 * x.numel() * x.element_size()  # read x, skip; write y, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--stat", choices=["min", "median"], default="min", help="statistic over the repetitions")
    ap.add_argument("--out", help="write the results as JSON to this file")
    args = ap.parse_args()

    from sdkern import _C

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sdkern ISA {_C.cpu_isa()}")
    head = ["torch ms", "sdkern ms", "speedup", "GB/s", "copy GB/s"]
    print(f"{'op':16} {'dtype':5} {'shape':20} " + " ".join(f"{h:>9}" for h in head))
    for op, make in (("group_norm", _gn_case), ("skip_group_norm", _sgn_case)):
        for dname, dtype in DTYPES.items():
            for shape in SHAPES:
                fns, nbytes = make(shape, dtype)
                t = _time(fns, args.reps, args.stat)
                copy_bytes = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                row = {
                    "op": op,
                    "dtype": dname,
                    "shape": list(shape),
                    "torch_s": t["torch"],
                    "sdkern_s": t["sdkern"],
                    "copy_s": t["copy"],
                    "speedup": t["torch"] / t["sdkern"],
                    "sdkern_gbps": nbytes / t["sdkern"] / 1e9,
                    "copy_gbps": copy_bytes / t["copy"] / 1e9,
                }
                rows.append(row)
                print(
                    f"{op:16} {dname:5} {tuple(shape)!s:20} {t['torch'] * 1e3:9.3f} {t['sdkern'] * 1e3:9.3f} "
                    f"{row['speedup']:8.2f}x {row['sdkern_gbps']:9.1f} {row['copy_gbps']:9.1f}"
                )
    summary = {}
    for op in ("group_norm", "skip_group_norm"):
        for dname in DTYPES:
            sp = [r["speedup"] for r in rows if r["op"] == op and r["dtype"] == dname]
            summary[f"{op}/{dname}"] = math.exp(sum(map(math.log, sp)) / len(sp))
    for k, v in summary.items():
        print(f"geomean speedup {k}: {v:.2f}x")
    if args.out:
        meta = {
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "sdkern_isa": _C.cpu_isa(),
            "reps": args.reps,
            "stat": args.stat,
            "loadavg_1min": os.getloadavg()[0],
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows, "geomean_speedup": summary}, f, indent=1)


if __name__ == "__main__":
    main()
