"""ASGI middleware of the app: bearer-token auth on every path but ``/health`` and the per-endpoint, per-status
request counter (and the ``x-sdkern-pid`` header)."""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

from sdkern.apps.serve.state import State, error_body

ENDPOINTS = ("/v1/images/generations", "/sdapi/v1/txt2img", "/health", "/metrics", "/v1/models")


class Guard:
    """ASGI middleware: bearer auth on every path but /health, and the per-status request counter."""

    def __init__(self, app: Any, state: State) -> None:
        self.app, self.state = app, state
        key = state.cfg.api_key
        self.expected = f"Bearer {key}".encode() if key else None
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status_box = {"status": 0}

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-sdkern-pid", self.pid)]}
            await send(message)

        try:
            if self.expected is not None and path != "/health":
                got = dict(scope.get("headers") or []).get(b"authorization", b"")
                if not hmac.compare_digest(got, self.expected):
                    await _send_json(
                        send_counted,
                        401,
                        error_body(401, "missing or wrong API key (Authorization: Bearer KEY)"),
                        {"WWW-Authenticate": "Bearer"},
                    )
                    return
            await self.app(scope, receive, send_counted)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status_box["status"] or 499)).inc()


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


class GuardFactory(Guard):
    def __init__(self, app: Any, state: State) -> None:
        super().__init__(app, state)
