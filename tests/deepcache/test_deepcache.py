"""DeepCache on small SD-architecture U-Nets (random weights, CPU)."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdkern import deepcache  # noqa: E402
from sdkern.deepcache import DeepCacheConfig, full_steps  # noqa: E402
from sdkern.runtime import graphs  # noqa: E402
from tests.runtime.test_graphs import FakeBackend  # noqa: E402
from tests.utils import randn  # noqa: E402


def _unet(kind: str = "sd1"):
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8)
    if kind == "sd1":
        cfg = dict(
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=8,
        )
    elif kind == "sd2":
        cfg = dict(
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
        )
    else:  # sdxl-like: first level without attention, several transformer layers, added conditioning
        cfg = dict(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=8,
            transformer_layers_per_block=(1, 2, 3),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 24,
        )
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**common, **cfg).eval()


def _inputs(kind: str = "sd1", b: int = 2):
    x, ehs = randn(b, 4, 16, 16), randn(b, 7, 24)
    kw = {}
    if kind == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": randn(b, 24), "time_ids": randn(b, 6)}
    return x, ehs, kw


@torch.no_grad()
def test_full_steps_equal_plain_unet_and_disable_restores():
    unet = _unet()
    seq = [(_inputs(), t) for t in (900, 800, 700, 600)]
    plain = [unet(x, t, e, **kw).sample for (x, e, kw), t in seq]
    state = deepcache.enable(unet, interval=3)
    cached = [unet(x, t, e, **kw).sample for (x, e, kw), t in seq]
    assert (state.full_calls, state.shallow_calls) == (2, 2)  # steps 0 and 3 full
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[3], plain[3])
    assert not torch.equal(cached[1], plain[1])  # really reused stale deep features
    assert deepcache.disable(unet) is True
    assert "forward" not in unet.__dict__
    assert all("forward" not in m.__dict__ for m in unet.modules())
    again = [unet(x, t, e, **kw).sample for (x, e, kw), t in seq]
    assert all(torch.equal(a, b) for a, b in zip(again, plain, strict=True))


@torch.no_grad()
def test_cached_step_equals_hand_built_shallow_branch():
    unet = _unet()
    state = deepcache.enable(unet, interval=2, layer_id=0, block_id=0)
    (x0, e0, _), (x1, e1, _) = _inputs(), _inputs()
    unet(x0, 700, e0)
    cache = state.cache.clone()
    got = unet(x1, 600, e1).sample
    assert state.mode == "shallow"
    deepcache.disable(unet)

    # hand-built: conv_in, down0 sub-block 0, up[-1] sub-blocks 1..2 with the cached feature
    t = torch.tensor([600] * 2)
    emb = unet.time_embedding(unet.time_proj(t).to(x1.dtype))
    h0 = unet.conv_in(x1)
    d0 = unet.down_blocks[0]
    r0 = d0.attentions[0](d0.resnets[0](h0, emb), encoder_hidden_states=e1, return_dict=False)[0]
    up = unet.up_blocks[-1]
    h = up.resnets[1](torch.cat([cache, r0], dim=1), emb)
    h = up.attentions[1](h, encoder_hidden_states=e1, return_dict=False)[0]
    h = up.resnets[2](torch.cat([h, h0], dim=1), emb)
    h = up.attentions[2](h, encoder_hidden_states=e1, return_dict=False)[0]
    ref = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize(("layer_id", "block_id"), [(0, 0), (0, 1), (1, 0), (1, 1)])
@torch.no_grad()
def test_shallow_step_on_same_inputs_reproduces_full_step(kind, layer_id, block_id):
    # With the same inputs the cached deep feature is exactly what the full pass would compute, so a
    # shallow step must reproduce the full output: checks the wiring for every (layer, block).
    unet = _unet(kind)
    n = len(unet.down_blocks)
    if layer_id == n - 1 and block_id == 1:
        with pytest.raises(ValueError, match="skips nothing"):
            deepcache.enable(unet, layer_id=layer_id, block_id=block_id)
        return
    x, e, kw = _inputs(kind)
    full = unet(x, 500, e, **kw).sample
    state = deepcache.enable(unet, interval=2, layer_id=layer_id, block_id=block_id)
    a = unet(x, 500, e, **kw).sample
    b = unet(x, 500, e, **kw).sample
    assert state.shallow_calls == 1
    torch.testing.assert_close(a, full, rtol=0, atol=0)
    torch.testing.assert_close(b, full, rtol=1e-5, atol=1e-5)
    frac = deepcache.flops_fraction(unet, x, 500, e, **kw)
    assert 0.0 < frac < 0.9, frac
    deepcache.disable(unet)


def test_flops_fraction_is_reported_and_smaller_for_shallower_branch():
    unet = _unet()
    x, e, _ = _inputs()
    deepcache.enable(unet, layer_id=0, block_id=0)
    f00 = deepcache.flops_fraction(unet, x, 10, e)
    deepcache.enable(unet, layer_id=1, block_id=1)
    f11 = deepcache.flops_fraction(unet, x, 10, e)
    assert 0 < f00 < f11 < 1


@torch.no_grad()
def test_state_resets_between_pipeline_calls():
    unet = _unet()
    sched = diffusers.DDIMScheduler()
    pipe = types.SimpleNamespace(unet=unet, scheduler=sched)
    state = deepcache.enable(pipe, interval=3)
    x, e, _ = _inputs()
    for _ in range(2):  # two "pipeline calls"
        sched.set_timesteps(5)
        modes = []
        for t in sched.timesteps:
            unet(x, t, e)
            modes.append(state.mode)
        assert modes == ["full", "shallow", "shallow", "full", "shallow"]
    # a new generation detected from the timestep going up, without set_timesteps
    unet(x, 999, e)
    assert state.mode == "full"
    deepcache.disable(pipe)
    assert "set_timesteps" not in sched.__dict__


def test_schedules():
    cfg = DeepCacheConfig(interval=5, schedule="non-uniform")
    steps = sorted(full_steps(50, cfg))
    assert steps[0] == 0 and len(steps) == 10
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert gaps[0] < gaps[-1]  # denser near the start
    assert full_steps(10, DeepCacheConfig(interval=3)) == {0, 3, 6, 9}
    assert full_steps(4, DeepCacheConfig(interval=1)) == {0, 1, 2, 3}
    for bad in (dict(interval=0), dict(schedule="cosine"), dict(layer_id=-1), dict(power=0)):
        with pytest.raises(ValueError):
            DeepCacheConfig(**bad)
    with pytest.raises(ValueError, match="down blocks"):
        deepcache.enable(_unet(), layer_id=7)


@torch.no_grad()
def test_with_graph_runner_one_graph_per_mode():
    unet = _unet()
    backend = FakeBackend()
    state = deepcache.enable(unet, interval=2)
    runner = graphs.enable(unet, backend=backend)
    assert state.driven
    x, e, _ = _inputs()
    outs = [unet(x, t, e).sample for t in (900, 800, 700, 600)]
    assert backend.captured == 2 and (state.full_calls, state.shallow_calls) == (2, 2)
    graphs.disable(unet)
    assert not state.driven and runner.hooks is None
    deepcache.disable(unet)
    deepcache.enable(unet, interval=2)
    ref = [unet(x, t, e).sample for t in (900, 800, 700, 600)]
    for a, b in zip(outs, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_patch_with_deepcache_and_graphs_then_unpatch_restores():
    import sdkern
    from sdkern.runtime import graphs as g

    unet = _unet()
    x, e, _ = _inputs()
    before = unet(x, 500, e).sample
    sdkern.patch(unet, deepcache={"interval": 2}, cuda_graphs=True)
    state = deepcache.state_of(unet)
    runner = g.runner_of(unet)
    assert state is not None and runner is not None and state.driven  # graphs drive the step counter
    outs = [unet(x, t, e).sample for t in (900, 800)]
    assert (state.full_calls, state.shallow_calls) == (1, 1)
    assert runner.eager_calls == 2  # CPU tensors: the CUDA graph runner runs eagerly
    assert outs[0].shape == before.shape
    sdkern.unpatch(unet)
    assert deepcache.state_of(unet) is None and g.runner_of(unet) is None
    assert all("forward" not in m.__dict__ for m in unet.modules())
    assert torch.equal(unet(x, 500, e).sample, before)
