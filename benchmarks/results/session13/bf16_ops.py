"""bf16 on a CPU without bf16 primitives: eager bf16 vs sdkern engine (fp32 compute) vs eager fp32, SD1.5 shapes."""

import torch
from _timing import best
from torch import nn

from sdkern.patch import cpu_engine

torch.manual_seed(0)


def t(f, n=3):
    return best(f, n)


print("probe:", cpu_engine.dtype_problem(torch.bfloat16))
cases = [
    ("conv 3x3 320->320 @64x64, batch 2", lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 64, 64)),
    ("conv 3x3 1280->1280 @8x8, batch 2", lambda: nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 8, 8)),
    ("linear 320->2560, 8192 tokens", lambda: nn.Linear(320, 2560), (8192, 320)),
    ("linear 1280->1280, 128 tokens", lambda: nn.Linear(1280, 1280), (128, 1280)),
]
with torch.no_grad():
    for name, mk, shape in cases:
        m = mk().eval()
        x = torch.randn(shape)
        te32 = t(lambda m=m, x=x: m(x))
        mb = mk().eval()
        mb.load_state_dict(m.state_dict())
        mb = mb.bfloat16()
        xb = x.bfloat16()
        if xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        teb = t(lambda mb=mb, xb=xb: mb(xb), n=1)
        ref = mb(xb).double()
        undo = []
        (cpu_engine.pack_conv2d if isinstance(mb, nn.Conv2d) else cpu_engine.pack_linear)(mb, undo)
        tsb = t(lambda mb=mb, xb=xb: mb(xb))
        y = mb(xb).double()
        print(
            f"{name}: eager fp32 {te32 * 1e3:.1f} ms | eager bf16 {teb * 1e3:.1f} ms | sdkern bf16 {tsb * 1e3:.1f} ms "
            f"({teb / tsb:.0f}x eager bf16, {te32 / tsb:.2f}x eager fp32) | "
            f"rel diff vs eager bf16 {((y - ref).norm() / ref.norm()).item():.1e}",
            flush=True,
        )
