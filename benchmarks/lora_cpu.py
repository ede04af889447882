"""LoRA load + fuse time on CPU: sdkern.lora vs diffusers' load_lora_weights + fuse_lora (PEFT),
SD1.5-architecture U-Net and CLIP text encoder with random weights, rank-8 LoRA on the attention
projections (U-Net to_q/k/v/out, text encoder q/k/v/out).

    python benchmarks/lora_cpu.py --out lora_cpu.json [--repeat 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from tests.lora.test_lora import _pipe, _random_lora


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    from sdkern import lora

    pipe = _pipe("sd15")
    sd = _random_lora(pipe, rank=args.rank)
    times: dict[str, list[float]] = {"diffusers": [], "sdkern": [], "sdkern_switch": [], "sdkern_unfuse": []}
    with torch.no_grad():
        for _ in range(args.repeat):
            ref = copy.deepcopy(pipe)
            t0 = time.perf_counter()
            ref.load_lora_weights(copy.deepcopy(sd))
            ref.fuse_lora()
            times["diffusers"].append(time.perf_counter() - t0)
            del ref
            t0 = time.perf_counter()
            lora.load(pipe, sd, adapter_name="a")
            times["sdkern"].append(time.perf_counter() - t0)
            lora.load(pipe, sd, adapter_name="b", fuse=False)
            t0 = time.perf_counter()
            lora.set_adapters(pipe, ["a", "b"], [0.5, 0.5])
            times["sdkern_switch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lora.unfuse(pipe)
            times["sdkern_unfuse"].append(time.perf_counter() - t0)
            lora.delete(pipe, ["a", "b"])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lora_layers": len(sd) // 2,
        "rank": args.rank,
        "median_s": med,
        "speedup_load_fuse": med["diffusers"] / med["sdkern"],
        "raw_s": times,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "raw_s"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
