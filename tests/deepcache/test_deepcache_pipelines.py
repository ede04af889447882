"""DeepCache next to the authors' (horseee/DeepCache) rules, and with ControlNet, img2img and inpainting pipelines.

The authors' quad-center schedule is checked against the step lists their ``sample_from_quad_center`` gives for known
parameters (recorded from running their function), and their ``block_id = m`` branch against a hand-written
re-implementation of their U-Net's rule (the ``quick_replicate`` path of ``DeepCache/sd/unet_2d_condition.py``).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdkern import deepcache, models  # noqa: E402
from sdkern.deepcache import DeepCacheConfig, full_steps, quad_center_steps  # noqa: E402
from tests.deepcache.test_deepcache import _inputs, _unet  # noqa: E402

# (num_steps, count, center, pow) -> (sorted steps, the exponent the authors' search ended at); values printed by
# horseee/DeepCache's sample_from_quad_center (DeepCache/sd/pipeline_stable_diffusion.py) for these arguments.
AUTHORS_LISTS = {
    (50, 10, 15, 1.4): ([0, 5, 9, 13, 17, 21, 26, 31, 37, 43], 1.4),
    (50, 17, 20, 1.4): ([0, 3, 6, 9, 12, 15, 17, 20, 21, 24, 27, 30, 33, 36, 39, 42, 46], 1.4),
    (25, 9, 10, 1.4): ([0, 3, 6, 8, 10, 12, 15, 18, 21], 1.4),
    (20, 10, 5, 1.5): ([0, 2, 4, 5, 6, 8, 10, 12, 14, 17], 1.5),
    (30, 15, 12, 1.2): ([0, 3, 5, 7, 8, 10, 12, 13, 15, 17, 19, 21, 23, 25, 27], 1.2),
    (10, 4, 3, 1.4): ([0, 3, 4, 6], 1.4),
    (12, 6, 6, 1.3): ([0, 3, 5, 6, 7, 9], 1.3),
    (8, 4, 0, 1.4): ([0, 1, 3, 5], 1.4),
    (4, 3, 1, 1.2): ([0, 1, 2], 1.2),
    # the exponent search lowers pow in 0.02 steps (float subtraction, as theirs)
    (10, 4, 0, 2.0): ([0, 1, 3, 6], 1.6599999999999997),
    (10, 6, 0, 1.4): ([0, 1, 2, 4, 5, 7], 1.2799999999999998),
    (10, 7, 3, 1.2): ([0, 2, 3, 4, 5, 6, 8], 1.0999999999999999),
}
AUTHORS_FAIL = [(10, 5, 5, 1.2), (10, 7, 5, 2.0), (10, 9, 3, 1.4)]  # their function raises ValueError


@pytest.mark.parametrize("args", list(AUTHORS_LISTS), ids=lambda a: "-".join(map(str, a)))
def test_quad_center_schedule_is_the_authors(args):
    steps, p = quad_center_steps(*args)
    assert (steps, p) == AUTHORS_LISTS[args]


def test_quad_center_schedule_in_config_and_failures():
    # ceil(steps / interval) full steps, as the authors' pipelines ask for
    cfg = DeepCacheConfig(interval=5, schedule="quad-center", center=15, power=1.4)
    assert full_steps(50, cfg) == set(AUTHORS_LISTS[(50, 10, 15, 1.4)][0])
    cfg = DeepCacheConfig(interval=3, schedule="quad-center", center=10, power=1.4)
    assert math.ceil(25 / 3) == 9 and full_steps(25, cfg) == set(AUTHORS_LISTS[(25, 9, 10, 1.4)][0])
    for args in AUTHORS_FAIL:
        with pytest.raises(ValueError, match="quad-center"):
            quad_center_steps(*args)
    with pytest.raises(ValueError, match="center"):
        DeepCacheConfig(schedule="quad-center")


# ---- block_id = m: the authors' rule, re-implemented on diffusers' blocks --------------------------------------
def _down_sub(block, j, h, emb, ehs):
    h = block.resnets[j](h, emb)
    if getattr(block, "attentions", None):
        h = block.attentions[j](h, encoder_hidden_states=ehs, return_dict=False)[0]
    return h


def _up_sub(block, k, h, res, emb, ehs):
    h = block.resnets[k](torch.cat([h, res], dim=1), emb)
    if getattr(block, "attentions", None):
        h = block.attentions[k](h, encoder_hidden_states=ehs, return_dict=False)[0]
    return h


def _authors(unet, x, t, ehs, layer, block, cache=None):
    """The authors' U-Net forward (SD, no added conditioning). ``cache=None``: full pass, returning (output, the
    feature they record); else their quick_replicate pass with that feature.

    Their rule: the down loop stops after level ``layer``, which returns once ``block + 1`` output states exist
    (``block = m``: its m sub-blocks and the downsampler). For the up path ``block == m`` becomes
    ``(layer + 1, 0)``, else ``(layer, block + 1)``; up block ``n - 1 - layer'`` then runs only its last
    ``block' + 1`` sub-blocks, and the full pass records the input of sub-block ``-(block' + 1)`` of that up block.
    """
    n = len(unet.down_blocks)
    emb = unet.time_embedding(unet.time_proj(torch.tensor([t] * x.shape[0])).to(x.dtype))
    h = unet.conv_in(x)
    res = [h]
    for i, blk in enumerate(unet.down_blocks):
        if cache is not None and i > layer:
            break
        states = 0
        for j in range(len(blk.resnets)):
            h = _down_sub(blk, j, h, emb, ehs)
            res.append(h)
            states += 1
            if cache is not None and i == layer and states == block + 1:
                break
        else:
            if blk.downsamplers is not None:
                h = blk.downsamplers[0](h)
                res.append(h)
    up_layer, up_block = (layer + 1, 0) if block == len(unet.down_blocks[layer].attentions) else (layer, block + 1)
    recorded = None
    if cache is None:
        h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    else:
        h = cache
    for i, blk in enumerate(unet.up_blocks):
        count = len(blk.resnets)
        if cache is not None:
            if i < n - 1 - up_layer:
                continue
            if i == n - 1 - up_layer:
                count = up_block + 1
        mine, res = res[-count:], res[:-count]
        for k in range(len(blk.resnets) - count, len(blk.resnets)):
            if cache is None and i == n - 1 - up_layer and k == len(blk.resnets) - 1 - up_block:
                recorded = h
            h = _up_sub(blk, k, h, mine[-1 - (k - (len(blk.resnets) - count))], emb, ehs)
        if blk.upsamplers is not None:
            h = blk.upsamplers[0](h)
    out = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return out, recorded


@pytest.mark.parametrize(("layer", "block"), [(0, 2), (1, 2), (0, 1), (1, 0)])
@torch.no_grad()
def test_block_id_follows_the_authors_rule(layer, block):
    """Full-pass cache and shallow output equal the authors' rule re-implemented above, for block_id = m (their
    whole level, downsampler included) and below it."""
    unet = _unet("sd1")  # 3 levels, 2 sub-blocks each, cross-attention in levels 0 and 1
    (x0, e0, _), (x1, e1, _) = _inputs(), _inputs()
    ref_full, ref_cache = _authors(unet, x0, 700, e0, layer, block)
    ref_shallow, _ = _authors(unet, x1, 600, e1, layer, block, cache=ref_cache)
    state = deepcache.enable(unet, interval=2, layer_id=layer, block_id=block)
    full = unet(x0, 700, e0).sample
    cache = state.cache.clone()
    shallow = unet(x1, 600, e1).sample
    assert (state.full_calls, state.shallow_calls) == (1, 1)
    deepcache.disable(unet)
    plain = unet(x0, 700, e0).sample
    assert torch.equal(full, plain)  # the full step is the plain U-Net
    torch.testing.assert_close(full, ref_full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache, ref_cache, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shallow, ref_shallow, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(shallow, unet(x1, 600, e1).sample, rtol=1e-4)  # stale deep features were used


@torch.no_grad()
def test_block_id_m_reproduces_full_step_and_refuses_deepest_level():
    unet = _unet("sd1")
    x, e, _ = _inputs()
    plain = unet(x, 500, e).sample
    deepcache.enable(unet, interval=2, layer_id=0, block_id=2)
    assert torch.equal(unet(x, 500, e).sample, plain)
    torch.testing.assert_close(unet(x, 500, e).sample, plain, rtol=1e-5, atol=1e-5)
    f_m = deepcache.flops_fraction(unet, x, 500, e)
    deepcache.enable(unet, interval=2, layer_id=0, block_id=1)
    f_1 = deepcache.flops_fraction(unet, x, 500, e)
    assert f_1 < f_m < 1  # the whole level (with the downsampler and one deeper sub-block) costs more
    deepcache.disable(unet)
    with pytest.raises(ValueError, match="block_id=3"):
        deepcache.enable(unet, layer_id=0, block_id=3)
    with pytest.raises(ValueError, match="deeper level"):
        deepcache.enable(unet, layer_id=2, block_id=2)


# ---- pipelines ------------------------------------------------------------------------------------------------
def _record(pipe) -> tuple[list[dict[str, Any]], list[Any]]:
    """Forward hooks recording every U-Net and ControlNet call (inputs, output, DeepCache mode)."""
    calls: list[dict[str, Any]] = []
    handles = []

    def hook(name):
        def fn(module, args, kwargs, out):
            state = deepcache.state_of(pipe)
            mode = None if state is None else state.mode
            calls.append({"name": name, "args": args, "kwargs": kwargs, "out": out, "mode": mode})

        return fn

    for name in ("unet", "controlnet"):
        m = getattr(pipe, name, None)
        if m is not None:
            handles.append(m.register_forward_hook(hook(name), with_kwargs=True))
    return calls, handles


def _first_tensor(out):
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple):
        return out[0] if isinstance(out[0], torch.Tensor) else torch.cat([t.flatten() for t in out[0]])
    return torch.cat([t.flatten() for t in out.down_block_res_samples])


def _check_full_steps_plain(pipe, calls):
    """Every call made on a full step equals the plain model (DeepCache disabled) on the same inputs, bit for bit."""
    checked = 0
    for c in calls:
        if c["mode"] != "full":
            continue
        if c["name"] == "controlnet":
            continue  # the ControlNet call precedes its step's U-Net call; checked through the U-Net's residuals
        m = getattr(pipe, c["name"])
        again = m(*c["args"], **c["kwargs"])
        assert torch.equal(_first_tensor(again), _first_tensor(c["out"])), c["name"]
        checked += 1
    return checked


def _masked_controlnet(pipe, state, used: int):
    """Reference: the whole ControlNet every step; on shallow steps the residuals the shallow U-Net branch does not
    consume (all but the first ``used``, and the mid-block one) replaced by broadcasting zeros. Returns the undo."""
    cn = pipe.controlnet
    original = cn.forward

    def forward(sample, timestep, *args, **kwargs):
        full = state.next_is_full(timestep)
        down, mid = original(sample, timestep, *args, **{**kwargs, "return_dict": False})
        if not full:
            zero = torch.zeros((1, 1, 1, 1), dtype=sample.dtype)
            down, mid = tuple(d if k < used else zero for k, d in enumerate(down)), zero
        return down, mid

    cn.forward = forward
    return lambda: cn.__dict__.pop("forward")


@torch.no_grad()
def test_controlnet_pipeline_deepcache():
    import types

    pipe = models.build("tiny-controlnet", seed=21)
    from PIL import Image

    control = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())

    def run(scale: float):
        g = torch.Generator().manual_seed(5)
        return pipe(
            "a cat",
            image=control,
            num_inference_steps=3,
            controlnet_conditioning_scale=scale,
            generator=g,
            output_type="latent",
        ).images

    plain = run(0.9)
    # reference: DeepCache on the U-Net alone, the whole ControlNet with its unconsumed residuals zeroed
    ref_state = deepcache.enable(types.SimpleNamespace(unet=pipe.unet, scheduler=pipe.scheduler), interval=2)
    undo = _masked_controlnet(pipe, ref_state, used=2)  # (0, 0): conv_in's and level 0 sub-block 0's residuals
    reference = run(0.9)
    reference0 = run(0.0)
    undo()
    deepcache.disable(pipe.unet)

    state = deepcache.enable(pipe, interval=2)
    calls, handles = _record(pipe)
    shallow = run(0.9)
    for h in handles:
        h.remove()
    # PNDM (PLMS) makes 4 U-Net calls for 3 steps: full 0, 2; shallow 1, 3
    assert (state.full_calls, state.shallow_calls, state.controlnet_shallow_calls) == (2, 2, 2)
    assert torch.equal(shallow, reference)  # the truncated ControlNet computes exactly the consumed residuals
    assert not torch.equal(shallow, plain)
    assert sum(c["name"] == "controlnet" for c in calls) == 4

    # conditioning scale 0: the ControlNet is not run on shallow steps, and nothing changes
    skipped0 = run(0.0)
    assert state.controlnet_skipped == 2 and state.controlnet_shallow_calls == 2
    assert torch.equal(skipped0, reference0)

    # full steps are the plain U-Net and the plain ControlNet on the same inputs
    deepcache.disable(pipe)
    assert _check_full_steps_plain(pipe, calls) == 2
    full_cn = [c for c in calls if c["name"] == "controlnet"][::2]  # calls 0 and 2 (full)
    for c in full_cn:
        down, mid = pipe.controlnet(*c["args"], **c["kwargs"])
        ref_down, ref_mid = c["out"]
        assert all(torch.equal(a, b) for a, b in zip(down, ref_down, strict=True)) and torch.equal(mid, ref_mid)
    assert "forward" not in pipe.controlnet.__dict__
    assert all("forward" not in m.__dict__ for m in pipe.controlnet.modules())
    assert torch.equal(run(0.9), plain)


@torch.no_grad()
def test_controlnet_shallow_residuals_equal_full_ones_where_consumed():
    """A shallow-step ControlNet call computes exactly the full call's residuals for the blocks the shallow U-Net
    branch consumes (conv_in's and level 0's first sub-block for (0, 0))."""
    pipe = models.build("tiny-controlnet", seed=22)
    cn = pipe.controlnet
    x, ehs, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.rand(2, 3, 32, 32)
    full_down, _ = cn(x, 600, ehs, cond, return_dict=False)
    state = deepcache.enable(pipe, interval=2, layer_id=0, block_id=0)
    pipe.unet(x, 700, ehs)  # step 0: full, fills the cache
    down, _ = cn(x, 600, ehs, cond, return_dict=False)  # step 1: shallow
    assert state.controlnet_shallow_calls == 1
    assert torch.equal(down[0], full_down[0]) and torch.equal(down[1], full_down[1])
    assert not torch.equal(down[-1], full_down[-1])  # a deep residual was not computed
    deepcache.disable(pipe)


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet-img2img", "controlnet-inpaint"])
@torch.no_grad()
def test_schedule_follows_strength_shortened_steps(kind):
    from PIL import Image

    extra: dict[str, Any] = {}
    if kind.endswith("img2img"):
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**models.build("tiny", seed=23).components)
    else:
        pipe = models.build("tiny-inpaint", seed=23)
        mask = torch.zeros(32, 32, dtype=torch.uint8)
        mask[8:24, 8:24] = 255
        extra["mask_image"] = Image.fromarray(mask.numpy())
    if kind.startswith("controlnet"):  # the same task with a ControlNet (shallow ControlNet on shallow steps)
        cls = (
            diffusers.StableDiffusionControlNetImg2ImgPipeline
            if kind.endswith("img2img")
            else (diffusers.StableDiffusionControlNetInpaintPipeline)
        )
        pipe = cls.from_pipe(pipe, controlnet=models.build("tiny-controlnet", seed=24).controlnet)
        edges = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(4))
        extra["control_image"] = Image.fromarray((edges * 255).byte().numpy())
    pipe.set_progress_bar_config(disable=True)
    # DDIM: one U-Net call per step, and no set_begin_index (the pipeline's get_timesteps is what shortens)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    assert not hasattr(pipe.scheduler, "set_begin_index")
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    cfg = DeepCacheConfig(interval=3, schedule="quad-center", center=4, power=1.4)
    state = deepcache.enable(pipe, cfg)
    calls, handles = _record(pipe)
    g = torch.Generator().manual_seed(3)
    pipe("a dog", image=image, strength=0.6, num_inference_steps=20, generator=g, output_type="latent", **extra)
    for h in handles:
        h.remove()
    # strength 0.6 of 20 steps: 12 run; the schedule is laid over those 12, not over 20
    calls = [c for c in calls if c["name"] == "unet"]
    assert state.num_steps == 12 and len(calls) == 12
    expected = full_steps(12, cfg)
    assert expected == set(quad_center_steps(12, 4, 4, 1.4)[0])
    assert {i for i, c in enumerate(calls) if c["mode"] == "full"} == expected
    if kind.startswith("controlnet"):  # the ControlNet ran truncated on every shallow step
        assert state.controlnet_shallow_calls == 12 - len(expected)
    deepcache.disable(pipe)
    assert _check_full_steps_plain(pipe, calls) == len(expected)


def test_controlnet_that_does_not_mirror_the_unet_is_refused():
    import types

    unet = _unet("sd1")  # 3 down blocks; the tiny ControlNet has 2
    cn = models.build_component("tiny-controlnet", "controlnet", device="cpu")
    pipe = types.SimpleNamespace(unet=unet, scheduler=diffusers.DDIMScheduler(), controlnet=cn)
    with pytest.raises(ValueError, match="does not mirror"):
        deepcache.enable(pipe, interval=2)
    assert deepcache.state_of(unet) is None  # nothing left half wired
    assert all("forward" not in m.__dict__ for m in [*unet.modules(), *cn.modules()])
    assert "set_timesteps" not in pipe.scheduler.__dict__
