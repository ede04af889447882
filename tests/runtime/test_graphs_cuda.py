"""CUDA-graph capture/replay parity on a GPU (skipped without one; run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

SCHEDULERS = [
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]


def _pipe(preset="sd15", dtype=torch.float16):
    from sdkern.models import build

    pipe = build(preset, dtype=dtype, device="cuda", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_unet_replay_matches_eager_sd15_and_resolution_change():
    import sdkern
    from sdkern.runtime import graphs

    pipe = _pipe()
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    cases = [(64, 64), (64, 64), (48, 80)]
    inputs = [
        (
            torch.randn(2, 4, h, w, generator=g).cuda().half(),
            torch.randn(2, 77, 768, generator=g).cuda().half(),
            float(t),
        )
        for (h, w), t in zip(cases, (999, 500, 20), strict=True)
    ]
    sdkern.patch(pipe)
    eager = [unet(x, t, e).sample for x, e, t in inputs]
    runner = graphs.enable(unet)
    replayed = [unet(x, t, e).sample for x, e, t in inputs]
    assert runner.captures == 2  # the second 64x64 call replays; 48x80 captures a new graph
    for a, b in zip(replayed, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    # in-place weight change (what LoRA fuse does) is seen by the replay without recapture
    w = unet.conv_in.weight
    w.add_(0.01 * torch.randn_like(w))
    x, e, t = inputs[0]
    after = unet(x, t, e).sample
    assert runner.captures == 2
    graphs.disable(unet)
    torch.testing.assert_close(after, unet(x, t, e).sample, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@torch.no_grad()
def test_pipeline_with_graphs_matches_eager(scheduler):
    import diffusers

    import sdkern

    pipe = _pipe()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    lat = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3)).cuda().half()

    def run(steps):
        gen = torch.Generator().manual_seed(5)  # Euler-a draws noise each step
        return pipe(["a", "b"][:1], num_inference_steps=steps, latents=lat, generator=gen, output_type="latent").images

    sdkern.patch(pipe)
    eager = run(6)
    sdkern.unpatch(pipe)
    sdkern.patch(pipe, cuda_graphs=True)
    graphed = run(6)
    graphed_other_steps = run(4)  # num_inference_steps is free
    assert graphed_other_steps.shape == graphed.shape
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=5e-3, atol=5e-3)
    sdkern.unpatch(pipe)
