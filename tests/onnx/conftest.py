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


@pytest.fixture(scope="session")
def tiny_dir(tiny_pipe, tmp_path_factory):
    """(directory, cache directory, manifest) of ``optimize_pipeline(tiny, target="cpu")``."""
    pytest.importorskip("onnxruntime")
    from sdkern.onnx import build as onnx_build

    out = tmp_path_factory.mktemp("onnx") / "tiny-cpu"
    cache = tmp_path_factory.mktemp("cache")
    manifest = onnx_build.optimize_pipeline(tiny_pipe, out, target="cpu", cache_dir=cache)
    return out, cache, manifest
