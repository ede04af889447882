"""``sdkern serve``: a persistent Stable Diffusion service on FastAPI/uvicorn, scaling out on Ray Serve.

Endpoints: ``POST /v1/images/generations`` (OpenAI Images), ``POST /sdapi/v1/txt2img`` (AUTOMATIC1111),
``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``. See docs/serving.md.

Importing this package imports neither FastAPI nor torch's pipeline code; they load when used.
"""

from __future__ import annotations

from sdkern.apps.serve.deploy import ServeHandle, deploy, free_port

__all__ = ["ServeHandle", "deploy", "free_port"]
