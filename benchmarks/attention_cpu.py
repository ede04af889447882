"""CPU attention: sdkern's C++ flash-attention kernel vs torch SDPA, side by side in one run.

Shapes are Stable Diffusion 1.x attention at 512x512 latents' 32x32 level (B=2, H=8, D=40):
self-attention Sq=Sk=1024 and text cross-attention Sq=1024, Sk=77, in fp32 and bf16.
sdkern takes (B, S, H, D) tensors; torch SDPA gets the same data as (B, H, S, D) views
(``transpose(1, 2)``, no copy), which is what diffusers' attention processor does.

Usage::

    python benchmarks/attention_cpu.py --out attention_cpu.json [--repeats 20] [--threads N]

Prints one line per case and writes a JSON file with device, versions and the raw timings.
The ratio is ``torch_ms / sdkern_ms`` of the medians (> 1 means sdkern is faster); minima are
recorded too, as they are less sensitive to other processes on a shared machine. Timings alternate between
the two implementations so drifting machine load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import reference

CASES = [
    # name, B, H, Sq, Sk, D
    ("self 1024x1024 d40", 2, 8, 1024, 1024, 40),
    ("cross 1024x77 d40", 2, 8, 1024, 77, 40),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time_once(fn: Callable[[], torch.Tensor]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(b: int, h: int, sq: int, sk: int, d: int, dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    """Time sdkern.ops.attention and F.scaled_dot_product_attention on the same inputs.

    Parameters
    ----------
    b, h, sq, sk, d : int
        Batch, heads, query length, key length, head dim (Dv = D).
    dtype : torch.dtype
        Input / output dtype.
    repeats, warmup : int
        Timed repetitions (alternating the two implementations) and untimed warm-up calls.

    Returns
    -------
    dict
        Median milliseconds of each, the ratio torch/sdkern, the raw samples, and the relative L2
        error of both against a float64 reference (a sanity check that the timed code is correct).
    """
    q = torch.randn(b, sq, h, d).to(dtype)  # (B, Sq, H, D)
    k = torch.randn(b, sk, h, d).to(dtype)
    v = torch.randn(b, sk, h, d).to(dtype)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) views for torch

    def run_sdkern() -> torch.Tensor:
        return sdkern.ops.attention(q, k, v)

    def run_torch() -> torch.Tensor:
        return F.scaled_dot_product_attention(qt, kt, vt)

    for _ in range(warmup):
        run_sdkern()
        run_torch()
    ts, tt = [], []
    for _ in range(repeats):
        ts.append(_time_once(run_sdkern))
        tt.append(_time_once(run_torch))
    ref = reference.attention(q.double(), k.double(), v.double())

    def err(x: torch.Tensor) -> float:
        return ((x.double() - ref).norm() / ref.norm()).item()

    ms_s, ms_t = statistics.median(ts) * 1e3, statistics.median(tt) * 1e3
    return {
        "sdkern_ms": ms_s,
        "torch_sdpa_ms": ms_t,
        "ratio_torch_over_sdkern": ms_t / ms_s,
        "sdkern_min_ms": min(ts) * 1e3,
        "torch_sdpa_min_ms": min(tt) * 1e3,
        "ratio_of_minima": min(tt) / min(ts),
        "sdkern_rel_l2": err(run_sdkern()),
        "torch_rel_l2": err(run_torch().transpose(1, 2)),
        "sdkern_samples_ms": [t * 1e3 for t in ts],
        "torch_samples_ms": [t * 1e3 for t in tt],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output file")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sdkern import _C

    info = _C.build_info()
    load_before = os.getloadavg()
    results = []
    for name, b, h, sq, sk, d in CASES:
        for dname, dtype in DTYPES.items():
            r = bench_case(b, h, sq, sk, d, dtype, args.repeats, args.warmup)
            r.update(case=name, dtype=dname, B=b, H=h, Sq=sq, Sk=sk, D=d)
            results.append(r)
            print(
                f"{name:22s} {dname}: sdkern {r['sdkern_ms']:8.2f} ms  torch SDPA {r['torch_sdpa_ms']:8.2f} ms  "
                f"ratio {r['ratio_torch_over_sdkern']:5.2f}x  "
                f"(min {r['sdkern_min_ms']:.2f} vs {r['torch_sdpa_min_ms']:.2f} ms, "
                f"{r['ratio_of_minima']:.2f}x; err sdkern {r['sdkern_rel_l2']:.1e}, "
                f"torch {r['torch_rel_l2']:.1e})",
                flush=True,
            )
    doc = {
        "benchmark": "attention_cpu",
        "device": platform.processor() or platform.machine(),
        "cpu_isa": info.get("isa_active"),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "sdkern": getattr(sdkern, "__version__", "?"),
                     "python": platform.python_version()},
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "loadavg_before_after": [load_before, os.getloadavg()],  # other users of a shared machine
        "results": results,
    }  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
