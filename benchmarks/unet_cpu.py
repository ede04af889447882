"""U-Net step on CPU: eager diffusers vs ``sdkern.patch`` (SD 1.5 architecture, random weights).

For each dtype (fp32, bf16) and latent size (32x32, 64x64), batch 2 (classifier-free guidance), the
same model is timed eager and patched, interleaved in one run, and the median and the ratio are
reported. Example::

    python benchmarks/unet_cpu.py --out benchmarks/results/unet_cpu.json
    python benchmarks/unet_cpu.py --sizes 32 --dtypes fp32 --iters 3   # quicker

Numbers depend on which CPU kernels are built: ops without a C++ kernel fall back to the PyTorch
reference (logged once), so patched timings measure whatever sdkern currently runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sdkern.models.configs import SD15

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

SD15_UNET = dict(SD15.unet)  # the sd15 preset's U-Net config (sdkern.models)


def _time(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (default 32 64)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per variant (after 1 warm-up)")
    p.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="PatchConfig.channels_last (auto: the default, NCHW for fp32 on CPU, NHWC for bf16)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="keep freed memory in the process (sdkern.runtime.tune_cpu_allocator, as the sdkern CLI does on CPU)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = None
    if args.tune_malloc:
        from sdkern.runtime.allocator import tune_cpu_allocator

        malloc = tune_cpu_allocator()
        print(f"allocator: {malloc}", flush=True)

    from diffusers import UNet2DConditionModel

    import sdkern

    cl = {"auto": None, "on": True, "off": False}[args.channels_last]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD15_UNET).eval()
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        model.to(dtype)
        for size in args.sizes:
            x = torch.randn(args.batch, 4, size, size, dtype=dtype)
            ctx = torch.randn(args.batch, 77, 768, dtype=dtype)
            t = torch.tensor(500.0)

            def step(x=x, ctx=ctx, t=t):
                with torch.inference_mode():
                    return model(x, t, encoder_hidden_states=ctx).sample

            times: dict[str, list[float]] = {"eager": [], "patched": []}
            step()  # warm-up eager
            sdkern.patch(model, channels_last=cl)
            step()  # warm-up patched
            sdkern.unpatch(model)
            for _ in range(args.iters):  # interleave so drift in machine load hits both alike
                times["eager"] += _time(step, 1)
                sdkern.patch(model, channels_last=cl)
                times["patched"] += _time(step, 1)
                sdkern.unpatch(model)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "dtype": dname,
                "latent": size,
                "batch": args.batch,
                "channels_last": args.channels_last,
                "eager_s": med["eager"],
                "patched_s": med["patched"],
                "speedup": med["eager"] / med["patched"],
                "raw": times,
            }
            rows.append(row)
            print(
                f"{dname:5s} {size:3d}x{size:<3d} b{args.batch} cl={args.channels_last}  "
                f"eager {med['eager'] * 1e3:9.1f} ms  "
                f"patched {med['patched'] * 1e3:9.1f} ms  speedup {row['speedup']:.2f}x",
                flush=True,
            )
    result = {
        "benchmark": "unet_cpu",
        "model": "SD1.5 U-Net architecture, random weights",
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "sdkern": sdkern.__version__},
        "iters": args.iters,
        "malloc_tuning": None if malloc is None else {"applied": malloc.applied, "settings": malloc.settings},
        "loadavg_after": os.getloadavg(),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
