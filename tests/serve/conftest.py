"""Shared fixtures: real ``sdkern serve`` processes (tiny preset) on 127.0.0.1 and free ports."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="sdkern[serve] is not installed (fastapi)")
pytest.importorskip("uvicorn", reason="sdkern[serve] is not installed (uvicorn)")
pytest.importorskip("httpx", reason="sdkern[serve] is not installed (httpx)")
pytest.importorskip("prometheus_client", reason="sdkern[serve] is not installed (prometheus_client)")
pytest.importorskip("diffusers", reason="the tiny preset needs diffusers")

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def server() -> Iterator[Any]:
    """One shared server: batches of up to 4 within 300 ms, a queue of 256, an API key."""
    from sdkern.serve import deploy

    h = deploy(
        "tiny",
        api_key=API_KEY,
        max_batch=4,
        batch_wait_ms=300,
        queue_size=256,
        log_level="warning",
        timeout=300,
    )
    yield h
    assert h.terminate() == 0


@pytest.fixture(scope="session")
def client(server: Any) -> Iterator[Any]:
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def decode_png(b64: str) -> Any:
    """Decode and fully verify a base64 PNG; return the loaded image."""
    from PIL import Image

    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(raw)).verify()
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


def metric(text: str, name: str) -> float:
    """Sum of the samples of ``name`` (all label sets) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
