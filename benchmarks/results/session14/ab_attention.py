"""A/B of the SD1.5 U-Net step (batch 2, --size latents, fp32, 2 threads) in one process: patched with the U-Net's
attention on sdkern::attention vs on PyTorch's SDPA (the choice without AVX-512), alternating, best of --n each.

Run from the repository root:
PYTHONPATH=.:benchmarks/results/session13 python benchmarks/results/session14/ab_attention.py
"""

import argparse

import torch
from _timing import best

import sdkern
from sdkern.patch.modules import SdkernAttnProcessor

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=32)
ap.add_argument("--n", type=int, default=3)
ap.add_argument("--rounds", type=int, default=3)
a = ap.parse_args()
torch.set_num_threads(2)

from tests.patch import models as M  # noqa: E402

torch.manual_seed(0)
model = M.unet(M.SD15_UNET).eval()
args = M.unet_inputs(model, batch=2, size=a.size)
sdkern.patch(model)
procs = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), SdkernAttnProcessor)]


def step() -> torch.Tensor:
    with torch.no_grad():
        return model(**args).sample


res: dict[bool, list[float]] = {False: [], True: []}
for _ in range(a.rounds):
    for sdpa in (False, True):
        for p in procs:
            p.sdpa = sdpa
        res[sdpa].append(best(step, a.n))
s, t = min(res[False]), min(res[True])
print(f"{a.size}x{a.size}: sdkern::attention {s * 1e3:.0f} ms, SDPA {t * 1e3:.0f} ms -> SDPA {s / t:.3f}x")
