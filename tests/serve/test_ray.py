"""``sdkern serve --ray``: 2 replicas of tiny on a local Ray instance (127.0.0.1), load spreading and a
replica killed under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install sdkern[serve-ray])")
pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install sdkern[serve-ray])")

pytestmark = pytest.mark.slow

BODY = {"prompt": "ray", "size": "16x16", "steps": 1}


def _post_retrying(url: str, body: dict[str, Any], out: list[Any], tries: int = 6) -> None:
    """POST with retries on 5xx / transport errors; append (final status, pid or error)."""
    import httpx

    last: Any = None
    for _ in range(tries):
        try:
            r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
            last = (r.status_code, r.headers.get("x-sdkern-pid"))
            if r.status_code < 500:
                break
        except httpx.HTTPError as e:
            last = (0, repr(e))
        time.sleep(1.0)
    out.append(last)


def _pids(url: str, n: int = 12) -> set[str]:
    """Replica processes that answered ``n`` concurrent requests with 200."""
    got: list[Any] = []
    ts = [threading.Thread(target=_post_retrying, args=(url, {**BODY, "seed": i}, got)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return {p for s, p in got if s == 200 and p}


def test_ray_two_replicas_spread_and_survive_a_kill() -> None:
    import shutil
    import tempfile

    import httpx

    from sdkern.serve import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="sdr", dir="/tmp")  # Ray's AF_UNIX socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp}
    cmd = [sys.executable, "-m", "sdkern.cli", "serve", "tiny", "--ray", "--replicas", "2", "--port", str(port)]
    cmd += ["--num-cpus-per-replica", "0.5", "--log-level", "warning", "--batch-wait-ms", "20"]
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"sdkern serve --ray exited with {proc.returncode}"
            assert time.monotonic() < deadline, "Ray deployment not ready in 300 s"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        # both replicas serve: requests spread over two processes
        pids: set[str] = set()
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:
            pids |= _pids(url)
        assert len(pids) == 2, pids

        # kill one replica under load: every request ends (200, or a clear 503), none hangs
        victim = int(sorted(pids)[0])
        results: list[Any] = []
        ts = [threading.Thread(target=_post_retrying, args=(url, {**BODY, "seed": i}, results)) for i in range(16)]
        for t in ts:
            t.start()
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        for t in ts:
            t.join(180)
        assert not any(t.is_alive() for t in ts), "a request hung"
        assert len(results) == 16
        assert all(s in (200, 503) for s, _ in results), results
        assert sum(s == 200 for s, _ in results) >= 8, results

        # Ray replaces the dead replica: two live processes again, the victim not among them
        deadline = time.monotonic() + 240
        live: set[str] = set()
        while time.monotonic() < deadline:
            live = _pids(url)
            if len(live) == 2 and str(victim) not in live:
                break
            time.sleep(2)
        assert len(live) == 2 and str(victim) not in live, live
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    assert rc == 0
