"""The ``sdkern`` command: ``info``, ``bench``, ``generate``, ``roofline``, ``optimize`` (and any subcommand
another module adds to :func:`build_parser`).

``sdkern bench`` with no arguments is the demo: preset sd15 at 256x256, 4 steps, the engines that apply to
this machine, a progress bar, and the results table.

Exit status: 0 success; 1 a run failed or an expected failure (missing library or package, unreadable or
unwritable path), reported as one line (``-v`` adds the traceback); 2 bad arguments, reported as one line
after the usage of the subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

EPILOG = "Presets build real SD architectures with random weights offline; --model loads real weights."
#: Largest accepted --seed: image k of a run uses seed + k, and torch generators take seeds below 2**64.
MAX_SEED = 2**63 - 1

logger = logging.getLogger("sdkern")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions' line breaks and appends ``(default: X)`` to every option with a default that its
    help text does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default" in text.lower()
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


#: ``sdkern bench --pipeline`` choices (pipelines other than txt2img are added to this list).
BENCH_PIPELINES = ["txt2img", "img2img", "inpaint", "controlnet", "svd"]


class UsageError(ValueError):
    """A bad argument found after parsing (reported with the subcommand's usage, exit 2)."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _size(text: str) -> int:
    v = _positive_int(text)
    if v % 8:
        raise argparse.ArgumentTypeError(f"height/width must be a multiple of 8, got {v}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return v


def _nonneg_float(text: str) -> float:
    v = _finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63 - 1], got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {v}")
    return v


def _strength(text: str) -> float:
    v = _finite_float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def _engines(text: str) -> list[str]:
    from sdkern.bench.engines import all_engines

    names = [n.strip() for n in text.split(",") if n.strip()]
    known = all_engines()
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown engine(s) {bad or [text]}; choose from {', '.join(known)}")
    return names


def _model_args(p: argparse.ArgumentParser, default_preset: str) -> Any:
    """Add --preset/--model (mutually exclusive; the group is returned), --dtype and --device."""
    from sdkern.models.configs import PRESETS

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

    from sdkern.onnx.command import add_parser as add_optimize_parser

    add_optimize_parser(sub)
    from sdkern.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    _finish(parser, sub)
    return parser


VERBOSE_HELP = "log sdkern's decisions (fallbacks, patches), show third-party warnings and error tracebacks"


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
        help="ControlNet conditioning image (with --controlnet or a *-controlnet preset)",
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


def _check_image_options(args: argparse.Namespace, s: Any) -> None:
    """Before any model is loaded: the image options fit each other and the preset (UsageError), and the images
    can be read (OSError, exit 1) and used (ValueError, exit 2)."""
    from sdkern import generate as gen

    if args.onnx and (s.pipeline != "txt2img" or args.safety_checker or args.controlnet):
        raise UsageError("--init-image, --mask, --control-image, --controlnet, --safety-checker: not with --onnx")
    try:
        gen.check_options(s)
        if not args.model:
            gen.check_preset_fit(s)
    except ValueError as e:
        raise UsageError(str(e)) from None
    gen.load_images(s, args.height, args.width, 8, check_only=True)


def _onnx_device(provider: str | None) -> str:
    """Where an ONNX run computes, for the allocator choice: CUDA for a CUDA provider, or with none given
    when a GPU is present (the directory's own target is not read here); CPU otherwise."""
    if provider:
        return "cuda" if "cuda" in provider.lower() else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _tune_malloc(args: argparse.Namespace, device: str) -> dict[str, Any] | None:
    """Tune the CPU allocator for a CPU run unless disabled; what was done (None: not attempted)."""
    from sdkern.runtime.allocator import tune_cpu_allocator, tuning_enabled

    if not device.startswith("cpu") or not tuning_enabled(args.no_malloc_tuning):
        return None
    t = tune_cpu_allocator()
    return {"applied": t.applied, "reason": t.reason, "settings": t.settings}


def _preset_names() -> list[str]:
    """Presets the roofline model covers (the SD/SDXL U-Nets; not the video presets)."""
    from sdkern.models.configs import PRESETS

    return [name for name, cfg in PRESETS.items() if cfg.kind != "svd"]


def _roofline_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peak-tflops", type=_positive_float, help="describe another device: peak TFLOP/s ...")
    p.add_argument("--bandwidth-gbs", type=_positive_float, help="... and memory bandwidth in GB/s")
    p.add_argument("--measure-cpu", action="store_true", help="add this CPU (measured matmul and copy rates)")


def _resolve_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = args.dtype or ("float16" if dev.type == "cuda" else "float32")
    return str(dev), dtype


def _roofline_devices(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Any]:
    from sdkern.bench import roofline as rl

    devices = list(rl.DEVICES.values())
    if (args.peak_tflops is None) != (args.bandwidth_gbs is None):
        parser.error("--peak-tflops and --bandwidth-gbs go together")
    if args.peak_tflops is not None:
        devices.append(rl.custom_device("custom", args.peak_tflops, args.bandwidth_gbs))
    if args.measure_cpu:
        devices.append(rl.measure_cpu())
    return devices


def _cmd_info(args: argparse.Namespace) -> int:
    import sdkern

    report = sdkern.info()
    if args.json or not isinstance(report, str):
        print(report if isinstance(report, str) else json.dumps(report, indent=2, default=str))
    else:
        print(report)
    return 0


def _cmd_roofline(args: argparse.Namespace, parser: argparse.ArgumentParser, *, preset: str, dtype: str) -> int:
    import torch

    from sdkern.bench import roofline as rl

    cfg_mult = 1 if getattr(args, "no_cfg", False) or getattr(args, "guidance", 7.5) <= 1 else 2
    r = rl.roofline(
        preset,
        args.height,
        args.width,
        args.batch_size * cfg_mult,
        getattr(torch, dtype),
        _roofline_devices(args, parser),
    )
    print(rl.format_roofline(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


def _check_out_dir(path: str, option: str = "--out") -> None:
    """Raise :class:`UsageError` unless ``path`` is, or can be created as, a writable directory (checked
    without creating anything)."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise UsageError(f"{option} {path}: exists and is not a directory")
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"{option} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {probe} is not writable")


def _check_out_file(path: str, option: str) -> None:
    """Raise :class:`UsageError` unless a file can be written at ``path`` (checked without creating it)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {parent} is not writable")


def _warn_if_busy(out: Any = sys.stderr) -> str | None:
    """Print (and return) a warning when the 1-minute load average exceeds the CPU count."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    msg = (
        f"warning: load average {load:.1f} exceeds the {cores} CPU cores of this machine: other processes "
        "compete for them and the timings below mean little"
    )
    print(msg, file=out, flush=True)
    return msg


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sdkern.bench import report
    from sdkern.bench.runner import BenchSettings, run_bench
    from sdkern.video import cli_bench, is_video_preset

    if args.pipeline == "svd" or (not args.model and is_video_preset(args.preset)):
        return cli_bench(args, parser)
    device, dtype = _resolve_device(args, parser)
    if args.roofline:
        if args.model:
            parser.error("--roofline needs a --preset (configs of --model are not known offline)")
        return _cmd_roofline(args, parser, preset=args.preset, dtype=dtype)
    for opt in ("json", "csv", "plot"):
        if getattr(args, opt):
            _check_out_file(getattr(args, opt), f"--{opt}")
    malloc = _tune_malloc(args, device)
    s = BenchSettings(
        preset=args.preset,
        model=args.model,
        height=args.height,
        width=args.width,
        steps=args.steps,
        batch_size=args.batch_size,
        batch_count=args.batch_count,
        warmup=args.warmup,
        guidance=args.guidance,
        dtype=dtype,
        device=device,
        engines=args.engines or [],
        seed=args.seed,
        roofline=not args.no_roofline,
        progress=not args.no_progress,
        pipeline=args.pipeline,
    )
    if not args.model:
        from sdkern.bench.runner import bench_preset

        try:
            bench_preset(args.preset, args.pipeline)
        except ValueError as e:
            raise UsageError(str(e)) from None
    busy = _warn_if_busy() if device.startswith("cpu") else None
    t0 = time.perf_counter()
    rows = run_bench(s)
    wall = time.perf_counter() - t0
    report.add_speedups(rows)
    print(report.format_table(rows))
    print(f"bench wall time {wall:.1f}s")
    if busy:
        print(busy, file=sys.stderr)
    meta = {"settings": vars(s) | {"engines": s.engines}, "wall_s": wall, "malloc_tuning": malloc, "busy": busy}
    if args.json:
        report.write_json(args.json, rows, meta)
    if args.csv:
        report.write_csv(args.csv, rows)
    if args.plot:
        report.plot(
            args.plot, rows, title=f"{s.model or s.preset} {s.height}x{s.width}, {s.steps} steps, {s.device} {s.dtype}"
        )
    failed = [r for r in rows if str(r.get("status", "")).startswith("error")]
    return 1 if failed else 0


def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sdkern.generate import GenerateSettings, generate
    from sdkern.video import cli_generate, is_video_preset

    if args.frames is not None or (not args.model and is_video_preset(args.preset)):
        return cli_generate(args, parser)
    if args.onnx:
        given = [f for f, v in (("--dtype", args.dtype), ("--device", args.device), ("--no-patch", args.no_patch)) if v]
        if given:
            parser.error(f"{', '.join(given)}: not used with --onnx (the model's dtype is fixed; choose --provider)")
        device, dtype = "cpu", "float32"  # unused on the ONNX path
    elif args.provider:
        parser.error("--provider applies to --onnx only")
    else:
        device, dtype = _resolve_device(args, parser)
    if args.eta and args.scheduler != "ddim":
        parser.error("--eta applies to --scheduler ddim only")
    if args.seed + args.n_samples * args.n_iter - 1 > MAX_SEED:
        parser.error(f"--seed {args.seed}: the last image's seed (seed + images - 1) exceeds 2**63 - 1")
    _check_out_dir(args.out)
    s = GenerateSettings(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        eta=args.eta,
        seed=args.seed,
        n_samples=args.n_samples,
        n_iter=args.n_iter,
        height=args.height,
        width=args.width,
        out=args.out,
        preset=args.preset,
        model=args.model,
        dtype=dtype,
        device=device,
        patch=not args.no_patch,
        onnx=args.onnx,
        provider=args.provider,
        progress=not args.no_progress,
        init_image=args.init_image,
        strength=args.strength,
        mask=args.mask,
        control_image=args.control_image,
        controlnet=args.controlnet,
        safety_checker=args.safety_checker,
    )
    _check_image_options(args, s)
    _tune_malloc(args, _onnx_device(args.provider) if args.onnx else device)
    for path in generate(s):
        print(path)
    return 0


def _quiet_third_party_warnings() -> None:
    """Hide warnings of third-party libraries that say nothing to a user of the command (torchvision's
    image extension, the ONNX exporter's TracerWarnings, transformers/diffusers deprecations); ``-v`` keeps
    them."""
    warnings.filterwarnings("ignore", module=r"torchvision(\.|$)")
    warnings.filterwarnings("ignore", message=r".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"(?s).*Converting a tensor to a Python")  # TracerWarning texts
    warnings.filterwarnings("ignore", message=r"(?s).*[Tt]race might not generalize")
    try:
        from torch.jit import TracerWarning

        warnings.filterwarnings("ignore", category=TracerWarning)
    except ImportError:  # pragma: no cover - torch always has it
        pass


class _MessageOnly(logging.Formatter):
    """The message alone (sdkern's start with "sdkern ..."): no traceback of ``logger.exception`` without -v."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


@contextlib.contextmanager
def _sdkern_warnings(show: bool) -> Iterator[None]:
    """While the command runs without ``-v``: sdkern's own warnings (e.g. a resized mask, an image blacked out by
    the safety checker) on stderr as ``sdkern: message`` lines (``-v`` shows them and more through basicConfig)."""
    log = logging.getLogger("sdkern")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_MessageOnly())
    if show:
        log.addHandler(handler)
    try:
        yield
    finally:
        if show:
            log.removeHandler(handler)


@contextlib.contextmanager
def _quiet_library_logs(quiet: bool) -> Iterator[None]:
    """While the command runs: transformers' and diffusers' own log warnings (e.g. "requires torchvision ...
    falling back") only at error level, through their environment switches (read when they are imported)."""
    names = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")
    saved = {n: os.environ.get(n) for n in names}
    if quiet:
        for n in names:
            os.environ.setdefault(n, "error")
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser, sp: argparse.ArgumentParser) -> int:
    if args.command == "info":
        return _cmd_info(args)
    if args.command == "bench":
        return _cmd_bench(args, sp)
    if args.command == "roofline":
        return _cmd_roofline(args, sp, preset=args.preset, dtype=args.dtype)
    if args.command == "generate":
        return _cmd_generate(args, sp)
    if args.command == "optimize":
        from sdkern.onnx.command import run as run_optimize

        return run_optimize(args, sp)
    if args.command == "serve":
        from sdkern.serve.cli import run as run_serve

        return run_serve(args, sp)
    handler = getattr(args, "_handler", None)  # subcommands added elsewhere: set_defaults(_handler=fn(args, sp))
    if handler is not None:
        return int(handler(args, sp))
    parser.error(f"unknown command {args.command!r}")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdkern`` console script.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 success, 1 a run failed or an expected failure (a missing library or package, a path
        that cannot be read or written), 2 bad arguments. Errors are one line on stderr; ``-v`` adds tracebacks.
    """
    parser = build_parser()
    sp = parser
    command = "sdkern"
    verbose = False
    try:
        args = parser.parse_args(argv)
        verbose = bool(args.verbose)
        if verbose:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        if args.command is None:
            parser.print_help()
            return 2
        sp = getattr(args, "_subparser", parser)
        command = f"sdkern {args.command}"
        with warnings.catch_warnings(), _quiet_library_logs(not verbose), _sdkern_warnings(not verbose):
            if not verbose:
                _quiet_third_party_warnings()
            return _dispatch(args, parser, sp)
    except SystemExit as e:  # argparse errors (exit 2) and --help (exit 0)
        return e.code if isinstance(e.code, int) else 1
    except UsageError as e:  # a bad argument found after parsing: the subcommand's usage, exit 2
        sp.print_usage(sys.stderr)
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. an unloadable --model: a usage error, not a crash
        logger.debug("%s failed", command, exc_info=True)
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as e:  # expected failures: missing library/package, unreadable/unwritable path
        if verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """``e`` as one line: its type for OS errors without a message, newlines folded."""
    text = str(e) or type(e).__name__
    if isinstance(e, ModuleNotFoundError) and e.name:
        text = f'{text} (install it, e.g. pip install "sdkern[all]")'
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
