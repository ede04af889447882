"""The other serving configurations of issue 21: ``--engine onnx`` on an ``sdkern optimize`` directory,
``--deepcache``, an SDXL-architecture model, and ``--cuda-graphs`` on a CPU device.

The three servers (each a real ``sdkern serve`` child process on 127.0.0.1) are started together by one
module fixture, so their loading overlaps; each test sends a bounded number of small requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serve.conftest import API_KEY, decode_png, metric

pytest.importorskip("onnxruntime", reason="--engine onnx needs onnxruntime")

BATCH = {"max_batch": 4, "batch_wait_ms": 300, "queue_size": 32, "log_level": "warning"}


def _tiny_sdxl_dir(root: Path) -> Path:
    """The project's tiny SDXL test model (tests/onnx/conftest.py), saved as a diffusers directory."""
    from tests.onnx.conftest import build_tiny_sdxl

    out = root / "tiny-sdxl"
    build_tiny_sdxl().save_pretrained(out)
    return out


def _tiny_onnx_dir(root: Path) -> Path:
    """``sdkern optimize`` of the tiny preset (weight seed 0, the seed the ``tiny`` preset server uses)."""
    import torch

    from sdkern.models import build
    from sdkern.onnx import build as onnx_build

    out = root / "tiny-onnx"
    pipe = build("tiny", dtype=torch.float32, device="cpu", seed=0)
    onnx_build.optimize_pipeline(pipe, out, target="cpu", cache_dir=root / "cache", use_cache=False)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """{"onnx", "deepcache", "sdxl": ServeHandle, "onnx_dir": Path}: started together, then waited for."""
    from sdkern.serve import deploy

    root = tmp_path_factory.mktemp("serve-engines")
    handles: dict[str, Any] = {}
    try:
        handles["deepcache"] = deploy("tiny", api_key=API_KEY, wait=False, deepcache=True, **BATCH)
        sdxl_dir = _tiny_sdxl_dir(root)
        handles["sdxl"] = deploy(str(sdxl_dir), api_key=API_KEY, wait=False, **BATCH)
        onnx_dir = _tiny_onnx_dir(root)
        handles["onnx"] = deploy(str(onnx_dir), api_key=API_KEY, wait=False, engine="onnx", **BATCH)
        for h in handles.values():
            h.wait_ready(300)
        yield {**handles, "onnx_dir": onnx_dir}
    finally:
        codes = {name: h.terminate() for name, h in handles.items()}
    assert all(c == 0 for c in codes.values()), codes


def _client(handle: Any) -> Any:
    import httpx

    return httpx.Client(base_url=handle.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def _openai(c: Any, body: dict[str, Any]) -> np.ndarray:
    r = c.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    return np.asarray(decode_png(item["b64_json"]))


def _a1111(c: Any, body: dict[str, Any]) -> tuple[list[np.ndarray], dict[str, Any]]:
    r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    js = r.json()
    return [np.asarray(decode_png(b)) for b in js["images"]], js


def _assert_batched_equals_solo(c: Any, reqs: list[dict[str, Any]]) -> None:
    """``reqs`` sent concurrently share at least one batch, and each image == the same request sent alone."""
    before = c.get("/metrics").text
    with ThreadPoolExecutor(len(reqs)) as pool:
        batched = list(pool.map(lambda b: _openai(c, b), reqs))
    after = c.get("/metrics").text
    d_sum = metric(after, "sdkern_batch_size_sum") - metric(before, "sdkern_batch_size_sum")
    d_cnt = metric(after, "sdkern_batch_size_count") - metric(before, "sdkern_batch_size_count")
    assert d_sum == len(reqs) and d_cnt < len(reqs), (d_sum, d_cnt)  # some batch held > 1 image
    for body, img in zip(reqs, batched, strict=True):
        assert img.std() > 1  # a real image, not a constant
        assert np.array_equal(img, _openai(c, body)), body


# ---------------------------------------------------------------------------------------------- ONNX
def test_onnx_engine_both_endpoints_and_same_image_as_sdkern_generate_onnx(servers: Any, tmp_path: Path) -> None:
    """A generation through each endpoint is a valid PNG, and the same seed gives the very image
    ``sdkern generate --onnx DIR`` writes (the engine drives the ORT pipeline as ``generate`` does)."""
    from tests.onnx.helpers import generate

    onnx_dir = servers["onnx_dir"]
    with _client(servers["onnx"]) as c:
        health = c.get("/health").json()
        assert health["status"] == "ready"
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [onnx_dir.name]
        body = {"prompt": "a cat", "negative_prompt": "a dog", "steps": 3, "seed": 7, "size": "32x32"}
        for sched in ("ddim", "euler-a"):
            img = _openai(c, {**body, "scheduler": sched})
            assert img.shape == (32, 32, 3) and img.std() > 1
            path, *_ = generate(
                "--onnx", str(onnx_dir), "--prompt", "a cat", "--negative-prompt", "a dog", "--steps", "3",
                "--seed", "7", "--scheduler", sched, "--out", str(tmp_path / sched),
            )  # fmt: skip
            assert path.name == "00000-seed7.png"
            from PIL import Image

            with Image.open(path) as im:
                assert np.array_equal(img, np.asarray(im.convert("RGB"))), sched
        images, js = _a1111(
            c, {"prompt": "a cat", "negative_prompt": "a dog", "steps": 3, "seed": 7, "cfg_scale": 7.5,
                "width": 32, "height": 32, "sampler_name": "DDIM", "batch_size": 2}
        )  # fmt: skip
        assert len(images) == 2 and js["parameters"]["sampler_name"] == "DDIM"
        assert np.array_equal(images[0], _openai(c, {**body, "scheduler": "ddim"}))


def test_onnx_engine_same_image_as_torch_engine(servers: Any, client: Any) -> None:
    """The ONNX server and the torch ``tiny`` server (same weights) agree within the ONNX tests' tolerance:
    at most one 8-bit level per pixel channel, mean below 0.05 levels (tests/onnx/helpers.py)."""
    body = {"prompt": "a red house", "steps": 3, "seed": 11, "size": "32x32", "scheduler": "euler-a"}
    with _client(servers["onnx"]) as c:
        got = _openai(c, body).astype(np.int16)
    want = _openai(client, body).astype(np.int16)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert want.std() > 1


def test_onnx_engine_batched_equals_solo(servers: Any) -> None:
    """ORT runs a batch of the ONNX pipeline so that each request gets its solo image bit for bit."""
    reqs = [
        {"prompt": f"onnx {i}", "seed": 300 + i, "steps": 2, "size": "32x32", "scheduler": "euler-a"} for i in range(3)
    ]
    reqs[1]["negative_prompt"] = "blurry"
    with _client(servers["onnx"]) as c:
        _assert_batched_equals_solo(c, reqs)


# ------------------------------------------------------------------------------------------- DeepCache
def test_deepcache_serves_deterministic_images_batched_equals_solo(servers: Any, client: Any) -> None:
    """Valid images, the same image for the same seed, batched == solo bit for bit; and DeepCache is really
    on: with cached steps the image differs from the plain ``tiny`` server's for the same request."""
    body = {"prompt": "a boat", "steps": 4, "seed": 21, "size": "32x32", "scheduler": "ddim"}
    with _client(servers["deepcache"]) as c:
        first = _openai(c, body)
        assert first.std() > 1 and np.array_equal(first, _openai(c, body))
        images, _ = _a1111(c, {"prompt": "a boat", "steps": 4, "seed": 21, "width": 32, "height": 32,
                               "sampler_name": "DDIM", "cfg_scale": 7.5})  # fmt: skip
        assert np.array_equal(images[0], first)
        reqs = [
            {"prompt": f"dc {i}", "seed": 400 + i, "guidance_scale": g, "steps": 4, "size": "32x32",
             "scheduler": "euler-a"}
            for i, g in enumerate([7.5, 3.0, 7.5])
        ]  # fmt: skip
        _assert_batched_equals_solo(c, reqs)
    plain = _openai(client, body)
    assert not np.array_equal(first, plain)


# ------------------------------------------------------------------------------------------------ SDXL
def test_sdxl_both_endpoints_batched_equals_solo(servers: Any) -> None:
    """The tiny SDXL-architecture model (two text encoders, text_time conditioning) through both endpoints."""
    with _client(servers["sdxl"]) as c:
        img = _openai(c, {"prompt": "a tree", "steps": 2, "seed": 3, "size": "32x32"})
        assert img.shape == (32, 32, 3) and img.std() > 1
        images, js = _a1111(c, {"prompt": "a tree", "steps": 2, "seed": 3, "width": 32, "height": 32,
                                "sampler_name": "DDIM", "cfg_scale": 7.5, "batch_size": 2})  # fmt: skip
        assert len(images) == 2 and js["info"]
        assert np.array_equal(images[0], img)  # ddim is the default scheduler, 7.5 the default guidance
        reqs = [
            {"prompt": f"sdxl {i}", "seed": 500 + i, "steps": 2, "size": "32x32", "scheduler": "euler-a"}
            for i in range(3)
        ]
        reqs[2]["negative_prompt"] = "dark"
        _assert_batched_equals_solo(c, reqs)


# ----------------------------------------------------------------------------------------- CUDA graphs
def test_cuda_graphs_on_cpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``--cuda-graphs`` with a CPU device exits 2 with a message before loading anything."""
    from sdkern.cli import main

    assert main(["serve", "tiny", "--device", "cpu", "--cuda-graphs", "--port", "0"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
