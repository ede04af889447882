"""One SD1.5 3x3 convolution (batch 2, fp32, 2 threads, channels-last input) through oneDNN's prepacked primitive with
its weight packed without an input size ("none": what the engine did before session 14), for the call's input size
("size"), for batch 1 ("size1") and for 64x64 ("size_other"), next to eager F.conv2d (NCHW); best of 3 ms and the
packed weight's bytes. Run: python benchmarks/results/session14/conv_packing.py
"""

import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
mk = torch.ops.mkldnn


def tm(f, n=3):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3


SHAPES = [(320, 32, 320), (640, 16, 640), (640, 32, 320), (1280, 8, 1280), (4, 64, 320), (320, 64, 320),
          (1280, 16, 1280), (960, 32, 320)]  # fmt: skip
for cin, hw, cout in SHAPES:
    x = torch.randn(2, cin, hw, hw)
    w = torch.randn(cout, cin, 3, 3) * 0.02
    b = torch.randn(cout)
    xcl = x.contiguous(memory_format=torch.channels_last)
    r = {}
    sizes = {"none": None, "size": [2, cin, hw, hw], "size1": [1, cin, hw, hw], "size_other": [2, cin, 64, 64]}
    for name, isz in sizes.items():
        wp = mk._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, isz)
        ms = tm(
            lambda wp=wp, xcl=xcl, b=b: mk._convolution_pointwise(xcl, wp, b, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        )
        r[name] = (round(ms, 1), mk._nbytes(wp))
    r["eager"] = round(tm(lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1)), 1)
    print(cin, hw, cout, r, flush=True)
