"""sdkern::attention vs PyTorch's SDPA per call at SD1.5 U-Net, VAE and CLIP shapes (fp32, 2 threads, best of n).

Run: PYTHONPATH=benchmarks/results/session13 python benchmarks/results/session14/attention_avx2.py
"""

import torch
import torch.nn.functional as F
from _timing import best

import sdkern.ops  # noqa: F401  (registers torch.ops.sdkern)

torch.set_num_threads(2)


# (batch, S, S_kv, heads, head_dim, causal, reps)
SHAPES = [
    (2, 4096, 4096, 8, 40, False, 3), (2, 4096, 77, 8, 40, False, 5), (2, 1024, 1024, 8, 80, False, 3),
    (2, 1024, 1024, 8, 40, False, 5), (2, 1024, 77, 8, 40, False, 5), (2, 256, 256, 8, 80, False, 5),
    (2, 256, 256, 8, 160, False, 5), (2, 64, 64, 8, 160, False, 20), (1, 1024, 1024, 1, 512, False, 3),
    (1, 4096, 4096, 1, 512, False, 3), (2, 77, 77, 12, 64, True, 20), (2, 77, 77, 20, 64, True, 20),
]  # fmt: skip
for b, s, skv, h, d, causal, n in SHAPES:
    q, k, v = torch.randn(b, s, h, d), torch.randn(b, skv, h, d), torch.randn(b, skv, h, d)
    a = best(lambda q=q, k=k, v=v, c=causal: torch.ops.sdkern.attention(q, k, v, None, c), n) * 1e3
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    t = best(lambda qt=qt, kt=kt, vt=vt, c=causal: F.scaled_dot_product_attention(qt, kt, vt, is_causal=c), n) * 1e3
    print(f"B{b} S{s} Skv{skv} H{h} D{d}{' causal' if causal else ''}: sdkern {a:.2f} ms  SDPA {t:.2f} ms  "
          f"SDPA vs sdkern {a / t:.2f}x", flush=True)  # fmt: skip
