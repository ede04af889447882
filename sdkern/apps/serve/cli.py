"""The ``sdkern serve`` subcommand: its arguments and its run."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``sdkern`` subparsers."""
    p = sub.add_parser(
        "serve",
        help="HTTP image service (OpenAI Images + AUTOMATIC1111 APIs)",
        description="Load, patch and warm a pipeline once and serve it over HTTP: POST /v1/images/generations "
        "(OpenAI), POST /sdapi/v1/txt2img (AUTOMATIC1111), GET /health, /metrics, /v1/models. "
        "Requests with the same size, steps, scheduler and guidance on/off share U-Net batches.",
    )
    p.add_argument("model", help="preset (tiny, sd15, sd21, sdxl), a diffusers directory, or an `sdkern optimize` dir")
    p.add_argument("--engine", choices=["torch", "onnx"], default="torch", help="PyTorch (patched) or ONNX Runtime")
    p.add_argument("--provider", default=None, help="with --engine onnx: ONNX Runtime execution provider")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--max-batch", type=int, default=4, help="most images per U-Net batch (default %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for batch partners (ms)")
    p.add_argument("--queue-size", type=int, default=64, help="most waiting requests; then 429 (default %(default)s)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request time limit; then 504")
    p.add_argument("--max-size", type=int, default=None, help="largest width/height (default 2x the native size)")
    p.add_argument("--max-body-kb", type=int, default=64, help="largest request body in KiB (default %(default)s)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or set SDKERN_API_KEY)")
    p.add_argument("--deepcache", action="store_true", help="enable DeepCache on the U-Net")
    p.add_argument("--cuda-graphs", action="store_true", help="run U-Net, VAE and text encoder as CUDA graphs")
    p.add_argument("--no-patch", action="store_true", help="serve diffusers as is (no sdkern.patch)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation")
    p.add_argument(
        "--no-exact-batching",
        action="store_true",
        help="let convolutions and GroupNorms run batched (faster; batched images may then differ from solo "
        "ones in the last bits)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g = p.add_argument_group("Ray Serve scale-out")
    g.add_argument("--ray", action="store_true", help="deploy on Ray Serve (pip install sdkern[serve-ray])")
    g.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (fixed count)")
    g.add_argument("--min-replicas", type=int, default=None, help="with --ray: autoscaling lower bound")
    g.add_argument("--max-replicas", type=int, default=None, help="with --ray: autoscaling upper bound")
    g.add_argument(
        "--target-ongoing-requests", type=float, default=2.0, help="with --ray autoscaling: per-replica target"
    )
    g.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs per replica")
    g.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs per replica")
    g.add_argument("--ray-address", default=None, help="with --ray: cluster address (default: start a local one)")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``sdkern serve`` in the foreground; the exit status."""
    from sdkern.apps.serve.app import ServeConfig
    from sdkern.apps.serve.engine import EngineOptions

    for name in ("max_batch", "queue_size", "replicas", "max_body_kb"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_wait_ms < 0 or args.timeout_s <= 0:
        parser.error("--batch-wait-ms must be >= 0 and --timeout-s > 0")
    if not 0 <= args.port < 65536:
        parser.error("--port must be in 0..65535")
    if args.engine == "onnx" and (args.dtype or args.device or args.no_patch or args.cuda_graphs or args.deepcache):
        parser.error("--dtype, --device, --no-patch, --cuda-graphs, --deepcache: not used with --engine onnx")
    if args.engine == "onnx":
        device, dtype = "cpu", "float32"
    else:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    if args.cuda_graphs and not device.startswith("cuda"):
        parser.error("--cuda-graphs needs a CUDA device")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(name)s: %(message)s")
    cfg = ServeConfig(
        engine=EngineOptions(
            model=args.model,
            engine=args.engine,
            device=device,
            dtype=dtype,
            patch=not args.no_patch,
            deepcache=args.deepcache,
            cuda_graphs=args.cuda_graphs,
            provider=args.provider,
            max_size=args.max_size,
        ),
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        queue_size=args.queue_size,
        timeout_s=args.timeout_s,
        api_key=args.api_key or os.environ.get("SDKERN_API_KEY") or None,
        max_body_bytes=args.max_body_kb * 1024,
        warmup=not args.no_warmup,
        exact_batching=not args.no_exact_batching,
    )
    if args.ray:
        from sdkern.apps.serve.ray_app import RayOptions, run_ray

        return run_ray(
            cfg,
            RayOptions(
                host=args.host,
                port=args.port,
                replicas=args.replicas,
                min_replicas=args.min_replicas,
                max_replicas=args.max_replicas,
                target_ongoing_requests=args.target_ongoing_requests,
                num_gpus=args.num_gpus_per_replica,
                num_cpus=args.num_cpus_per_replica,
                address=args.ray_address,
            ),
        )
    if any(v is not None for v in (args.min_replicas, args.max_replicas)) or args.replicas != 1:
        parser.error("--replicas, --min-replicas, --max-replicas need --ray")
    from sdkern.apps.serve.server import run_server

    return run_server(cfg, args.host, args.port, args.log_level)
