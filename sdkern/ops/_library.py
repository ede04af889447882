"""Registration of the ``torch.ops.sdkern`` operators, one loop over the op specs.

Each op's module (``sdkern/ops/<op>.py``) declares an :class:`~sdkern.ops._spec.OpSpec`; this
module defines every schema in namespace ``sdkern`` and registers, per op, one kernel per dispatch
key (``Library.impl``) and the fake kernel (``register_fake``). One implementation chain per device type:

- CPU: C++ kernels (sdkern._C), then the PyTorch reference;
- CUDA: Triton / CUDA C++ in the order of ``SDKERN_CUDA_IMPL``, then the reference;
- anything else (DirectML ``privateuseone``, ``hpu``, ``mps``, ``xpu``, ...): the reference,
  registered as the CompositeExplicitAutograd kernel, with one log line per (op, device).

Every kernel validates the arguments once (``spec.check``); the implementations get checked tensors.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from sdkern.ops import _launch
from sdkern.ops import _native as nat
from sdkern.ops._dispatch import Impl, cuda_impl_order, log_once, resolve, run_chain
from sdkern.ops._spec import OpSpec, call_validated
from sdkern.ops.attention import SPEC as ATTENTION
from sdkern.ops.bias_add import SPEC as BIAS_ADD
from sdkern.ops.bias_split_gelu import SPEC as BIAS_SPLIT_GELU
from sdkern.ops.group_norm import SPEC as GROUP_NORM
from sdkern.ops.skip_group_norm import SPEC as SKIP_GROUP_NORM
from sdkern.ops.skip_layer_norm import SPEC as SKIP_LAYER_NORM

# Every op, in the order `sdkern info` lists them.
SPECS: dict[str, OpSpec] = {
    s.name: s for s in (GROUP_NORM, SKIP_GROUP_NORM, BIAS_SPLIT_GELU, SKIP_LAYER_NORM, BIAS_ADD, ATTENTION)
}
SCHEMAS: dict[str, str] = {name: s.schema for name, s in SPECS.items()}
OPS: tuple[str, ...] = tuple(SPECS)
# The references as an op namespace with torch.ops.sdkern's positional signatures (PatchConfig backend="reference").
REFERENCES = SimpleNamespace(**{name: s.reference for name, s in SPECS.items()})


# ---------------------------------------------------------------------------------------------
# implementation chains
def _native_impl(name: str, module: str, op: str) -> Impl:
    # The launch is looked up in sdkern.ops._launch on every call, so a test can wrap it (tests/cuda
    # count native launches to prove nothing fell back).
    def fn(*args: Any) -> Any:
        return getattr(_launch, op)(nat.load(module), *args)

    if module == "_C_cuda":  # launch on the tensors' device, whatever the current device is

        def fn(*args: Any) -> Any:
            with torch.cuda.device(args[0].device):
                return getattr(_launch, op)(nat.load(module), *args)

    def unavailable() -> str | None:
        mod = nat.load(module)
        if mod is None:
            return nat.load_error(module)
        return None if hasattr(mod, op) else f"sdkern.{module} has no {op}"

    return Impl(name, fn, unavailable)


def _triton() -> ModuleType:
    return sys.modules.get("sdkern.triton") or importlib.import_module("sdkern.triton")


def _triton_impl(op: str) -> Impl:
    def unavailable() -> str | None:
        try:
            mod = _triton()
        except ImportError as e:
            return f"Triton kernels unavailable ({e})"
        return None if hasattr(mod, op) else f"sdkern.triton has no {op}"

    def fn(*args: Any) -> Any:
        # sdkern.triton.<op> is looked up per call (tests wrap it); it skips its own check in here.
        return call_validated(getattr(_triton(), op), *args)

    return Impl("triton", fn, unavailable)


def _reference_impl(op: str) -> Impl:
    return Impl("reference", SPECS[op].reference)


def chain(op: str, device_type: str) -> list[Impl]:
    """The implementation chain of ``op`` on a device type, first choice first."""
    if device_type == "cpu":
        return [_native_impl("cpp", "_C", op), _reference_impl(op)]
    if device_type == "cuda":
        impls = {"triton": _triton_impl(op), "cuda": _native_impl("cuda", "_C_cuda", op)}
        return [impls[n] for n in cuda_impl_order()] + [_reference_impl(op)]
    return [_reference_impl(op)]


def selected(op: str, device_type: str) -> tuple[str, list[str]]:
    """(implementation that would run for a typical input, reasons the earlier ones are skipped)."""
    reasons = []
    for impl in chain(op, device_type):
        why = impl.unavailable()
        if why is None:
            return impl.name, reasons
        reasons.append(f"{impl.name}: {why}")
    return "none", reasons


# Resolved chains, rebuilt only when the CUDA preference changes: per (op, device type, order).
_chains: dict[tuple[str, str, tuple[str, ...]], list[tuple[Impl, str | None]]] = {}


def _resolved(op: str, device_type: str) -> list[tuple[Impl, str | None]]:
    key = (op, device_type, tuple(cuda_impl_order()) if device_type == "cuda" else ())
    impls = _chains.get(key)
    if impls is None:
        impls = _chains[key] = resolve(chain(op, device_type))
    return impls


# ---------------------------------------------------------------------------------------------
# kernels
def _make_kernel(op: str, device_type: str | None) -> Callable[..., Any]:
    spec = SPECS[op]
    check, is_empty, outputs = spec.check, spec.is_empty, spec.outputs
    if device_type == "cpu":
        # The per-call path of every eager CPU op: a few microseconds matter for the small ops of a
        # U-Net step, so the CPU chain (fixed for the process) is resolved once here.
        cpu_impls: list[list[tuple[Impl, str | None]]] = []

        def kernel(*args: Any) -> Any:
            check(*args)
            if is_empty(*args):
                return outputs(*args)
            if not cpu_impls:
                cpu_impls.append(_resolved(op, "cpu"))
            impls = cpu_impls[0]
            first, why = impls[0]
            if why is None:  # the C++ kernel (built): call it without the chain's bookkeeping
                try:
                    return first.fn(*args)
                except NotImplementedError as e:
                    why = str(e) or "unsupported input"
            return run_chain(op, "cpu", impls, *args, start=1, reasons=[f"{first.name}: {why}"])

    elif device_type is not None:

        def kernel(*args: Any) -> Any:
            check(*args)
            if is_empty(*args):
                return outputs(*args)
            return run_chain(op, device_type, _resolved(op, device_type), *args)

    else:
        reference = spec.reference

        def kernel(*args: Any) -> Any:
            dev = next(a.device.type for a in args if isinstance(a, torch.Tensor))
            log_once(("reference", op, dev), "sdkern.%s on %s: using the PyTorch reference", op, dev)
            check(*args)
            return reference(*args)

    kernel.__name__ = f"sdkern_{op}_{device_type or 'other'}"
    return kernel


def _make_fake(spec: OpSpec) -> Callable[..., Any]:
    check, outputs = spec.check, spec.outputs

    def fake(*args: Any) -> Any:
        check(*args)
        return outputs(*args)

    fake.__name__ = f"sdkern_{spec.name}_fake"
    return fake


_lib = torch.library.Library("sdkern", "DEF")
for _op, _s in SPECS.items():
    _lib.define(_s.schema)
    _lib.impl(_op, _make_kernel(_op, "cpu"), "CPU")
    _lib.impl(_op, _make_kernel(_op, "cuda"), "CUDA")
    _lib.impl(_op, _make_kernel(_op, None), "CompositeExplicitAutograd")
    torch.library.register_fake(f"sdkern::{_op}", _make_fake(_s), lib=_lib)
