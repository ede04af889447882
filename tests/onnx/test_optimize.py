"""ONNX path: export + optimise + convert for the CPU EP, parity with PyTorch, cache, atomicity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from sdkern.onnx import build as onnx_build
from sdkern.onnx.export import example_inputs
from tests.onnx.helpers import rel as _rel
from tests.onnx.helpers import session as _session


def test_directory_layout_and_fused_nodes(tiny_dir):
    out, _, manifest = tiny_dir
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (out / comp / "model.onnx").is_file()
    assert (out / "model_index.json").is_file() and (out / "scheduler").is_dir() and (out / "tokenizer").is_dir()
    assert manifest["cache"] == "miss"
    unet = manifest["fused_nodes"]["unet"]
    for op in ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "SkipLayerNormalization"):
        assert unet.get(op, 0) > 0, (op, unet)
    assert unet.get("MultiHeadAttention", 0) + unet.get("Attention", 0) > 0
    assert manifest["fused_nodes"]["vae_decoder"].get("GroupNorm", 0) > 0
    assert manifest["fused_nodes"]["text_encoder"].get("SkipLayerNormalization", 0) > 0
    import onnx

    model = onnx.load(str(out / "unet" / "model.onnx"))
    domains = {n.domain for n in model.graph.node if n.op_type in ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu")}
    assert domains == {"sdkern"}
    assert all(n.op_type != "NhwcConv" for n in model.graph.node)


@torch.no_grad()
@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_component_parity_with_pytorch(tiny_pipe, tiny_dir, component):
    from sdkern.onnx.export import _spec

    out, _, _ = tiny_dir
    feeds = example_inputs(tiny_pipe, component)
    spec = _spec(tiny_pipe, component)
    ref = spec["module"](*[torch.from_numpy(v) for v in feeds.values()])
    ref = ref[0] if isinstance(ref, tuple) else ref
    got = _session(out / component / "model.onnx").run(None, feeds)[0]
    assert _rel(got, ref.numpy()) < 1e-4


@torch.no_grad()
def test_vae_encoder_samples_the_latent_distribution(tiny_pipe, tiny_dir):
    out, _, _ = tiny_dir
    feeds = example_inputs(tiny_pipe, "vae_encoder")
    got = _session(out / "vae_encoder" / "model.onnx").run(None, feeds)[0]
    dist = tiny_pipe.vae.encode(torch.from_numpy(feeds["sample"])).latent_dist
    z = (got - dist.mean.numpy()) / dist.std.numpy()
    assert got.shape == tuple(dist.mean.shape)
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 1.5


@torch.no_grad()
def test_full_ort_pipeline_matches_torch(tiny_pipe, tiny_dir):
    from sdkern.onnx.pipeline import OrtStableDiffusionPipeline

    out, _, _ = tiny_dir
    ort_pipe = OrtStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider")
    ort_pipe.set_progress_bar_config(disable=True)
    # diffusers' ONNX pipeline sizes latents as height // 8 whatever the VAE; the tiny VAE scales by
    # vae_scale_factor, so ask each pipeline for the size that gives the same 8x8 latents.
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hs = 8 * tiny_pipe.vae_scale_factor
    ref = tiny_pipe("a cat", height=hs, width=hs, num_inference_steps=2, latents=lat, output_type="np").images
    got = ort_pipe("a cat", height=64, width=64, num_inference_steps=2, latents=lat.numpy(), output_type="np").images
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-3


def test_device_resident_sd_pipeline_with_io_binding_matches_torch(tiny_pipe, tiny_dir):
    """The stand-in SD pipeline the CUDA EP gets (io_binding=True), run on the CPU provider here."""
    import diffusers

    from sdkern.onnx.pipeline import OrtStableDiffusionPipeline, pipeline_geometry

    out, _, _ = tiny_dir
    pipe = OrtStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider", io_binding=True)
    assert type(pipe) is diffusers.StableDiffusionPipeline and pipe.unet.io_binding
    assert pipe.device == torch.device("cpu") and not pipeline_geometry(pipe, out)["numpy_io"]
    calls = []
    run = pipe.unet._run_bound
    pipe.unet._run_bound = lambda feeds, o: (calls.append(o.shape), run(feeds, o))[1]
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hs = 8 * tiny_pipe.vae_scale_factor
    kw = dict(height=hs, width=hs, num_inference_steps=2, latents=lat, output_type="np", negative_prompt="a dog")
    ref = tiny_pipe("a cat", **kw).images
    got = pipe("a cat", **kw).images
    assert len(calls) == len(pipe.scheduler.timesteps) >= 2  # every U-Net call went through IO binding
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-3
    # the NumPy pipeline (default on CPU) agrees with it as well
    numpy_pipe = OrtStableDiffusionPipeline.from_pretrained(out, provider="CPUExecutionProvider")
    numpy_pipe.set_progress_bar_config(disable=True)
    kw_np = {**kw, "latents": lat.numpy(), "height": 64, "width": 64}
    assert _rel(numpy_pipe("a cat", **kw_np).images, got) < 1e-4


def test_device_resident_path_refuses_directories_without_full_configs(tiny_dir, tmp_path):
    import json
    import shutil

    from sdkern.onnx.pipeline import OrtStableDiffusionPipeline

    out, _, _ = tiny_dir
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "unet" / "config.json").write_text(json.dumps({"sample_size": 16, "in_channels": 4}))
    with pytest.raises(ValueError, match="re-run `sdkern optimize`"):
        OrtStableDiffusionPipeline.from_pretrained(old, provider="CPUExecutionProvider", io_binding=True)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_second_run_is_a_byte_identical_cache_copy(tiny_pipe, tiny_dir, tmp_path):
    out, cache, first = tiny_dir
    again = onnx_build.optimize_pipeline(tiny_pipe, tmp_path / "again", target="cpu", cache_dir=cache)
    assert again["cache"] == "hit" and again["seconds"] < first["seconds"]
    assert _digest(tmp_path / "again") == _digest(out)
    with pytest.raises(FileExistsError):
        onnx_build.optimize_pipeline(tiny_pipe, out, target="cpu", cache_dir=cache)
    assert onnx_build.clean_cache(cache) == 1


def test_interrupted_run_leaves_nothing_half_written(tiny_pipe, tmp_path, monkeypatch):
    calls = []
    real = onnx_build.optimize_component

    def flaky(*a, **k):
        calls.append(a[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(onnx_build, "optimize_component", flaky)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        onnx_build.optimize_pipeline(tiny_pipe, out, target="cpu", cache_dir=cache)
    assert not out.exists()
    assert not any(cache.rglob("*.onnx")) if cache.exists() else True
    assert not list(tmp_path.glob(".out*"))


def test_bad_arguments(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="target"):
        onnx_build.optimize_pipeline(tiny_pipe, tmp_path / "x", target="tpu")


@torch.no_grad()
def test_ort_unet_matches_torch(tiny_pipe, tmp_path):
    from sdkern.onnx import OrtUNet

    unet = OrtUNet.from_module(tiny_pipe.unet, workdir=str(tmp_path))
    x = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 77, tiny_pipe.unet.config.cross_attention_dim)
    ref = tiny_pipe.unet(x, torch.tensor(500), ehs).sample
    got = unet(x, torch.tensor(500), ehs).sample
    assert _rel(got.numpy(), ref.numpy()) < 1e-4
    with pytest.raises(NotImplementedError, match="supports"):
        unet(x, 500, ehs, class_labels=torch.zeros(2))


@torch.no_grad()
def test_ort_unet_io_binding_equals_numpy_path(tiny_pipe, tmp_path):
    """Binding torch tensors by pointer gives exactly the outputs of the NumPy ``session.run`` path."""
    from sdkern.onnx import OrtUNet

    unet = OrtUNet.from_module(tiny_pipe.unet, workdir=str(tmp_path))
    assert unet.io_binding
    gen = torch.Generator().manual_seed(1)
    # non-contiguous inputs (a channels-last sample, a transposed view) must be made contiguous first
    x = torch.randn(2, 4, 8, 8, generator=gen).to(memory_format=torch.channels_last)
    ehs = torch.randn(2, tiny_pipe.unet.config.cross_attention_dim, 77, generator=gen).transpose(1, 2)
    assert not x.is_contiguous() and not ehs.is_contiguous()
    bound = unet(x, torch.tensor([321]), ehs).sample
    unet.io_binding = False
    plain = unet(x, torch.tensor([321]), ehs).sample
    assert torch.equal(bound, plain)
    ref = tiny_pipe.unet(x, torch.tensor(321), ehs).sample
    assert _rel(bound.numpy(), ref.numpy()) < 1e-4
    unet.io_binding = True
    again = unet(x.contiguous(), 321.0, ehs.contiguous(), return_dict=False)[0]
    assert torch.equal(again, bound)


@torch.no_grad()
def test_ort_unet_without_sdkern_ops_uses_only_cpu_ep_kernels(tiny_pipe, tmp_path):
    """``sdkern_ops=False`` (the bench engine ``ort``): ORT's fusions the CPU EP implements, no sdkern domain."""
    import onnx

    from sdkern.apps.onnx.optimize import CPU_EP_MISSING
    from sdkern.onnx import OrtUNet, count_ops

    unet = OrtUNet.from_module(tiny_pipe.unet, workdir=str(tmp_path), sdkern_ops=False)
    model = onnx.load(str(tmp_path / "opt" / "model.onnx"))
    assert not count_ops(model, domain="sdkern")
    contrib = count_ops(model, domain="com.microsoft")
    assert contrib.get("SkipLayerNormalization", 0) > 0, contrib
    assert contrib.get("MultiHeadAttention", 0) + contrib.get("Attention", 0) > 0, contrib
    assert not set(contrib) & set(CPU_EP_MISSING), contrib
    assert count_ops(model).get("InstanceNormalization", 0) + count_ops(model).get("GroupNormalization", 0) > 0
    x = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 77, tiny_pipe.unet.config.cross_attention_dim)
    ref = tiny_pipe.unet(x, torch.tensor(500), ehs).sample
    assert _rel(unet(x, torch.tensor(500), ehs).sample.numpy(), ref.numpy()) < 1e-4


@torch.no_grad()
def test_ort_unet_isolated_export_and_temporary_workdir_is_removed(tiny_pipe):
    """``isolate=True`` (what ``sdkern bench`` uses): export + optimise in a child process fed a safetensors
    checkpoint (removed afterwards); the temporary workdir goes with ``close()``."""
    from sdkern.onnx import OrtUNet

    unet = OrtUNet.from_module(tiny_pipe.unet, isolate=True)
    workdir = Path(unet._workdir.name)
    assert (workdir / "opt" / "model.onnx").is_file()
    assert not (workdir / "src").exists()
    x = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 77, tiny_pipe.unet.config.cross_attention_dim)
    ref = tiny_pipe.unet(x, torch.tensor(500), ehs).sample
    assert _rel(unet(x, torch.tensor(500), ehs).sample.numpy(), ref.numpy()) < 1e-4
    unet.close()
    assert not workdir.exists()
    with pytest.raises(RuntimeError, match="closed"):
        unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, tiny_pipe.unet.config.cross_attention_dim))


def test_cli_optimize(tmp_path, capsys):
    from sdkern.cli import main

    out = tmp_path / "out"
    rc = main(["optimize", "--model", "tiny", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    assert rc == 0 and (out / "unet" / "model.onnx").is_file()
    assert '"cache": "miss"' in capsys.readouterr().out
    assert main(["optimize", "--model", "tiny", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    assert main(["optimize", "--out", str(tmp_path / "x"), "--lora", "style.bin"]) == 2
    assert "pickle" in capsys.readouterr().err
