from _timing import best, sd15_step

import sdkern
from sdkern.patch import cpu_engine

model, step = sd15_step()


def t(n=3):
    return best(step, n)


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
