"""Build and runtime report: ``sdkern.info()`` and ``python -m sdkern.info``.

What it says about ops is read from the op dispatcher's implementation chains (which implementation each op
would use on each device, and why earlier ones are skipped) and about devices from the runtime's backend
probes; nothing in it is written by hand.
"""

from __future__ import annotations

import importlib
import json
import platform
from typing import Any

import torch

from sdkern._version import __version__

# Optional packages: (import name, how to report it). Vendor stacks are probed with find_spec
# only: sdkern never imports torch_directml or habana_frameworks on its own.
_OPTIONAL = ("triton", "onnxruntime", "onnx", "diffusers", "transformers", "safetensors")
_PROBE_ONLY = ("torch_directml", "habana_frameworks")


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _OPTIONAL:
        try:
            mod = importlib.import_module(name)
            out[name] = str(getattr(mod, "__version__", "installed"))
        except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
            out[name] = None if isinstance(e, ImportError) else f"broken ({type(e).__name__}: {e})"
    from sdkern.runtime.backends import _installed

    for name in _PROBE_ONLY:
        out[name] = "installed (not imported by sdkern)" if _installed(name) else None
    return out


def _native_build() -> dict[str, Any]:
    from sdkern.ops import _native as nat

    build: dict[str, Any] = {}
    c = nat.load("_C")
    build["cpu"] = c.build_info() if c is not None else {"built": False, "reason": nat.load_error("_C")}
    cu = nat.load("_C_cuda")
    build["cuda"] = cu.build_info() if cu is not None else {"built": False, "reason": nat.load_error("_C_cuda")}
    try:
        from sdkern import ort

        build["ort_library"] = str(ort.library_path())
    except Exception as e:  # noqa: BLE001
        build["ort_library"] = None
        build["ort_reason"] = str(e)
    return build


def _devices() -> list[str]:
    from sdkern.runtime.backends import available_backends

    return [b.device_type for b in available_backends()]


def _op_choice() -> dict[str, dict[str, str]]:
    from sdkern.ops._library import OPS, selected

    table: dict[str, dict[str, str]] = {}
    for dev in [*_devices(), "other"]:
        row = {}
        for op in OPS:
            name, reasons = selected(op, dev if dev != "other" else "privateuseone")
            row[op] = name if not reasons else f"{name} ({'; '.join(reasons)})"
        table[dev if dev != "other" else "other (directml/hpu/mps/...)"] = row
    return table


def _backends() -> list[dict[str, Any]]:
    from sdkern.runtime.backends import known_backends

    return [b.describe() for b in known_backends()]


def info(as_dict: bool = False) -> str | dict[str, Any]:
    """Report version, what was built, which optional packages import, the device backends (available or not, with
    each one's op chain) and per-device op choices.

    Parameters
    ----------
    as_dict : bool
        Return the report as a dict instead of formatted text.
    """
    report: dict[str, Any] = {
        "sdkern": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "build": _native_build(),
        "packages": _package_versions(),
        "ops": _op_choice(),
        "backends": _backends(),
    }
    if as_dict:
        return report
    return format_report(report)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"sdkern {report['sdkern']}  (python {report['python']}, torch {report['torch']})"]
    lines.append(f"platform: {report['platform']}")
    gpu = report["gpu"] or "none"
    lines.append(f"CUDA: torch built with {report['torch_cuda'] or 'no CUDA'}; GPU: {gpu}")
    b = report["build"]
    lines.append("build:")
    lines.append(f"  cpu kernels : {json.dumps(b['cpu'])}")
    lines.append(f"  cuda kernels: {json.dumps(b['cuda'])}")
    lines.append(f"  ort library : {b['ort_library'] or 'not built (' + b.get('ort_reason', '') + ')'}")
    lines.append("packages:")
    for k, v in report["packages"].items():
        lines.append(f"  {k:<18} {v or '-'}")
    lines.append("device backends:")
    for b in report["backends"]:
        notes = f"  ({'; '.join(b['notes'])})" if b["notes"] else ""
        if b["available"]:
            lines.append(f"  {b['name']:<9} ops={b['ops']} graphs={b['graphs'] or '-'} dtype={b['dtype']}{notes}")
        else:
            lines.append(f"  {b['name']:<9} unavailable: {'; '.join(b['notes'])}")
    lines.append("op implementations:")
    for dev, row in report["ops"].items():
        lines.append(f"  {dev}:")
        for op, impl in row.items():
            lines.append(f"    {op:<16} {impl}")
    return "\n".join(lines)
