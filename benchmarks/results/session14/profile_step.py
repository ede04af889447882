"""Where a patched SD1.5 U-Net step's time goes (batch 2, --size latents, fp32, 2 threads): torch profiler by op and
input shape, and oneDNN's own log of the primitives one steady step executes (implementation, reorders).

Run from the repository root: PYTHONPATH=. python benchmarks/results/session14/profile_step.py
"""

import argparse
import collections
import os
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

import sdkern

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=32)
ap.add_argument("--eager", action="store_true", help="profile the unpatched model")
a = ap.parse_args()
torch.set_num_threads(2)
from tests.patch import models as M  # noqa: E402

torch.manual_seed(0)
model = M.unet(M.SD15_UNET).eval()
args = M.unet_inputs(model, batch=2, size=a.size)
if not a.eager:
    sdkern.patch(model)


def step() -> torch.Tensor:
    with torch.no_grad():
        return model(**args).sample


step()
step()
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
    step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=40))
print(
    p.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=90
    )
)
# oneDNN's log of one steady step: fd 1 redirected to a file meanwhile
sys.stdout.flush()
fd, path = tempfile.mkstemp()
saved = os.dup(1)
os.dup2(fd, 1)
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    step()
sys.stdout.flush()
os.dup2(saved, 1)
lines = [ln.split(",") for ln in open(path) if ln.startswith("onednn_verbose") and ",exec," in ln]
agg: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
for f in lines:
    agg[(f[5], f[6])].append(float(f[-1]))
for (prim, impl), ts in sorted(agg.items(), key=lambda kv: -sum(kv[1])):
    print(f"{prim:14s} {impl:28s} {len(ts):4d} calls {sum(ts):9.1f} ms")
reorders = [f for f in lines if f[5] == "reorder"]
for f in reorders[:20]:
    print("reorder", f[8], f[-2], f[-1].strip())
