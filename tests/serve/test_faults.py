"""Faults and load: 429 on a full queue, 504 on timeout, disconnect cancellation, SIGTERM drain, and an
internal failure that fails only its own request."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.serve.conftest import decode_png, metric

SLOW = {"prompt": "slow", "size": "64x64", "steps": 150, "n": 10}  # tens of seconds of work, one image a batch


@pytest.fixture(scope="module")
def small() -> Iterator[Any]:
    """Batches of 1, a queue of 1 request, a 15 s timeout."""
    from sdkern.serve import deploy

    h = deploy("tiny", max_batch=1, batch_wait_ms=0, queue_size=1, timeout_s=15, log_level="warning")
    yield h
    h.terminate()


def _post(url: str, body: dict[str, Any], out: dict[str, Any], timeout: float = 120) -> None:
    import httpx

    try:
        out["r"] = httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)
    except httpx.HTTPError as e:
        out["e"] = e


def _metrics(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/metrics").text


def _wait(cond: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _idle(url: str) -> None:
    import httpx

    def idle() -> bool:
        h = httpx.get(f"{url}/health").json()
        return h.get("queue_depth") == 0 and h.get("running") is False

    _wait(idle, 180)


def test_full_queue_429_and_timeout_504(small: Any) -> None:
    import httpx

    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    ta = threading.Thread(target=_post, args=(small.url, SLOW, a))
    ta.start()
    _wait(lambda: metric(_metrics(small.url), "sdkern_queue_depth") == 0 and ta.is_alive())
    time.sleep(0.3)  # A's first image is running: A no longer waits
    tb = threading.Thread(target=_post, args=(small.url, SLOW, b))
    tb.start()
    _wait(lambda: metric(_metrics(small.url), "sdkern_queue_depth") == 1)
    r = httpx.post(f"{small.url}/v1/images/generations", json={"prompt": "c", "size": "32x32", "steps": 1})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "queue is full" in r.json()["error"]["message"]
    ta.join(60)
    tb.join(60)
    assert a["r"].status_code == 504 and "15 s" in a["r"].json()["error"]["message"]
    assert b["r"].status_code == 504
    _idle(small.url)


def test_disconnected_client_is_dropped(small: Any) -> None:
    _idle(small.url)  # the running image of a timed-out request finishes first
    before = metric(_metrics(small.url), "sdkern_images_total")
    x: dict[str, Any] = {}
    y: dict[str, Any] = {}
    # X runs ~3 s (64x64, 60 steps of tiny): Y, posted while X runs, must still be queued when its client gives up
    tx = threading.Thread(target=_post, args=(small.url, {"prompt": "x", "size": "64x64", "steps": 60}, x))
    tx.start()
    time.sleep(0.3)
    _wait(lambda: metric(_metrics(small.url), "sdkern_queue_depth") == 0)  # X is running
    _post(small.url, {"prompt": "y", "size": "32x32", "steps": 2, "n": 3}, y, timeout=0.5)  # gives up
    assert "e" in y  # the client timed out and closed its connection
    tx.join(120)
    assert x["r"].status_code == 200
    time.sleep(1.5)
    after = metric(_metrics(small.url), "sdkern_images_total")
    assert after - before == 1, "the disconnected request's images must not be generated"
    assert metric(_metrics(small.url), "sdkern_queue_depth") == 0


def test_sigterm_drains_accepted_requests(small: Any) -> None:
    import httpx

    _idle(small.url)
    x: dict[str, Any] = {}
    y: dict[str, Any] = {}
    tx = threading.Thread(target=_post, args=(small.url, {"prompt": "x", "size": "32x32", "steps": 40, "seed": 1}, x))
    ty = threading.Thread(target=_post, args=(small.url, {"prompt": "y", "size": "32x32", "steps": 40, "seed": 2}, y))
    tx.start()
    time.sleep(0.3)
    ty.start()
    _wait(lambda: metric(_metrics(small.url), "sdkern_queue_depth") == 1)
    small.process.send_signal(signal.SIGTERM)
    tx.join(60)
    ty.join(60)
    assert x["r"].status_code == 200 and y["r"].status_code == 200
    decode_png(x["r"].json()["data"][0]["b64_json"])
    decode_png(y["r"].json()["data"][0]["b64_json"])
    assert small.process.wait(60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{small.url}/health", timeout=2)


def test_internal_failure_fails_only_its_request() -> None:
    """A batch that fails is rerun request by request: only the failing one gets a 500."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from sdkern.serve.app import ServeConfig, create_app
    from sdkern.serve.engine import EngineOptions

    class FakeEngine:
        kind, factor, native_size, max_size, model_id, patched = "fake", 8, 32, 64, "fake", "no"
        schedulers = ("ddim",)
        batches: list[int] = []  # noqa: RUF012

        def __init__(self, opts: EngineOptions) -> None:
            self.opts = opts

        def batch_key(self, job: Any) -> tuple[Any, ...]:
            return (job.width, job.height)

        def generate(self, jobs: list[Any]) -> list[Any]:
            self.batches.append(len(jobs))
            if any(j.prompt == "boom" for j in jobs):
                raise MemoryError("simulated out of memory")
            return [Image.new("RGB", (j.width, j.height), (j.seed % 256, 0, 0)) for j in jobs]

        def warmup(self) -> float:
            return 0.0

        def metadata(self, job: Any) -> dict[str, Any]:
            return {"seed": job.seed}

        def png(self, job: Any, image: Any) -> bytes:
            import io

            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue()

    cfg = ServeConfig(max_batch=4, batch_wait_ms=300, exact_batching=False)
    app = create_app(cfg, engine_factory=FakeEngine)
    with TestClient(app) as c:
        _wait(lambda: c.get("/health").status_code == 200, 10)
        out: dict[str, Any] = {}

        def go(p: str) -> None:
            out[p] = c.post("/v1/images/generations", json={"prompt": p, "seed": 1})

        ts = [threading.Thread(target=go, args=(p,)) for p in ("ok1", "boom", "ok2")]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert out["boom"].status_code == 500 and "simulated out of memory" in out["boom"].json()["error"]["message"]
        assert out["ok1"].status_code == 200 and out["ok2"].status_code == 200
        assert FakeEngine.batches[0] == 3  # they were batched together, then rerun alone
        assert c.post("/v1/images/generations", json={"prompt": "after"}).status_code == 200


@pytest.mark.parametrize("max_batch,invariant", [(1, False), (4, True)])
def test_batch_invariant_mode_only_when_requests_can_share_a_batch(max_batch, invariant):
    """Exact batching makes the models run per sample; a --max-batch 1 server has no batch and keeps them whole."""
    from types import SimpleNamespace

    from torch import nn

    from sdkern.apps.serve.exact import _ATTR
    from sdkern.apps.serve.state import ServeConfig, State

    pipe = SimpleNamespace(unet=nn.Conv2d(4, 4, 3), vae=nn.GroupNorm(2, 4), text_encoder=nn.Linear(8, 8))
    engine = SimpleNamespace(kind="sd", pipe=pipe)
    state = State(ServeConfig(max_batch=max_batch, warmup=False), engine_factory=lambda _opts: engine)
    state.load()
    assert state.error is None and state.engine is engine
    assert all(getattr(m, _ATTR, False) == invariant for m in (pipe.unet, pipe.vae, pipe.text_encoder))


_SLOW_LOAD = """
import sys, time
from sdkern.apps.serve.server import run_server
from sdkern.apps.serve.state import ServeConfig

def never_ready(opts):  # a model load that takes far longer than the test
    time.sleep(600)
    raise RuntimeError("unreachable")

sys.exit(run_server(ServeConfig(), "127.0.0.1", int(sys.argv[1]), "warning", engine_factory=never_ready))
"""


def test_sigterm_while_loading_exits_at_once():
    """Stopped before the model is ready (nothing accepted), the server exits 0 without waiting for the load."""
    import subprocess
    import sys

    import httpx

    from sdkern.apps.serve.deploy import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_LOAD, str(port)])
    try:

        def loading() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("status") == "loading"
            except httpx.HTTPError:
                return False

        _wait(loading, 60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 20  # not the 600 s load
    finally:
        if proc.poll() is None:
            proc.kill()
