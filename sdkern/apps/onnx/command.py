"""The ``sdkern optimize`` subcommand (wired into :mod:`sdkern.apps.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sdkern.apps.cli.options import _finite_float as _finite
from sdkern.apps.cli.options import _seed


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "optimize",
        help="export + fuse a pipeline to an ONNX Runtime directory",
        description="Export text encoder(s) (SDXL: both), U-Net, VAE decoder and encoder (img2img, inpainting), "
        "the ControlNet of a ControlNet pipeline and optionally the safety checker to ONNX, fuse them with ONNX "
        "Runtime's optimiser, "
        "convert for the target (cpu: sdkern custom ops; cuda: ORT's CUDA kernels; dml: DirectML's), "
        "optionally fp16, and write a diffusers-style ONNX pipeline directory. Cached by source hash + options.",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="preset (sd15, sd21, sdxl, tiny, *-inpaint, *-controlnet) or a local diffusers directory / hub id "
        "(SD txt2img, img2img, inpainting or ControlNet pipeline; SDXL)",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--target", choices=["cpu", "cuda", "dml"], default="cpu", help="execution provider to fuse for")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="convert to float16 (GroupNorm gamma/beta and random ops stay fp32)",
    )
    p.add_argument("--force-fp32-ops", default="", help="comma-separated op types kept in float32 (default: none)")
    p.add_argument(
        "--safety-checker",
        action="store_true",
        help="also export and optimise the safety checker (SD 1.x/2.x; a preset gets a random-weight one)",
    )
    p.add_argument("--lora", help="LoRA .safetensors merged into the weights before export")
    p.add_argument("--lora-scale", type=_finite, default=1.0, help="LoRA weight")
    p.add_argument("--seed", type=_seed, default=0, help="weight seed of a preset")
    p.add_argument("--cache-dir", help="cache directory (default ~/.cache/sdkern/onnx or $SDKERN_CACHE_DIR)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument(
        "--clean-cache",
        action="store_true",
        help="first delete the cache's entries (only directories sdkern wrote; other files stay)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _writable_ancestor(path: Path) -> tuple[Path, str | None]:
    """The nearest existing ancestor of ``path`` and why a directory cannot be created there (None: it can)."""
    probe = path.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return probe, f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return probe, f"{probe} is not writable"
    return probe, None


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check every argument (exit 2 through ``parser.error``) before anything is deleted, loaded or exported."""
    if args.lora:
        if not args.lora.endswith(".safetensors"):
            parser.error("--lora: only .safetensors files are accepted (pickle checkpoints are refused)")
        if not os.path.isfile(args.lora):
            parser.error(f"--lora {args.lora}: no such file")
        if not os.access(args.lora, os.R_OK):
            parser.error(f"--lora {args.lora}: not readable")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"--out: {out} exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out}: exists and is not a directory")
    _, why = _writable_ancestor(out if not out.exists() else out.parent)
    if why:
        parser.error(f"--out {out}: {why}")
    if args.cache_dir is not None and not args.no_cache:
        cache = Path(args.cache_dir)
        if cache.exists() and not cache.is_dir():
            parser.error(f"--cache-dir {cache}: exists and is not a directory")
        _, why = _writable_ancestor(cache)
        if why:
            parser.error(f"--cache-dir {cache}: {why}")
    if args.no_cache and args.clean_cache:
        parser.error("--clean-cache and --no-cache: choose one")


def _check_ort_library(target: str) -> None:
    """A cpu-target directory runs sdkern's custom ops: refuse (one line, exit 1) when the library is absent."""
    if target != "cpu":
        return
    import sdkern.ort

    try:
        sdkern.ort.library_path()
    except sdkern.ort.OrtLibraryMissing as e:
        raise sdkern.ort.OrtLibraryMissing(
            f"--target cpu writes a pipeline that runs sdkern's custom ops, but {e} "
            "(--target cuda or dml needs no library)"
        ) from e


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from sdkern.apps.onnx import build as onnx_build

    validate(args, parser)
    _check_ort_library(args.target)
    # a bad --model exits here, before the cache is touched
    pipe = _load(args.model, args.seed, parser, safety_checker=args.safety_checker)
    if args.clean_cache:
        n = onnx_build.clean_cache(args.cache_dir)
        print(f"removed {n} cached pipeline(s)", file=sys.stderr)
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
            safety_checker=args.safety_checker,
            progress=lambda msg: print(f"sdkern optimize: {msg}", file=sys.stderr, flush=True),
        )
    except FileExistsError as e:
        parser.error(f"--out: {e}")
    print(json.dumps({k: manifest[k] for k in ("cache", "fused_nodes", "key")}, indent=2))
    return 0


def _load(model: str, seed: int, parser: argparse.ArgumentParser, safety_checker: bool = False) -> Any:
    from sdkern.apps.models import build
    from sdkern.apps.models.configs import PRESETS

    if model in PRESETS:
        try:
            return build(model, seed=seed, safety_checker=safety_checker)
        except ValueError as e:  # e.g. a safety checker for an SDXL preset
            parser.error(f"--model {model}: {e}")
    import diffusers

    try:
        # the safety checker is loaded only when it is exported (SDXL has none and ignores the argument)
        extra = {} if safety_checker else {"safety_checker": None}
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, **extra)
    except Exception as e:  # noqa: BLE001 - report any loading failure as a usage error
        parser.error(f"--model {model}: not a preset ({', '.join(PRESETS)}) and not loadable: {e}")
    supported = (
        diffusers.StableDiffusionPipeline,
        diffusers.StableDiffusionImg2ImgPipeline,
        diffusers.StableDiffusionInpaintPipeline,
        diffusers.StableDiffusionControlNetPipeline,
        diffusers.StableDiffusionXLPipeline,
        diffusers.StableDiffusionXLImg2ImgPipeline,
        diffusers.StableDiffusionXLInpaintPipeline,
        diffusers.StableDiffusionXLControlNetPipeline,
    )
    if not isinstance(pipe, supported):
        parser.error(
            f"--model {model}: a {type(pipe).__name__}; ONNX export supports the SD 1.x / 2.x and SDXL txt2img, "
            "img2img, inpainting and ControlNet pipelines"
        )
    if safety_checker and getattr(pipe, "safety_checker", None) is None:
        parser.error(f"--safety-checker: --model {model} has no safety checker")
    return pipe
