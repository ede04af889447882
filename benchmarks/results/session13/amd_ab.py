from _timing import best, sd15_step
from torch.profiler import ProfilerActivity, profile

import sdkern
from sdkern.patch import cpu_engine_modules as cem

model, step = sd15_step()


def t(n=3):
    return best(step, n)


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
