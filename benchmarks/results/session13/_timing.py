"""Shared by the session-13 scripts: best-of-n wall time and the SD1.5 U-Net step (batch 2, 32x32 latents)."""

import time
from collections.abc import Callable

import torch


def best(f: Callable[[], object], n: int = 3) -> float:
    """Seconds of the fastest of ``n`` calls of ``f`` after one warm-up call."""
    f()
    b = 1e9
    for _ in range(n):
        a = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - a)
    return b


def sd15_step() -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The random-weight SD1.5 U-Net and a no-grad step on batch 2, 32x32 latents (tests.patch.models)."""
    from tests.patch import models as M

    torch.manual_seed(0)
    model = M.unet(M.SD15_UNET).eval()
    args = M.unet_inputs(model, batch=2, size=32)

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(**args).sample

    return model, step
