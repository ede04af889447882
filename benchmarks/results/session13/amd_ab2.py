import time

import torch

import sdkern
from sdkern.patch import cpu_engine
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


e = t()
print(f"eager {e * 1e3:.0f}")
orig = cpu_engine.linear_problem
cpu_engine.linear_problem = lambda m: "left to MKL (experiment)"
sdkern.patch(model)
s = t()
sdkern.unpatch(model)
print(f"engine convs only, Linears eager: {s * 1e3:.0f} ms -> {e / s:.2f}x eager", flush=True)
cpu_engine.linear_problem = orig
sdkern.patch(model)
s2 = t()
sdkern.unpatch(model)
print(f"engine default: {s2 * 1e3:.0f} ms -> {e / s2:.2f}x eager", flush=True)
e2 = t()
print(f"eager again {e2 * 1e3:.0f}")
