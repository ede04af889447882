"""The ``sdkern`` argument parser: every subcommand's options (``optimize`` and ``serve`` add their own)."""

from __future__ import annotations

import argparse
from typing import Any

from sdkern.apps.cli.options import (
    HelpFormatter,
    _engines,
    _finite_float,
    _nonneg_float,
    _nonneg_int,
    _positive_float,
    _positive_int,
    _seed,
    _size,
    _strength,
)

EPILOG = "Presets build real SD architectures with random weights offline; --model loads real weights."


#: ``sdkern bench --pipeline`` choices (pipelines other than txt2img are added to this list).
BENCH_PIPELINES = ["txt2img", "img2img", "inpaint", "controlnet", "svd"]


VERBOSE_HELP = "log sdkern's decisions (fallbacks, patches), show third-party warnings and error tracebacks"


def _model_args(p: argparse.ArgumentParser, default_preset: str) -> Any:
    """Add --preset/--model (mutually exclusive; the group is returned), --dtype and --device."""
    from sdkern.apps.models.configs import PRESETS

    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--preset", choices=list(PRESETS), default=default_preset, help="offline preset (default %(default)s)"
    )
    g.add_argument("--model", metavar="PATH_OR_ID", help="load real weights with diffusers from_pretrained")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default float32 on CPU, float16 on CUDA",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    return g


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sdkern`` command."""
    parser = argparse.ArgumentParser(prog="sdkern", epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser(
        "info",
        help="build and runtime report",
        description="Print sdkern.info(): what was built and which implementation each op uses.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "bench",
        help="benchmark engines side by side",
        description="Benchmark engines on the same pipeline, prompts and latents.\n"
        "With no arguments: preset sd15, 256x256, 4 steps, default engines.\n"
        "The table shows engine, median latency, speed-up vs eager, max difference to eager and status;\n"
        "--json/--csv hold every column.",
        epilog=EPILOG,
    )
    _model_args(p, "sd15")
    p.add_argument("--height", type=_size, default=256, help="image height in pixels (default %(default)s)")
    p.add_argument("--width", type=_size, default=256, help="image width in pixels (default %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=4, help="denoising steps (default %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images per call (default %(default)s)")
    p.add_argument("--batch-count", type=_positive_int, default=2, help="timed calls per engine (default %(default)s)")
    p.add_argument(
        "--warmup", type=_nonneg_int, default=0, help="untimed calls after the first call (default %(default)s)"
    )
    p.add_argument(
        "--guidance", type=_finite_float, default=7.5, help="classifier-free guidance scale (default %(default)s)"
    )
    p.add_argument(
        "--engines",
        type=_engines,
        default=None,
        help="comma-separated: eager,sdkern,sdkern-graphs,compile,openvino,ort,ort-sdkern "
        "(default: those that apply; compile, openvino, ort and ort-sdkern are opt-in). openvino: the U-Net on "
        "OpenVINO's CPU plugin (static shapes); ort: the U-Net on ONNX Runtime "
        "with ORT's own fusions (CPU or CUDA EP); ort-sdkern: fused into sdkern's ORT custom ops (CPU EP)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="weight and latent seed")
    p.add_argument(
        "--pipeline",
        choices=BENCH_PIPELINES,
        default="txt2img",
        help="what each engine runs: inpaint/controlnet use the preset's -inpaint/-controlnet variant; img2img and "
        "inpaint run --steps denoising steps at strength 0.75 on a synthetic image; svd: image-to-video "
        "(default %(default)s)",
    )
    p.add_argument("--frames", type=_positive_int, default=None, help="--pipeline svd: frames (default: the preset's)")
    p.add_argument("--json", metavar="FILE", help="write results (every column) as JSON")
    p.add_argument("--csv", metavar="FILE", help="write results (every column) as CSV")
    p.add_argument("--plot", metavar="PNG", help="draw latency per engine")
    p.add_argument(
        "--roofline", action="store_true", help="print the U-Net step roofline of these settings and exit (no runs)"
    )
    p.add_argument(
        "--no-roofline",
        action="store_true",
        help="skip the roofline fraction (a --json/--csv column: U-Net step floor time / measured)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _malloc_arg(p)
    _roofline_device_args(p)

    p = sub.add_parser(
        "roofline",
        help="FLOPs/bytes per U-Net step and floor times",
        description="U-Net step FLOPs and minimum bytes by op class, floor time on A100/H100 "
        "and optional other devices.",
    )
    p.add_argument("--preset", choices=_preset_names(), default="sd15", help="model architecture")
    p.add_argument("--height", type=_size, default=512, help="image height in pixels")
    p.add_argument("--width", type=_size, default=512, help="image width in pixels")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images; the U-Net batch doubles with CFG")
    p.add_argument("--no-cfg", action="store_true", help="U-Net batch = batch size (no classifier-free guidance)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16", help="data type")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    _roofline_device_args(p)

    p = sub.add_parser(
        "generate",
        help="txt2img, img2img, inpainting, ControlNet",
        description="Text to image (or img2img with --init-image, inpainting with --mask, ControlNet with\n"
        "--control-image) with per-image seeds (noise drawn on CPU); writes PNGs with settings in text chunks\n"
        "and a grid.",
        epilog=EPILOG,
    )
    g = _model_args(p, "sd15")
    g.add_argument(
        "--onnx",
        metavar="DIR",
        help="run an ONNX pipeline directory written by `sdkern optimize` on ONNX Runtime "
        "(with sdkern's custom-op library) instead of PyTorch",
    )
    p.add_argument(
        "--provider",
        default=None,
        help="with --onnx: ONNX Runtime execution provider, cpu, cuda, dml or a full name such as "
        "CUDAExecutionProvider (default: the target DIR was optimised for)",
    )
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars", help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    p.add_argument("--steps", type=_positive_int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=_finite_float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", choices=["ddim", "euler", "euler-a", "dpm++"], default="ddim", help="sampler")
    p.add_argument("--eta", type=_nonneg_float, default=0.0, help="DDIM eta (ddim only; default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the first image; image k uses seed+k")
    p.add_argument("--n-samples", type=_positive_int, default=1, help="images per batch")
    p.add_argument("--n-iter", type=_positive_int, default=1, help="number of batches")
    p.add_argument("--height", type=_size, default=None, help="default: the model's native size")
    p.add_argument("--width", type=_size, default=None, help="default: the model's native size")
    p.add_argument("--out", default="outputs", help="output directory (default %(default)s)")
    p.add_argument(
        "--frames", type=_positive_int, default=None, help="image-to-video (svd, tiny-svd): frames to generate"
    )
    p.add_argument("--no-patch", action="store_true", help="run diffusers as is (no sdkern.patch)")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    _malloc_arg(p)
    _image_args(p)

    from sdkern.apps.onnx.command import add_parser as add_optimize_parser

    add_optimize_parser(sub)
    from sdkern.apps.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    _finish(parser, sub)
    return parser


def _finish(parser: argparse.ArgumentParser, sub: Any) -> None:
    """What every subcommand gets, including ones added by other modules: ``-v`` after the subcommand, the
    defaults in ``--help``, its own parser in ``args._subparser`` (for errors with its usage); and the
    top-level help lists every subcommand."""
    for name, p in sub.choices.items():
        if not any("--verbose" in a.option_strings for a in p._actions):
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        if p.formatter_class is argparse.HelpFormatter:
            p.formatter_class = HelpFormatter
        p.set_defaults(_subparser=p, command=name)
    names = list(sub.choices)
    sub.metavar = "{" + ",".join(names) + "}"
    helps = {a.dest: a.help for a in sub._choices_actions}
    parser.description = "Fast Stable Diffusion kernels and tools. Subcommands:\n" + "\n".join(
        f"  {n:<10} {helps.get(n) or ''}" for n in names
    )


def _malloc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="on CPU, leave glibc's malloc as is (default: keep freed memory in the process, "
        "see sdkern.runtime.tune_cpu_allocator; also SDKERN_MALLOC_TUNING=0)",
    )


def _image_args(p: argparse.ArgumentParser) -> None:
    """generate's image inputs (torch path: SD 1.x/2.x; --init-image also SVD's conditioning frame)."""
    p.add_argument(
        "--init-image",
        metavar="PATH",
        help="img2img / inpainting: start from this image; output size: its own rounded down to multiples of the "
        "VAE factor (8 for SD) unless --height/--width (the image is then resized); SVD: the conditioning frame",
    )
    p.add_argument(
        "--strength",
        type=_strength,
        default=None,
        help="with --init-image: how much is repainted, in (0, 1] (default 0.8 img2img, 1.0 inpainting)",
    )
    p.add_argument(
        "--mask",
        metavar="PATH",
        help="inpainting (with --init-image and an inpainting model, e.g. --preset tiny-inpaint): grayscale, "
        "white = repaint; another size of the same aspect ratio is resized, another aspect ratio refused",
    )
    p.add_argument(
        "--control-image",
        metavar="PATH",
        help="ControlNet conditioning image (with --controlnet or a *-controlnet preset); with --init-image "
        "(and --mask): ControlNet img2img (inpainting)",
    )
    p.add_argument(
        "--controlnet",
        metavar="DIR_OR_PRESET",
        help="ControlNet: a diffusers ControlNet directory or a preset's (tiny-controlnet, sd15-controlnet)",
    )
    p.add_argument(
        "--safety-checker",
        action="store_true",
        help="run the model's (or preset's random-weight) safety checker: flagged images are written black, "
        "with a notice",
    )


def _preset_names() -> list[str]:
    """Presets the roofline model covers (the SD/SDXL U-Nets; not the video presets)."""
    from sdkern.apps.models.configs import PRESETS

    return [name for name, cfg in PRESETS.items() if cfg.kind != "svd"]


def _roofline_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peak-tflops", type=_positive_float, help="describe another device: peak TFLOP/s ...")
    p.add_argument("--bandwidth-gbs", type=_positive_float, help="... and memory bandwidth in GB/s")
    p.add_argument("--measure-cpu", action="store_true", help="add this CPU (measured matmul and copy rates)")
