"""sdkern bench's peer engines on the tiny preset: OpenVINO (opt-in) and the reasons engines give."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

from sdkern.cli import main

TINY = ["bench", "--preset", "tiny", "--height", "32", "--width", "32", "--steps", "2", "--batch-count", "1"]


def test_openvino_engine_agrees_with_eager(tmp_path: Path) -> None:
    """The U-Net on OpenVINO's CPU plugin (f32 hint) gives eager's images within fp32 reordering noise."""
    pytest.importorskip("openvino")
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main([*TINY, "--no-progress", "--engines", "eager,sdkern,openvino", "--json", str(tmp_path / "r.json")])
    assert rc == 0, out.getvalue()
    rows = {r["engine"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rows["openvino"]["status"] == "ok", rows["openvino"]["status"]
    assert rows["openvino"]["version"].startswith("openvino")
    for name in ("sdkern", "openvino"):
        assert rows[name]["max_abs_diff_vs_eager"] < 1e-3, (name, rows[name]["max_abs_diff_vs_eager"])


def test_openvino_engine_runs_a_bf16_pipeline(tmp_path: Path) -> None:
    """A bf16 pipeline: converted from float32 with the bf16 hint, and the U-Net is left in bf16 afterwards.

    (The engine used to trace the bf16 U-Net with float32 inputs and failed: "mat1 and mat2 must have the same
    dtype".)"""
    pytest.importorskip("openvino")
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main([*TINY, "--no-progress", "--dtype", "bfloat16", "--engines", "eager,openvino",
                   "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0, out.getvalue()
    rows = {r["engine"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rows["openvino"]["status"] == "ok", rows["openvino"]["status"]
    assert rows["openvino"]["max_abs_diff_vs_eager"] < 0.1, rows["openvino"]["max_abs_diff_vs_eager"]


def test_ov_unet_restores_the_unet_dtype() -> None:
    pytest.importorskip("openvino")
    from sdkern.apps.bench.engines import OvUNet
    from sdkern.apps.models import build

    pipe = build("tiny", dtype=torch.bfloat16)
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.randn(1, unet.config.in_channels, 8, 8, dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    out = OvUNet(unet)(x, torch.tensor(10.0), ctx).sample
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert unet.dtype == torch.bfloat16
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_peer_engines_are_opt_in_and_say_why_they_cannot_run() -> None:
    from types import SimpleNamespace

    from sdkern.bench.engines import all_engines, default_engine_names

    engines = all_engines()
    assert {"openvino", "compile"} <= set(engines)
    assert engines["openvino"].opt_in and engines["compile"].opt_in
    assert "openvino" not in default_engine_names(torch.device("cpu"))
    sdxl = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(addition_embed_type="text_time")))
    assert "SDXL" in engines["openvino"].available(sdxl, torch.device("cpu"))
    assert "CPU" in engines["openvino"].available(sdxl, torch.device("cuda"))
