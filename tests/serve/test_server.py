"""The real server over HTTP: endpoints, errors, auth, batching exactness, 200 concurrent requests."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from tests.serve.conftest import API_KEY, decode_png, metric

SMALL = {"size": "32x32", "steps": 2}


def test_health_needs_no_key_and_says_ready(server: Any) -> None:
    import httpx

    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ready"


@pytest.mark.parametrize("path", ["/v1/models", "/metrics"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {API_KEY}"])
def test_auth_required(server: Any, path: str, auth: str | None) -> None:
    import httpx

    r = httpx.get(f"{server.url}{path}", headers={"Authorization": auth} if auth else {})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", **SMALL})
    assert r.status_code == 401


def test_openai_client(server: Any) -> None:
    openai = pytest.importorskip("openai", reason="the official openai client is not installed")
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    r = c.images.generate(
        prompt="a red bicycle", n=2, size="32x32", response_format="b64_json", extra_body={"steps": 2, "seed": 7}
    )
    assert r.created > 0 and len(r.data) == 2
    ims = [decode_png(d.b64_json) for d in r.data]
    assert ims[0].size == (32, 32)
    assert ims[0].text["seed"] == "7" and ims[1].text["seed"] == "8"
    assert ims[0].text["prompt"] == "a red bicycle" and ims[0].text["steps"] == "2"
    assert "Seed: 7" in ims[0].text["parameters"]
    assert not np.array_equal(np.asarray(ims[0]), np.asarray(ims[1]))
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        c.images.generate(prompt="x", size="32x32", response_format="url")


def test_same_seed_same_image(client: Any) -> None:
    a = client.post("/v1/images/generations", json={"prompt": "p", "seed": 3, **SMALL}).json()
    b = client.post("/v1/images/generations", json={"prompt": "p", "seed": 3, **SMALL}).json()
    assert a["data"][0]["b64_json"] == b["data"][0]["b64_json"]


def test_a1111_txt2img(client: Any) -> None:
    body = {
        "prompt": "a lighthouse",
        "negative_prompt": "blurry",
        "steps": 2,
        "cfg_scale": 5,
        "width": 32,
        "height": 16,
        "seed": 11,
        "batch_size": 2,
        "n_iter": 2,
        "sampler_name": "DPM++ 2M Karras",
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == 4 and out["parameters"] == body
    info = json.loads(out["info"])
    assert info["all_seeds"] == [11, 12, 13, 14]
    im = decode_png(out["images"][3])
    assert im.size == (32, 16) and im.text["seed"] == "14" and im.text["scheduler"] == "dpm++-karras"
    assert im.text["negative_prompt"] == "blurry"


def test_models_and_metrics(client: Any) -> None:
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "tiny"
    text = client.get("/metrics").text
    for name in (
        "sdkern_requests_total",
        "sdkern_queue_depth",
        "sdkern_batch_size_bucket",
        "sdkern_request_latency_seconds_bucket",
        "sdkern_images_per_second",
    ):
        assert name in text, name
    assert 'status="401"' in text or metric(text, "sdkern_requests_total") > 0


BAD = [
    ({"prompt": "x", "size": "33x32", "steps": 2}, 400, "size"),
    ({"prompt": "x", "size": "4096x4096", "steps": 2}, 400, "size"),
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "size": "32x32", "steps": 0}, 422, "steps"),
    ({"prompt": "x", "size": "32x32", "steps": 1000}, 422, "steps"),
    ({"prompt": "x", "size": "32x32", "n": 11}, 422, "n"),
    ({"prompt": "x", "size": "32x32", "n": 0}, 422, "n"),
    ({"prompt": "x", "size": "32x32", "scheduler": "nope"}, 400, "scheduler"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ({"prompt": ""}, 422, "prompt"),
    ({"size": "32x32"}, 422, "prompt"),
    ({"prompt": "x", "seed": "abc"}, 422, "seed"),
    ([1, 2], 400, "body"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD)
def test_bad_openai_input(client: Any, body: Any, status: int, field: str) -> None:
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(field)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"prompt": "x", "width": 30, "height": 32, "steps": 2}, 400, "width"),
        ({"prompt": "x", "width": 32, "height": 9000, "steps": 2}, 400, "height"),
        ({"prompt": "x", "sampler_name": "Nope 3000"}, 400, "sampler_name"),
        ({"prompt": "x", "batch_size": 5, "n_iter": 5}, 400, "batch_size"),
        ({"prompt": "x", "cfg_scale": "high"}, 422, "cfg_scale"),
    ],
)
def test_bad_a1111_input(client: Any, body: Any, status: int, field: str) -> None:
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == field


def test_non_json_and_oversized_body(client: Any) -> None:
    r = client.post("/v1/images/generations", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", json={"prompt": "x" * 200_000})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"

    def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b" " * 4096

    r = client.post("/sdapi/v1/txt2img", content=chunks())
    assert r.status_code == 413


def test_batched_equals_solo_bit_for_bit(client: Any) -> None:
    """Four requests that share a batch (mixed prompts, guidance, seeds) == each run alone."""
    reqs = [
        {"prompt": f"prompt {i}", "seed": 100 + i, "guidance_scale": g, "scheduler": "euler-a", **SMALL}
        for i, g in enumerate([7.5, 3.0, 7.5, 5.0])
    ]
    reqs[1]["negative_prompt"] = "ugly"
    before = client.get("/metrics").text
    with ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda b: client.post("/v1/images/generations", json=b), reqs))
    after = client.get("/metrics").text
    # at least one batch held more than one image
    d_sum = metric(after, "sdkern_batch_size_sum") - metric(before, "sdkern_batch_size_sum")
    d_cnt = metric(after, "sdkern_batch_size_count") - metric(before, "sdkern_batch_size_count")
    assert d_sum == 4 and d_cnt < 4, (d_sum, d_cnt)
    for body, rb in zip(reqs, batched, strict=True):
        solo = client.post("/v1/images/generations", json=body)
        a = np.asarray(decode_png(rb.json()["data"][0]["b64_json"]))
        b = np.asarray(decode_png(solo.json()["data"][0]["b64_json"]))
        assert np.array_equal(a, b), body


def test_200_concurrent_requests(server: Any) -> None:
    import httpx

    async def main() -> list[Any]:
        limits = httpx.Limits(max_connections=200)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=240, limits=limits) as c:
            bodies = [{"prompt": f"p{i % 7}", "seed": i, "size": "16x16", "steps": 1} for i in range(200)]
            return await asyncio.gather(*(c.post("/v1/images/generations", json=b) for b in bodies))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 200
    for i, r in enumerate(responses):
        im = decode_png(r.json()["data"][0]["b64_json"])
        assert im.size == (16, 16) and im.text["seed"] == str(i)


def test_deploy_handle_query(server: Any) -> None:
    ims = server.query("a boat", n=1, size="32x32", steps=2, seed=5)
    assert len(ims) == 1 and ims[0].size == (32, 32) and ims[0].text["seed"] == "5"
