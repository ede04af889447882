"""A/B of the SD1.5 U-Net step (batch 2, --size latents, fp32, 2 threads) in one process: eager, then patched
with each im2col threshold, best of --n steps each; prints the first patched step's excess (packing for the size).

Run from the repository root: PYTHONPATH=.:benchmarks/results/session13 python benchmarks/results/session14/ab_step.py
"""

import argparse
import time

import torch
from _timing import best

import sdkern
from sdkern.patch import cpu_engine_modules as cem

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=32)
ap.add_argument("--n", type=int, default=3)
ap.add_argument("--im2col", type=int, nargs="+", default=[64, 16, 0])
a = ap.parse_args()
torch.set_num_threads(2)

from tests.patch import models as M  # noqa: E402

torch.manual_seed(0)
model = M.unet(M.SD15_UNET).eval()
args = M.unet_inputs(model, batch=2, size=a.size)


def step() -> torch.Tensor:
    with torch.no_grad():
        return model(**args).sample


ref = step()
eager = best(step, a.n)
print(f"eager {eager * 1e3:.0f} ms", flush=True)
for im in a.im2col:
    cem.IM2COL_MAX_PIXELS = im
    t0 = time.perf_counter()
    sdkern.patch(model)
    t1 = time.perf_counter()
    y = step()
    t2 = time.perf_counter()
    s = best(step, a.n)
    rel = ((y - ref).norm() / ref.norm()).item()
    print(
        f"im2col<={im}: {s * 1e3:.0f} ms ({eager / s:.2f}x eager), patch {t1 - t0:.1f} s, first step {t2 - t1:.1f} s "
        f"(excess {t2 - t1 - s:.1f} s), rel diff vs eager {rel:.1e}",
        flush=True,
    )
    sdkern.unpatch(model)
print(f"eager again {best(step, a.n) * 1e3:.0f} ms")
