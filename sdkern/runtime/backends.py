"""Device backends: what sdkern does on each device type, chosen from the tensors' device at call time.

===============  =====================================  ==============  ==================
device type      ops (the dispatcher's chain)           graphs          dtype
===============  =====================================  ==============  ==================
cuda             triton -> cuda -> reference            CUDA graphs     fp16 / bf16
                 (order: SDKERN_CUDA_IMPL)
cpu              cpp (sdkern._C) -> reference           none            fp32 / bf16
privateuseone    reference (PyTorch ops)                none            explicit fp16
(DirectML)       (only if the user imported torch_directml; sdkern never imports it)
hpu (Gaudi)      reference (PyTorch ops)                none            bf16
                 (habana_frameworks imported lazily, failures caught)
anything else    reference (PyTorch ops)                none            as given
===============  =====================================  ==============  ==================

A backend's ``ops`` is read from the op dispatcher's implementation chains
(:func:`sdkern.ops._library.chain`) and its ``graphs`` from the graph runner's mechanism
(:func:`sdkern.runtime.graphs.default_backend`), never written by hand. sdkern has no HPU graph or
Habana fused-attention integration: on Gaudi the ops run as PyTorch reference code.

Nothing here touches a vendor stack until a backend for that device is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("sdkern")


def dispatch_chain(device_type: str) -> list[str]:
    """The implementations the op dispatcher tries on ``device_type``, first choice first (every op's chain,
    merged in order)."""
    from sdkern.ops._library import OPS, chain

    names: list[str] = []
    for op in OPS:
        for impl in chain(op, device_type):
            if impl.name not in names:
                names.append(impl.name)
    return names


def _graphs_for(device_type: str) -> str | None:
    """The graph-capture mechanism :class:`sdkern.runtime.graphs.GraphRunner` uses on ``device_type`` (or None)."""
    from sdkern.runtime.graphs import default_backend

    graphs = default_backend()
    return graphs.name if graphs.supports(torch.device(device_type)) else None


@dataclass
class Backend:
    """What sdkern supports on one device type.

    Attributes
    ----------
    name : str
        Short name ("cuda", "cpu", "directml", "hpu", "reference").
    device_type : str
        torch device type it serves ("cuda", "cpu", "privateuseone", "hpu", ...).
    graphs : str | None
        Graph capture mechanism of the graph runner there ("cuda") or None.
    preferred_dtype : torch.dtype
        The dtype sdkern recommends for inference there.
    autocast : bool
        Whether torch.autocast is usable (DirectML's is a stub: cast explicitly instead).
    notes : list[str]
        Anything the user should know (why a feature is off).
    available : bool
        Whether the device can be used in this process.
    """

    name: str
    device_type: str
    graphs: str | None
    preferred_dtype: torch.dtype
    autocast: bool = True
    notes: list[str] = field(default_factory=list)
    available: bool = True

    @property
    def ops(self) -> str:
        """The op implementations tried there, first choice first (from the dispatcher's chains)."""
        return " -> ".join(dispatch_chain(self.device_type))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device_type": self.device_type,
            "available": self.available,
            "ops": self.ops,
            "graphs": self.graphs,
            "dtype": str(self.preferred_dtype).replace("torch.", ""),
            "autocast": self.autocast,
            "notes": list(self.notes),
        }


def _installed(name: str) -> bool:
    """Whether a top-level package can be imported, without importing it."""
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> Backend:
    b = Backend("cuda", "cuda", _graphs_for("cuda"), torch.float16)
    if not torch.cuda.is_available():
        b.available = False
        b.notes.append("no CUDA device (torch.cuda.is_available() is False)")
    return b


def _cpu() -> Backend:
    return Backend("cpu", "cpu", _graphs_for("cpu"), torch.float32)


def _directml() -> Backend:
    b = Backend("directml", "privateuseone", None, torch.float16, autocast=False)
    if "torch_directml" not in sys.modules:
        b.available = False
        b.notes.append("torch_directml is not imported (sdkern never imports it; import it first)")
    else:
        b.notes.append("autocast is a stub on DirectML: models are cast to fp16 explicitly")
    b.notes.append("initial noise is drawn on the CPU and moved")
    return b


def _hpu() -> Backend:
    b = Backend("hpu", "hpu", None, torch.bfloat16)
    if not _installed("habana_frameworks"):
        b.available = False
        b.notes.append("habana_frameworks is not installed")
        return b
    try:
        importlib.import_module("habana_frameworks.torch.core")  # registers the hpu device with torch
    except Exception as e:  # noqa: BLE001 - any failure of a vendor stack disables the backend
        b.available = False
        b.notes.append(f"habana_frameworks failed to import: {type(e).__name__}: {e}")
    return b


def _other(device_type: str) -> Backend:
    return Backend("reference", device_type, None, torch.float32)


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "cuda": _cuda,
    "cpu": _cpu,
    "privateuseone": _directml,
    "hpu": _hpu,
}


def backend_for(device: torch.device | str) -> Backend:
    """The backend for a device (built on demand; only that device's vendor stack is probed)."""
    device_type = torch.device(device).type
    factory = _FACTORIES.get(device_type)
    return factory() if factory is not None else _other(device_type)


def known_backends() -> list[Backend]:
    """Every device type sdkern knows (cpu, cuda, DirectML, HPU), available or not (``notes`` say why not)."""
    return [backend_for(device_type) for device_type in ("cpu", "cuda", "privateuseone", "hpu")]


def available_backends() -> list[Backend]:
    """Backends usable in this process. Probes CUDA through torch and the vendor stacks lazily."""
    return [b for b in known_backends() if b.available]
