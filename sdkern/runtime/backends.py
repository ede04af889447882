"""Device backends: what sdkern does on each device type, chosen from the tensors' device at call time.

===============  ====================================  ==============  ==================
device type      ops                                   graphs          dtype
===============  ====================================  ==============  ==================
cuda             Triton or CUDA C++ (SDKERN_CUDA_IMPL)  CUDA graphs     fp16 / bf16
cpu              C++ kernels (sdkern._C)               none            fp32 / bf16
privateuseone    PyTorch reference ops                 none            explicit fp16
(DirectML)       (only if the user imported torch_directml; sdkern never imports it)
hpu (Gaudi)      reference ops / Habana fused SDPA     HPU graphs      bf16
                 (habana_frameworks imported lazily, failures caught)
anything else    PyTorch reference ops                 none            as given
===============  ====================================  ==============  ==================

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


@dataclass
class Backend:
    """What sdkern supports on one device type.

    Attributes
    ----------
    name : str
        Short name ("cuda", "cpu", "directml", "hpu", "reference").
    device_type : str
        torch device type it serves ("cuda", "cpu", "privateuseone", "hpu", ...).
    ops : str
        Which op implementation runs there ("triton/cuda", "cpp", "reference", "reference+fused-sdpa").
    graphs : str | None
        Graph capture mechanism ("cuda", "hpu") or None.
    preferred_dtype : torch.dtype
        The dtype sdkern recommends for inference there.
    autocast : bool
        Whether torch.autocast is usable (DirectML's is a stub: cast explicitly instead).
    notes : list[str]
        Anything the user should know (why a feature is off).
    """

    name: str
    device_type: str
    ops: str
    graphs: str | None
    preferred_dtype: torch.dtype
    autocast: bool = True
    notes: list[str] = field(default_factory=list)
    available: bool = True
    wrap_graph: Callable[[torch.nn.Module], torch.nn.Module] | None = None

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
    from sdkern.ops import cuda_impl_order

    return Backend("cuda", "cuda", "/".join(cuda_impl_order()) + " -> reference", "cuda", torch.float16)


def _cpu() -> Backend:
    return Backend("cpu", "cpu", "cpp -> reference", None, torch.float32)


def _directml() -> Backend:
    b = Backend("directml", "privateuseone", "reference", None, torch.float16, autocast=False)
    if "torch_directml" not in sys.modules:
        b.available = False
        b.notes.append("torch_directml is not imported (sdkern never imports it; import it first)")
    else:
        b.notes.append("autocast is a stub on DirectML: models are cast to fp16 explicitly")
    b.notes.append("initial noise is drawn on the CPU and moved")
    return b


def _hpu() -> Backend:
    b = Backend("hpu", "hpu", "reference", None, torch.bfloat16)
    if not _installed("habana_frameworks"):
        b.available = False
        b.notes.append("habana_frameworks is not installed")
        return b
    try:
        importlib.import_module("habana_frameworks.torch.core")
        hpu = importlib.import_module("habana_frameworks.torch.hpu")
    except Exception as e:  # noqa: BLE001 - any failure of a vendor stack disables the backend
        b.available = False
        b.notes.append(f"habana_frameworks failed to import: {type(e).__name__}: {e}")
        return b
    wrap = getattr(hpu, "wrap_in_hpu_graph", None)
    if wrap is not None:
        b.graphs = "hpu"
        b.wrap_graph = wrap
    else:
        b.notes.append("wrap_in_hpu_graph not found: no HPU graphs")
    try:
        kernels = importlib.import_module("habana_frameworks.torch.hpex.kernels")
        if hasattr(kernels, "FusedSDPA"):
            b.ops = "reference+fused-sdpa"
    except Exception:  # noqa: BLE001
        b.notes.append("Habana FusedSDPA unavailable: reference attention")
    return b


def _other(device_type: str) -> Backend:
    return Backend("reference", device_type, "reference", None, torch.float32)


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


def available_backends() -> list[Backend]:
    """Backends usable in this process. Probes CUDA through torch and the vendor stacks lazily."""
    out = [_cpu()]
    if torch.cuda.is_available():
        out.append(_cuda())
    for dt in ("privateuseone", "hpu"):
        b = _FACTORIES[dt]()
        if b.available:
            out.append(b)
    return out


def fused_sdpa_hpu() -> Callable[..., torch.Tensor] | None:
    """Habana's fused SDPA (``FusedSDPA.apply``) when importable, else None."""
    if not _installed("habana_frameworks"):
        return None
    try:
        kernels = importlib.import_module("habana_frameworks.torch.hpex.kernels")
        return kernels.FusedSDPA.apply
    except Exception:  # noqa: BLE001
        return None
