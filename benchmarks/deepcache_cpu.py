"""DeepCache end-to-end speedup on CPU: a full txt2img run (random-weight preset, CPU-drawn latents)
without DeepCache and with interval 2, 3 and 5 (uniform schedule, layer_id=0, block_id=0), measured
side by side in one process; also the FLOP fraction of a shallow step and the output difference.

    python benchmarks/deepcache_cpu.py --out deepcache_cpu.json [--preset sd15] [--size 256] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--intervals", default="1,2,3,5")
    ap.add_argument("--patch", action="store_true", help="also sdkern.patch the pipeline")
    args = ap.parse_args()

    from sdkern import deepcache
    from sdkern.models import build

    pipe = build(args.preset, dtype=torch.float32, device="cpu", seed=0)
    pipe.set_progress_bar_config(disable=True)
    if args.patch:
        import sdkern

        sdkern.patch(pipe)
    lat_shape = (1, pipe.unet.config.in_channels, args.size // 8, args.size // 8)
    latents = torch.randn(lat_shape, generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        return pipe("a photo of a cat", num_inference_steps=args.steps, height=args.size, width=args.size,
                    latents=latents, output_type="pt").images  # fmt: skip

    results = {}
    ref = None
    with torch.no_grad():
        for interval in [int(i) for i in args.intervals.split(",")]:
            state = deepcache.enable(pipe, interval=interval) if interval > 1 else None
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                img = run()
                times.append(time.perf_counter() - t0)
            if ref is None:
                ref = img
            entry = {
                "seconds_median": statistics.median(times),
                "seconds_all": times,
                "max_abs_diff_vs_no_cache": (img - ref).abs().max().item(),
            }
            if state is not None:
                entry["full_calls"], entry["shallow_calls"] = state.full_calls, state.shallow_calls
                ehs = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
                x = torch.randn(2, *lat_shape[1:])
                entry["shallow_flops_fraction"] = deepcache.flops_fraction(pipe.unet, x, 500, ehs)
                deepcache.disable(pipe)
            results[str(interval)] = entry
            print(interval, json.dumps({k: v for k, v in entry.items() if k != "seconds_all"}), flush=True)
    base = results[args.intervals.split(",")[0]]["seconds_median"]
    for e in results.values():
        e["speedup"] = base / e["seconds_median"]
    summary = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "preset": args.preset,
        "size": args.size,
        "steps": args.steps,
        "patched": args.patch,
        "results": results,
    }
    print(json.dumps({k: {i: round(e["speedup"], 2) for i, e in results.items()} for k in ["speedup"]}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
