"""sdkern.patch on SD1.x / SD2.x / SDXL U-Net architectures (random weights, CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

import sdkern
from sdkern.patch import cpu_engine
from tests.patch import models as M
from tests.patch.common import check_model, criterion


def _runner(args: dict):
    def run(model, dtype):
        return model(**M.cast_inputs(args, dtype)).sample

    return run


def _assert_fully_patched(model, report):
    counts = report.counts()
    n_res = sum(type(m) is ResnetBlock2D for m in model.modules())
    n_attn = sum(isinstance(m, Attention) for m in model.modules())
    n_blk = sum(isinstance(m, BasicTransformerBlock) for m in model.modules())
    assert n_res and n_attn and n_blk
    assert counts["resnet"] == n_res
    assert counts["attention"] == n_attn == 2 * n_blk
    assert counts["transformer_block"] == n_blk
    assert counts["geglu"] == n_blk
    assert counts["conv_norm_out"] == 1
    # the transformer blocks' norm1 (a LayerNorm with no residual before it): skip_layer_norm(skip=None)
    assert counts["layer_norm"] == n_blk
    assert report.left == [], report.left


def _assert_engine(model, report, dtype):
    """Every Conv2d and every Linear outside a packed QKV/KV projection runs on the CPU engine.

    bf16: q/k/v stay separate and are prepacked too (a fused QKV would run as a dense F.linear)."""
    counts = report.counts()
    attn = [e.detail for e in report.rewritten if e.rule == "attention"]
    if dtype == torch.bfloat16:
        assert attn and all("separate q/k/v" in d for d in attn)
        assert counts["cpu_linear"] == sum(type(m) is nn.Linear for m in model.modules())
    else:
        assert attn and all("packed" in d for d in attn)
    n_conv = sum(type(m) is nn.Conv2d for m in model.modules())  # check_model has unpatched the model
    n_t2d = sum(isinstance(m, Transformer2DModel) for m in model.modules())
    assert counts["cpu_conv"] == n_conv > 0
    assert counts["cpu_linear"] > 0
    assert counts["transformer2d"] == n_t2d > 0
    assert not [e for e in report.left if e.rule.startswith("cpu_")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("engine", [True, False], ids=["engine", "no_engine"])
def test_unet_reduced(arch, dtype, engine, poison):
    config = {"sd1": M.SD1_SMALL_UNET, "sd2": M.SD2_UNET, "sdxl": M.SDXL_UNET}[arch]
    model = M.unet(config)
    args = M.unet_inputs(model, batch=2, size=8)
    # without the engine, channels_last is forced on (the default leaves fp32 CPU models NCHW)
    kwargs = {} if engine else {"cpu_engine": False, "channels_last": True}
    report, _, _ = check_model(model, _runner(args), dtype, f"{arch} U-Net {dtype}", **kwargs)
    _assert_fully_patched(model, report)
    if engine:
        _assert_engine(model, report, dtype)
    else:
        assert report.counts()["channels_last"] == 1
        assert "cpu_conv" not in report.counts()
    heads = {e.detail.split("head_dim=")[1] for e in report.rewritten if e.rule == "attention"}
    expected = {"sd1": {"40", "80", "160"}, "sd2": {"64"}, "sdxl": {"64"}}[arch]
    assert heads == expected


@pytest.mark.slow
def test_sd15_unet_full_size(poison):
    """SD 1.5 architecture at full size, 32x32 latents, batch 2 (CFG), default config, fp32 and bf16.

    One float64 oracle for both dtypes; each dtype: eager, patched (CPU engine and fused ops) under the
    project's criterion, unpatched bit-exact (state, module types, processors). Slow: a few minutes on 2 cores
    and ~10 GB of memory (the float64 oracle of an 860M-parameter model; eager bf16 on a CPU without bf16
    primitives); run it with ``pytest -m slow tests/patch``."""
    model = M.unet(M.SD15_UNET)
    args = M.unet_inputs(model, batch=2, size=32)
    run = _runner(args)
    with torch.no_grad():
        model.double()  # fp32 -> f64 -> fp32 is exact
        ref64 = run(model, torch.float64)
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            eager = run(model, dtype)
            # unpatch's exactness is checked on the state, the module types and the attention processors (the
            # reduced-width tests also rerun the model): a second eager bf16 step costs minutes on a CPU without
            # bf16 primitives (PyTorch's reference convolution)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            kinds = [(n, type(m), type(getattr(m, "processor", None))) for n, m in model.named_modules()]
            report = sdkern.patch(model, report=True)
            patched = run(model, dtype)
            sdkern.unpatch(model)
            err, bound = criterion(patched, eager, ref64)
            assert err <= bound, f"SD1.5 U-Net {dtype}: patched rel L2 {err:.3e} > bound {bound:.3e}"
            after = model.state_dict()
            assert after.keys() == state.keys(), f"SD1.5 U-Net {dtype}: unpatch changed the state's keys"
            assert all(torch.equal(after[k], v) and after[k].stride() == v.stride() for k, v in state.items()), (
                f"SD1.5 U-Net {dtype}: unpatch is not bit-exact"
            )
            assert kinds == [(n, type(m), type(getattr(m, "processor", None))) for n, m in model.named_modules()]
            del state, after
            _assert_fully_patched(model, report)
            _assert_engine(model, report, dtype)


def test_reference_backend_and_disabled_fusions(poison):
    model = M.unet(M.SD1_SMALL_UNET)
    args = M.unet_inputs(model, batch=1, size=8)
    report, _, _ = check_model(model, _runner(args), torch.float32, "reference backend", backend="reference")
    assert report.config.backend == "reference"
    model.float()
    report, _, _ = check_model(
        model,
        _runner(args),
        torch.float32,
        "fusions off",
        qkv_fusion=False,
        skip_layer_norm=False,
        bias_add=False,
        geglu=False,
        channels_last=False,
    )
    counts = report.counts()
    assert "geglu" not in counts and "channels_last" not in counts
    assert "transformer_block" not in counts
    assert all("separate q/k/v" in e.detail for e in report.rewritten if e.rule == "attention")
    assert any(e.rule == "geglu" and "disabled" in e.detail for e in report.left)


def test_patch_twice_is_noop_and_state_dict_unchanged():
    model = M.unet(M.SD1_SMALL_UNET)
    args = M.unet_inputs(model, batch=1, size=8)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    r1 = sdkern.patch(model, report=True)
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        out1 = model(**args).sample
    assert sdkern.patch(model) is model
    assert sdkern.patch(model, report=True) is r1
    assert [type(m) for m in model.modules()] == classes
    with torch.no_grad():
        out2 = model(**args).sample
    assert torch.equal(out1, out2)
    sd = model.state_dict()
    assert list(sd) == list(sd_before)
    assert all(torch.equal(sd[k], v) for k, v in sd_before.items())
    sdkern.unpatch(model)
    assert sdkern.patch_report(model) is None
    assert not any(type(m).__name__.startswith("Sdkern") for m in model.modules())


def test_packed_qkv_is_shared_and_follows_updates():
    model = M.unet(M.SD1_SMALL_UNET)
    args = M.unet_inputs(model, batch=1, size=8)
    n_params = sum(p.numel() for p in model.parameters())
    sdkern.patch(model, backend="reference")
    attn = next(m for m in model.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    w, _ = attn._sdkern_packed
    # no second copy: q/k/v parameters are row blocks of the packed weight
    assert attn.to_q.weight.data_ptr() == w.data_ptr()
    assert attn.to_v.weight.data_ptr() == w[2 * attn.to_q.out_features :].data_ptr()
    assert sum(p.numel() for p in model.parameters()) == n_params
    # an in-place (LoRA-style) update of to_k changes the patched output exactly like the eager one
    with torch.no_grad():
        attn.to_k.weight.add_(torch.randn_like(attn.to_k.weight) * 0.5)
        patched = model(**args).sample
        sdkern.unpatch(model)
        eager = model(**args).sample
    err = ((patched - eager).norm() / eager.norm()).item()
    assert err < 1e-4, err
    # replacing parameters after patching (module.to) re-packs at the next call
    sdkern.patch(model, backend="reference")
    with torch.no_grad():
        model.double()
        out64 = model(**M.cast_inputs(args, torch.float64)).sample
        sdkern.unpatch(model)
        ref64 = model(**M.cast_inputs(args, torch.float64)).sample
    assert ((out64 - ref64).norm() / ref64.norm()).item() < 1e-10


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_patched_unet(backend):
    """aot_eager (dynamo tracing, fake kernels, functionalisation) always; inductor code generation
    takes minutes on 2 cores, so it is marked slow."""
    model = M.unet(M.TINY_UNET)
    args = M.unet_inputs(model, batch=2, size=8)
    # with the CPU engine on (the default on CPU): its prepacked convolutions and GEMMs enter the graph
    # as the custom ops sdkern::engine_conv2d / engine_linear, without the opaque weights.
    report = sdkern.patch(model, report=True)
    assert report.counts().get("cpu_conv", 0) > 0 or cpu_engine.unavailable_reason() is not None
    with torch.no_grad():
        eager_patched = model(**args).sample
        compiled = torch.compile(model, backend=backend)
        out = compiled(**args).sample
    err = ((out - eager_patched).norm() / eager_patched.norm()).item()
    assert err < 1e-5, err


def test_unrecognised_modules_are_left_and_reported(poison):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    class CustomProcessor(AttnProcessor2_0):
        pass

    model = M.unet(M.TINY_UNET)
    attns = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]
    attns[0][1].set_processor(CustomProcessor())
    attns[1][1].set_processor(AttnProcessor())  # classic processor: rewritten, with attn.scale
    args = M.unet_inputs(model, batch=2, size=8)
    report, _, _ = check_model(model, _runner(args), torch.float32, "custom processors")
    left = {e.name: e.detail for e in report.left}
    assert left[attns[0][0]] == "processor CustomProcessor not recognised (only AttnProcessor2_0 / AttnProcessor)"
    assert attns[1][0] in {e.name for e in report.rewritten}
    assert report.counts()["attention"] == len(attns) - 1
    assert type(attns[0][1].processor) is CustomProcessor  # restored by unpatch
