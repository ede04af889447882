"""DeepCache on the Stable Video Diffusion U-Net (tiny-svd): full steps bit-identical, shallow steps reuse the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

import sdkern
from sdkern import deepcache, models
from tests.svd.test_svd_patch import _component

FRAMES = 3


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, FRAMES, 8, 8, 8, generator=g),
        torch.randn(2, 1, 32, generator=g),
        torch.randn(2, 3, generator=g),
    )


@torch.no_grad()
def test_full_steps_bit_identical_shallow_steps_reuse_deep_features() -> None:
    unet = _component("unet")
    seq = [(_inputs(i), t) for i, t in enumerate((3.0, 2.0, 1.0, 0.5))]
    plain = [unet(x, torch.tensor(t), c, a).sample for (x, c, a), t in seq]
    state = deepcache.enable(unet, cache_interval=3, cache_branch=0)  # OneDiffX's names
    assert (state.cfg.interval, state.cfg.layer_id, state.cfg.block_id) == (3, 0, 0)
    deep_calls = [0]  # a module inside the skipped mid block: runs on full steps only
    unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: deep_calls.__setitem__(0, deep_calls[0] + 1))
    cached = []
    for (x, c, a), t in seq:
        before = state.cache.clone() if state.cache is not None else None
        cached.append(unet(x, torch.tensor(t), c, a).sample)
        if state.mode == "shallow":  # the deep feature is read, not rewritten
            assert torch.equal(state.cache, before)
    assert (state.full_calls, state.shallow_calls) == (2, 2)  # steps 0 and 3 full
    assert deep_calls[0] == 2
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[3], plain[3])
    assert not torch.equal(cached[1], plain[1])  # really reused stale deep features
    assert deepcache.disable(unet)
    assert all("forward" not in m.__dict__ for m in unet.modules())
    again = [unet(x, torch.tensor(t), c, a).sample for (x, c, a), t in seq]
    assert all(torch.equal(p, q) for p, q in zip(again, plain, strict=True))


def _unet_two_per_level() -> torch.nn.Module:
    # tiny-svd with SVD's 2 sub-blocks per level (tiny-svd itself has 1), so every cache point kind is reached
    from diffusers import UNetSpatioTemporalConditionModel

    from sdkern.models.svd import TINY_SVD

    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(**{**TINY_SVD.unet, "layers_per_block": 2}).eval()


@pytest.mark.parametrize(("branch", "layer_block"), [(0, (0, 0)), (1, (0, 1)), (2, (1, 0)), (3, None)])
@torch.no_grad()
def test_shallow_step_on_same_inputs_reproduces_full_step(branch: int, layer_block: tuple[int, int] | None) -> None:
    # Same inputs: the cached deep feature is what a full pass computes, so the shallow step reproduces it.
    unet = _unet_two_per_level()
    if layer_block is None:  # deepest level, last block: nothing to skip
        with pytest.raises(ValueError, match="skips nothing"):
            deepcache.enable(unet, cache_branch=branch)
        return
    x, c, a = _inputs(7)
    full = unet(x, torch.tensor(1.5), c, a).sample
    state = deepcache.enable(unet, cache_interval=2, cache_branch=branch)
    assert (state.cfg.layer_id, state.cfg.block_id) == layer_block
    first = unet(x, torch.tensor(1.5), c, a).sample
    second = unet(x, torch.tensor(1.5), c, a).sample
    assert (state.full_calls, state.shallow_calls) == (1, 1)
    assert torch.equal(first, full)
    torch.testing.assert_close(second, full, rtol=1e-5, atol=1e-5)
    frac = deepcache.flops_fraction(unet, x, torch.tensor(1.5), c, a)
    assert 0.0 < frac < 0.9, frac
    deepcache.disable(unet)


@torch.no_grad()
def test_patched_pipeline_with_deepcache() -> None:
    pipe = models.build("tiny-svd", seed=2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    def run() -> torch.Tensor:
        return pipe(
            image,
            height=32,
            width=32,
            num_frames=FRAMES,
            num_inference_steps=4,
            decode_chunk_size=FRAMES,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).frames

    sdkern.patch(pipe)
    patched = run()
    sdkern.unpatch(pipe)
    sdkern.patch(pipe, deepcache={"interval": 2})
    state = deepcache.state_of(pipe)
    cached = run()
    assert (state.full_calls, state.shallow_calls) == (2, 2)  # steps 0 and 2 full (CFG batch: one call a step)
    assert torch.isfinite(cached).all() and not torch.equal(cached, patched)
    sdkern.unpatch(pipe)
    assert deepcache.state_of(pipe) is None
