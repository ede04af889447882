"""Argument types and the checks subcommands share (also used by ``sdkern optimize`` and the video path).

A bad value raises ``argparse.ArgumentTypeError`` while parsing, or :class:`UsageError` after it (exit 2).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

#: Largest accepted --seed: image k of a run uses seed + k, and torch generators take seeds below 2**64.
MAX_SEED = 2**63 - 1


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
    from sdkern.apps.bench.engines import all_engines

    names = [n.strip() for n in text.split(",") if n.strip()]
    known = all_engines()
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown engine(s) {bad or [text]}; choose from {', '.join(known)}")
    return names


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
