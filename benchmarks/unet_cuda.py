"""SD1.5-architecture U-Net step and full-pipeline latency on CUDA: eager diffusers vs sdkern patched
vs patched + CUDA graphs (run by benchmarks/gpu_check.sh; needs a GPU).

    python benchmarks/unet_cuda.py --out unet_cuda.json [--steps 50] [--dtype float16]

U-Net step: 64x64 latents (512x512 images), batch 2 (classifier-free guidance), median of repeats,
timed with CUDA events. Pipeline: ``--steps`` DDIM steps end to end from fixed CPU-drawn latents,
random weights (sdkern.models presets). Peak memory from the CUDA caching allocator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _time_cuda(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1

    import sdkern
    from sdkern.models import build

    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 64, 64, generator=g).to(dev, dtype)
    ehs = torch.randn(2, 77, 768 if args.preset == "sd15" else 1024, generator=g).to(dev, dtype)
    t = torch.tensor(500, device=dev)
    results: dict[str, dict] = {}
    ref_out = None
    for engine in ("eager", "sdkern", "sdkern-graphs"):
        pipe = build(args.preset, dtype=dtype, device=dev, seed=0)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        if engine != "eager":
            sdkern.patch(pipe, cuda_graphs=(engine == "sdkern-graphs"))
        torch.cuda.synchronize()
        setup_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()

        @torch.no_grad()
        def step(pipe=pipe):
            return pipe.unet(sample, t, ehs).sample

        times = _time_cuda(step, warmup=3, repeat=args.repeat)
        with torch.no_grad():
            out = step().float()
        if ref_out is None:
            ref_out = out
        lat = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)).to(dev, dtype)

        def run_pipe(pipe=pipe, lat=lat):
            return pipe(
                "a photo", num_inference_steps=args.steps, latents=lat, output_type="latent", guidance_scale=7.5
            ).images

        run_pipe()  # warm-up / capture
        e2e = _time_cuda(run_pipe, warmup=0, repeat=3)
        results[engine] = {
            "unet_step_ms_median": statistics.median(times),
            "unet_step_ms_all": times,
            "pipeline_ms_median": statistics.median(e2e),
            "pipeline_ms_all": e2e,
            "steps": args.steps,
            "setup_s": setup_s,
            "peak_memory_MB": torch.cuda.max_memory_allocated() / 2**20,
            "max_abs_diff_vs_eager": (out - ref_out).abs().max().item(),
        }
        print(engine, json.dumps({k: v for k, v in results[engine].items() if not k.endswith("_all")}))
        del pipe
        torch.cuda.empty_cache()

    summary = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "latents": [2, 4, 64, 64],
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
