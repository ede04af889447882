import time

import torch
from torch.profiler import ProfilerActivity, profile

import sdkern
from sdkern.patch import cpu_engine_modules as cem
from tests.patch import models as M

torch.manual_seed(0)
model = M.unet(M.SD15_UNET).eval()
args = M.unet_inputs(model, batch=2, size=32)


def step():
    with torch.no_grad():
        return model(**args).sample


def t(n=3):
    step()
    b = 1e9
    for _ in range(n):
        a = time.perf_counter()
        step()
        b = min(b, time.perf_counter() - a)
    return b


res = {}
res["eager"] = t()
for name, kw, im2col in [
    ("engine", {}, 64),
    ("engine-direct", {}, 0),
    ("no-engine", {"cpu_engine": False}, 64),
    ("engine-noattn", {"attention": False}, 64),
]:
    cem.IM2COL_MAX_PIXELS = im2col
    try:
        sdkern.patch(model, **kw)
    except TypeError as e:
        print(name, "skip", e)
        continue
    res[name] = t()
    sdkern.unpatch(model)
    print(
        name,
        f"{res[name] * 1e3:.0f} ms vs eager {res['eager'] * 1e3:.0f} ms -> {res['eager'] / res[name]:.2f}x",
        flush=True,
    )
res["eager2"] = t()
print("eager again", f"{res['eager2'] * 1e3:.0f}")
# profile default patched step
cem.IM2COL_MAX_PIXELS = 64
sdkern.patch(model)
step()

with profile(activities=[ProfilerActivity.CPU]) as p:
    step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
sdkern.unpatch(model)
step()
with profile(activities=[ProfilerActivity.CPU]) as p:
    step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
