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
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from sdkern.apps.cli.options import (
    MAX_SEED,
    UsageError,
    _check_out_dir,
    _check_out_file,
    _onnx_device,
    _resolve_device,
    _tune_malloc,
    _warn_if_busy,
)
from sdkern.apps.cli.parser import build_parser

logger = logging.getLogger("sdkern")


def _check_image_options(args: argparse.Namespace, s: Any) -> None:
    """Before any model is loaded: the image options fit each other and the preset (UsageError), and the images
    can be read (OSError, exit 1) and used (ValueError, exit 2)."""
    from sdkern.apps import generate as gen

    if args.onnx and (s.pipeline != "txt2img" or args.safety_checker or args.controlnet):
        raise UsageError("--init-image, --mask, --control-image, --controlnet, --safety-checker: not with --onnx")
    try:
        gen.check_options(s)
        if not args.model:
            gen.check_preset_fit(s)
    except ValueError as e:
        raise UsageError(str(e)) from None
    gen.load_images(s, args.height, args.width, 8, check_only=True)


def _roofline_devices(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Any]:
    from sdkern.apps.bench import roofline as rl

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

    from sdkern.apps.bench import roofline as rl

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
    from sdkern.apps.bench import report
    from sdkern.apps.bench.runner import BenchSettings, run_bench
    from sdkern.apps.video import cli_bench, is_video_preset

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
        from sdkern.apps.bench.runner import bench_preset

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
    from sdkern.apps.generate import GenerateSettings, generate
    from sdkern.apps.video import cli_generate, is_video_preset

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
        from sdkern.apps.onnx.command import run as run_optimize

        return run_optimize(args, sp)
    if args.command == "serve":
        from sdkern.apps.serve.cli import run as run_serve

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
