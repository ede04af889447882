"""The ``sdkern`` command: ``info``, ``bench``, ``generate``, ``roofline``.

``sdkern bench`` with no arguments is the demo: preset sd15 at 256x256, 4 steps, the engines that apply to
this machine, a progress bar, and the results table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

EPILOG = "Presets build real SD architectures with random weights offline; --model loads real weights."


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


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
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
    parser = argparse.ArgumentParser(
        prog="sdkern", description="Fast Stable Diffusion kernels: bench, generate, info.", epilog=EPILOG
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log sdkern's decisions (fallbacks, patches)")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,generate,roofline,optimize}")

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
        "With no arguments: preset sd15, 256x256, 4 steps, default engines.",
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
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default %(default)s)")
    p.add_argument(
        "--engines",
        type=_engines,
        default=None,
        help="comma-separated: eager,sdkern,sdkern-graphs,compile,ort,ort-sdkern "
        "(default: those that apply; compile, ort and ort-sdkern are opt-in). ort: the U-Net on ONNX Runtime "
        "with ORT's own fusions (CPU or CUDA EP); ort-sdkern: fused into sdkern's ORT custom ops (CPU EP)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight and latent seed")
    p.add_argument("--json", metavar="FILE", help="write results as JSON")
    p.add_argument("--csv", metavar="FILE", help="write results as CSV")
    p.add_argument("--plot", metavar="PNG", help="draw latency per engine")
    p.add_argument(
        "--roofline", action="store_true", help="print the U-Net step roofline of these settings and exit (no runs)"
    )
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline fraction column")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _malloc_arg(p)
    _roofline_device_args(p)

    p = sub.add_parser(
        "roofline",
        help="FLOPs/bytes per U-Net step and floor times",
        description="U-Net step FLOPs and minimum bytes by op class, floor time on A100/H100 "
        "and optional other devices.",
    )
    p.add_argument("--preset", choices=_preset_names(), default="sd15")
    p.add_argument("--height", type=_size, default=512)
    p.add_argument("--width", type=_size, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images; the U-Net batch doubles with CFG")
    p.add_argument("--no-cfg", action="store_true", help="U-Net batch = batch size (no classifier-free guidance)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    _roofline_device_args(p)

    p = sub.add_parser(
        "generate",
        help="txt2img",
        description="Text to image with per-image seeds (noise drawn on CPU); "
        "writes PNGs with settings in text chunks and a grid.",
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
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=["ddim", "euler", "euler-a", "dpm++"], default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ddim only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k")
    p.add_argument("--n-samples", type=_positive_int, default=1, help="images per batch")
    p.add_argument("--n-iter", type=_positive_int, default=1, help="number of batches")
    p.add_argument("--height", type=_size, default=None, help="default: the model's native size")
    p.add_argument("--width", type=_size, default=None, help="default: the model's native size")
    p.add_argument("--out", default="outputs", help="output directory (default %(default)s)")
    p.add_argument("--no-patch", action="store_true", help="run diffusers as is (no sdkern.patch)")
    _malloc_arg(p)

    from sdkern.onnx.command import add_parser as add_optimize_parser

    add_optimize_parser(sub)
    from sdkern.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _malloc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="on CPU, leave glibc's malloc as is (default: keep freed memory in the process, "
        "see sdkern.runtime.tune_cpu_allocator; also SDKERN_MALLOC_TUNING=0)",
    )


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
    from sdkern.models.configs import PRESETS

    return list(PRESETS)


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


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from sdkern.bench import report
    from sdkern.bench.runner import BenchSettings, run_bench

    device, dtype = _resolve_device(args, parser)
    if args.roofline:
        if args.model:
            parser.error("--roofline needs a --preset (configs of --model are not known offline)")
        return _cmd_roofline(args, parser, preset=args.preset, dtype=dtype)
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
    )
    t0 = time.perf_counter()
    rows = run_bench(s)
    wall = time.perf_counter() - t0
    print(report.format_table(rows))
    if rows and rows[0].get("roofline_device"):
        print(
            f"roofline_fraction = floor time of one U-Net step on {rows[0]['roofline_device']} "
            f"({rows[0]['roofline_floor_ms']:.2f} ms) / measured step time"
        )
    print(f"bench wall time {wall:.1f}s")
    meta = {"settings": vars(s) | {"engines": s.engines}, "wall_s": wall, "malloc_tuning": malloc}
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
    _tune_malloc(args, _onnx_device(args.provider) if args.onnx else device)
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
    )
    for path in generate(s):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdkern`` console script.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 success, 1 a run failed, 2 bad arguments.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.verbose:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "info":
            return _cmd_info(args)
        if args.command == "bench":
            return _cmd_bench(args, parser)
        if args.command == "roofline":
            return _cmd_roofline(args, parser, preset=args.preset, dtype=args.dtype)
        if args.command == "generate":
            return _cmd_generate(args, parser)
        if args.command == "optimize":
            from sdkern.onnx.command import run as run_optimize

            return run_optimize(args, parser)
        if args.command == "serve":
            from sdkern.serve.cli import run as run_serve

            return run_serve(args, parser)
    except SystemExit as e:  # argparse errors (exit 2) and --help (exit 0)
        return e.code if isinstance(e.code, int) else 1
    except ValueError as e:  # e.g. an unloadable --model: a usage error, not a crash
        print(f"sdkern {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
