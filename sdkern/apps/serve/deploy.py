"""``deploy(...)``: start ``sdkern serve`` as a child process and hand back a query handle (MII style).

>>> handle = sdkern.serve.deploy("tiny", port=0)  # doctest: +SKIP
>>> images = handle.query("a red bicycle", steps=4, size="32x32")  # list of PIL images  # doctest: +SKIP
>>> handle.terminate()  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServeHandle:
    """A running ``sdkern serve`` child process and the client side of its API.

    Attributes
    ----------
    url : str
        Base URL, e.g. ``http://127.0.0.1:8000``.
    process : subprocess.Popen
        The server process.
    """

    def __init__(self, process: subprocess.Popen[bytes], url: str, api_key: str | None) -> None:
        self.process, self.url, self.api_key = process, url, api_key

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until ``/health`` says ready; raise RuntimeError if the process exits or time runs out."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sdkern serve exited with status {self.process.returncode} before it was ready")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2.0)
                if r.status_code == 200 and r.json().get("status") == "ready":
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"sdkern serve failed to load: {r.json().get('error')}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"sdkern serve was not ready within {timeout:g} s")

    def query(self, prompt: str, n: int = 1, timeout: float = 600.0, **options: Any) -> list[Any]:
        """Generate ``n`` images for ``prompt`` through ``POST /v1/images/generations``.

        Parameters
        ----------
        prompt : str
            Text prompt.
        n : int
            Number of images (seeds ``seed``, ``seed+1``, ...).
        **options
            Other request fields: ``size`` ("WxH"), ``steps``, ``guidance_scale``, ``seed``,
            ``negative_prompt``, ``scheduler``.

        Returns
        -------
        list of PIL.Image.Image
            The images (their PNG text chunks hold the generation parameters).
        """
        import httpx
        from PIL import Image

        r = httpx.post(
            f"{self.url}/v1/images/generations",
            json={"prompt": prompt, "n": n, **options},
            headers=self._headers(),
            timeout=timeout,
        )
        if r.status_code != 200:
            raise RuntimeError(f"sdkern serve answered {r.status_code}: {r.text}")
        return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM the server (it finishes accepted requests), wait for it and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def __enter__(self) -> ServeHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()


def deploy(
    model: str = "tiny",
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    wait: bool = True,
    timeout: float = 300.0,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    **options: Any,
) -> ServeHandle:
    """Start ``sdkern serve MODEL`` as a child process and return its :class:`ServeHandle`.

    Parameters
    ----------
    model : str
        Preset name, diffusers directory or ``sdkern optimize`` directory.
    host, port : str, int
        Where to listen; port 0 picks a free port.
    api_key : str, optional
        Require this bearer token (passed through ``SDKERN_API_KEY``, not the command line).
    wait : bool
        Block until the server reports ready.
    extra_args : list of str, optional
        More ``sdkern serve`` arguments.
    **options
        ``sdkern serve`` options by name, e.g. ``max_batch=4`` -> ``--max-batch 4``; True -> a flag.
    """
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "sdkern", "serve", model, "--host", host, "--port", str(port)]
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            cmd.append(flag)
        elif v not in (None, False):
            cmd += [flag, str(v)]
    cmd += extra_args or []
    child_env = {**os.environ, **(env or {})}
    if api_key:
        child_env["SDKERN_API_KEY"] = api_key
    proc = subprocess.Popen(cmd, env=child_env)
    handle = ServeHandle(proc, f"http://{host}:{port}", api_key)
    if wait:
        try:
            handle.wait_ready(timeout)
        except BaseException:
            handle.terminate()
            raise
    return handle
