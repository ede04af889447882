"""The ``sdkern optimize`` subcommand (wired into :mod:`sdkern.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger("sdkern")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "optimize",
        help="export + fuse a pipeline to an ONNX Runtime directory",
        description="Export text encoder(s) (SDXL: both), U-Net and VAE to ONNX, fuse them with ONNX Runtime's "
        "optimiser, "
        "convert for the target (cpu: sdkern custom ops; cuda: ORT's CUDA kernels; dml: DirectML's), "
        "optionally fp16, and write a diffusers-style ONNX pipeline directory. Cached by source hash + options.",
    )
    p.add_argument(
        "--model", default="tiny", help="preset (sd15, sd21, sdxl, tiny) or a local diffusers directory / hub id"
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--target", choices=["cpu", "cuda", "dml"], default="cpu")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="convert to float16 (GroupNorm gamma/beta and random ops stay fp32)",
    )
    p.add_argument("--force-fp32-ops", default="", help="comma-separated op types kept in float32")
    p.add_argument("--lora", help="LoRA .safetensors merged into the weights before export")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="weight seed of a preset")
    p.add_argument("--cache-dir", help="cache directory (default ~/.cache/sdkern/onnx or $SDKERN_CACHE_DIR)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--clean-cache", action="store_true", help="empty the cache first")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from sdkern.onnx import build as onnx_build

    if args.lora and not args.lora.endswith(".safetensors"):
        parser.error("--lora: only .safetensors files are accepted (pickle checkpoints are refused)")
    if args.clean_cache:
        n = onnx_build.clean_cache(args.cache_dir)
        print(f"removed {n} cached pipeline(s)", file=sys.stderr)
    pipe = _load(args.model, args.seed, parser)
    pipe.to(torch.float32)
    ops = tuple(o.strip() for o in args.force_fp32_ops.split(",") if o.strip())
    try:
        manifest = onnx_build.optimize_pipeline(
            pipe,
            args.out,
            target=args.target,
            fp16=args.fp16,
            force_fp32_ops=ops,
            lora=args.lora,
            lora_scale=args.lora_scale,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            overwrite=args.overwrite,
            progress=lambda msg: print(f"sdkern optimize: {msg}", file=sys.stderr, flush=True),
        )
    except FileExistsError as e:
        parser.error(f"--out: {e}")
    print(json.dumps({k: manifest[k] for k in ("cache", "fused_nodes", "key")}, indent=2))
    return 0


def _load(model: str, seed: int, parser: argparse.ArgumentParser) -> Any:
    from sdkern.models import build
    from sdkern.models.configs import PRESETS

    if model in PRESETS:
        return build(model, seed=seed)
    import diffusers

    try:
        # safety_checker=None: not loaded for SD (SDXL has none and ignores the argument)
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, safety_checker=None)
    except Exception as e:  # noqa: BLE001 - report any loading failure as a usage error
        parser.error(f"--model {model}: not a preset ({', '.join(PRESETS)}) and not loadable: {e}")
    supported = (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline)
    if not isinstance(pipe, supported):
        parser.error(
            f"--model {model}: a {type(pipe).__name__}; ONNX export supports StableDiffusionPipeline "
            "(SD 1.x / 2.x) and StableDiffusionXLPipeline"
        )
    return pipe
