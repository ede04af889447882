"""Fixtures shared by the ONNX tests: the tiny preset and its optimised CPU pipeline directory (built once)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pipe():
    pytest.importorskip("diffusers")
    from sdkern.models import build

    pipe = build("tiny", dtype=torch.float32, device="cpu", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _optimized_cpu(pipe, name: str, tmp_path_factory):
    """(directory, cache directory, manifest) of ``optimize_pipeline(pipe, target="cpu")`` in fresh temp dirs."""
    pytest.importorskip("onnxruntime")
    from sdkern.onnx import build as onnx_build

    out = tmp_path_factory.mktemp("onnx") / name
    cache = tmp_path_factory.mktemp("cache")
    return out, cache, onnx_build.optimize_pipeline(pipe, out, target="cpu", cache_dir=cache)


@pytest.fixture(scope="session")
def tiny_dir(tiny_pipe, tmp_path_factory):
    """(directory, cache directory, manifest) of ``optimize_pipeline(tiny, target="cpu")``."""
    return _optimized_cpu(tiny_pipe, "tiny-cpu", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_fp16_dir(tiny_pipe, tmp_path_factory):
    """``optimize_pipeline(tiny, target="cpu", fp16=True)``'s directory (no cache)."""
    pytest.importorskip("onnxruntime")
    from sdkern.onnx import build as onnx_build

    out = tmp_path_factory.mktemp("onnx") / "tiny-fp16"
    onnx_build.optimize_pipeline(tiny_pipe, out, target="cpu", fp16=True, use_cache=False)
    return out


def tiny_sdxl_config():
    """SDXL's architecture at test size: text_time added conditioning, two CLIP text encoders (the second
    with projection), linear-projection transformers with 1 and 2 layers, the SDXL VAE scaling."""
    import dataclasses

    from sdkern.models.configs import SDXL, TINY

    te = {k: v for k, v in TINY.text_encoders[0].items()}
    return dataclasses.replace(
        SDXL,
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "transformer_layers_per_block": [1, 2],
            "act_fn": "silu",
            "norm_num_groups": 8,
            "norm_eps": 1e-5,
            "cross_attention_dim": 64,  # 32 + 32: both encoders' penultimate hidden states, concatenated
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,  # time ids + text_encoder_2 projection
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        },
        vae={**TINY.vae, "scaling_factor": 0.13025, "force_upcast": True},
        text_encoders=[te, {**te, "hidden_act": "gelu", "with_projection": True}],
        default_size=32,
        known_unet_params=None,
    )


def build_tiny_sdxl():
    """The tiny SDXL pipeline, built by ``sdkern.models.build("sdxl")`` with :func:`tiny_sdxl_config`."""
    from sdkern.models import build
    from sdkern.models.configs import PRESETS

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "sdxl", tiny_sdxl_config())
        pipe = build("sdxl", dtype=torch.float32, device="cpu", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sdxl_pipe():
    pytest.importorskip("diffusers")
    return build_tiny_sdxl()


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_sdxl_pipe, tmp_path_factory):
    """(directory, cache directory, manifest) of ``optimize_pipeline(tiny SDXL, target="cpu")``."""
    return _optimized_cpu(tiny_sdxl_pipe, "tiny-sdxl-cpu", tmp_path_factory)


@pytest.fixture
def tiny_sdxl_as_preset(monkeypatch):
    """Make the ``sdxl`` preset the tiny SDXL config for one test (the real preset has 2.6B parameters)."""
    from sdkern.models.configs import PRESETS

    monkeypatch.setitem(PRESETS, "sdxl", tiny_sdxl_config())
