"""Registration of the ``torch.ops.sdkern`` operators.

Low-overhead torch.library path: ``Library.define`` + ``Library.impl`` per dispatch key +
``register_fake``. One implementation chain per device type:

- CPU: C++ kernels (sdkern._C), then the PyTorch reference;
- CUDA: Triton / CUDA C++ in the order of ``SDKERN_CUDA_IMPL``, then the reference;
- anything else (DirectML ``privateuseone``, ``hpu``, ``mps``, ``xpu``, ...): the reference,
  registered as the CompositeExplicitAutograd kernel, with one log line per (op, device).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from sdkern.ops import _checks, _launch, reference
from sdkern.ops import _native as nat
from sdkern.ops._dispatch import Impl, cuda_impl_order, log_once, resolve, run_chain

SCHEMAS: dict[str, str] = {
    "group_norm": "group_norm(Tensor x, Tensor gamma, Tensor beta, int groups, float eps, bool silu) -> Tensor",
    "skip_group_norm": (
        "skip_group_norm(Tensor x, Tensor skip, Tensor? bias, Tensor gamma, Tensor beta, int groups, "
        "float eps, bool silu) -> (Tensor, Tensor)"
    ),
    "bias_split_gelu": "bias_split_gelu(Tensor x, Tensor bias) -> Tensor",
    "skip_layer_norm": (
        "skip_layer_norm(Tensor x, Tensor? skip, Tensor gamma, Tensor? beta, Tensor? bias, float eps) "
        "-> (Tensor, Tensor)"
    ),
    "bias_add": "bias_add(Tensor x, Tensor bias, Tensor skip) -> Tensor",
    "attention": "attention(Tensor q, Tensor k, Tensor v, float? scale, bool causal=False) -> Tensor",
}

OPS: tuple[str, ...] = tuple(SCHEMAS)

CHECKS: dict[str, Callable[..., None]] = {
    "group_norm": lambda x, g, b, groups, eps, silu: _checks.check_group_norm(x, g, b, groups, eps),
    "skip_group_norm": lambda x, sk, bi, g, b, groups, eps, silu: _checks.check_skip_group_norm(
        x, sk, bi, g, b, groups, eps
    ),
    "bias_split_gelu": _checks.check_bias_split_gelu,
    "skip_layer_norm": _checks.check_skip_layer_norm,
    "bias_add": _checks.check_bias_add,
    "attention": _checks.check_attention,
}


# ---------------------------------------------------------------------------------------------
# output allocation shared by the fake kernels and the empty-input shortcut
def _norm_like(x: torch.Tensor) -> torch.Tensor:
    fmt = torch.contiguous_format
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif not x.is_contiguous() and x.stride(1) == 1:
        fmt = torch.channels_last  # matches nchw_view's copy for other strides
    return torch.empty_like(x, memory_format=fmt)


def _empty_outputs(op: str, *args: Any) -> Any:
    if op == "group_norm":
        return _norm_like(args[0])
    if op == "skip_group_norm":
        return _norm_like(args[0]), _norm_like(args[0])
    if op == "bias_split_gelu":
        x = args[0]
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    if op == "skip_layer_norm":
        x = args[0]
        return x.new_empty(x.shape), x.new_empty(x.shape)
    if op == "bias_add":
        return args[0].new_empty(args[0].shape)
    q, v = args[0], args[2]
    return q.new_empty((*q.shape[:3], v.shape[3]))


def _attention_is_empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any) -> bool:
    return q.numel() == 0 or v.numel() == 0


def _first_is_empty(x: torch.Tensor, *_: Any) -> bool:
    return x.numel() == 0


IS_EMPTY: dict[str, Callable[..., bool]] = {op: _first_is_empty for op in SCHEMAS} | {"attention": _attention_is_empty}


def _is_empty(op: str, *args: Any) -> bool:
    return IS_EMPTY[op](*args)


# ---------------------------------------------------------------------------------------------
# implementation chains
def _native_impl(name: str, module: str, op: str) -> Impl:
    launch = getattr(_launch, op)

    def fn(*args: Any) -> Any:
        return launch(nat.load(module), *args)

    if module == "_C_cuda":  # launch on the tensors' device, whatever the current device is

        def fn(*args: Any) -> Any:
            with torch.cuda.device(args[0].device):
                return launch(nat.load(module), *args)

    def unavailable() -> str | None:
        mod = nat.load(module)
        if mod is None:
            return nat.load_error(module)
        return None if hasattr(mod, op) else f"sdkern.{module} has no {op}"

    return Impl(name, fn, unavailable)


def _triton_impl(op: str) -> Impl:
    def unavailable() -> str | None:
        try:
            mod = importlib.import_module("sdkern.triton")
        except ImportError as e:
            return f"Triton kernels unavailable ({e})"
        return None if hasattr(mod, op) else f"sdkern.triton has no {op}"

    def fn(*args: Any) -> Any:
        return getattr(importlib.import_module("sdkern.triton"), op)(*args)

    return Impl("triton", fn, unavailable)


def _reference_impl(op: str) -> Impl:
    return Impl("reference", getattr(reference, op))


def _cpu_chain(op: str) -> list[Impl]:
    return [_native_impl("cpp", "_C", op), _reference_impl(op)]


def _cuda_chain(op: str) -> list[Impl]:
    impls = {"triton": _triton_impl(op), "cuda": _native_impl("cuda", "_C_cuda", op)}
    return [impls[n] for n in cuda_impl_order()] + [_reference_impl(op)]


def chain(op: str, device_type: str) -> list[Impl]:
    """The implementation chain of ``op`` on a device type, first choice first."""
    if device_type == "cpu":
        return _cpu_chain(op)
    if device_type == "cuda":
        return _cuda_chain(op)
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


def _run(op: str, device_type: str, *args: Any) -> Any:
    CHECKS[op](*args)
    if IS_EMPTY[op](*args):
        return _empty_outputs(op, *args)
    return run_chain(op, device_type, _resolved(op, device_type), *args)


def _make_kernel(op: str, device_type: str | None) -> Callable[..., Any]:
    check, is_empty = CHECKS[op], IS_EMPTY[op]
    if device_type == "cpu":
        # The per-call path of every eager CPU op: a few microseconds matter for the small ops of a
        # U-Net step, so the CPU chain (fixed for the process) is resolved once here.
        cpu_impls: list[list[tuple[Impl, str | None]]] = []

        def kernel(*args: Any) -> Any:
            check(*args)
            if is_empty(*args):
                return _empty_outputs(op, *args)
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
            return _run(op, device_type, *args)

    else:

        def kernel(*args: Any) -> Any:
            dev = next(a.device.type for a in args if isinstance(a, torch.Tensor))
            log_once(("reference", op, dev), "sdkern.%s on %s: using the PyTorch reference", op, dev)
            check(*args)
            return getattr(reference, op)(*args)

    kernel.__name__ = f"sdkern_{op}_{device_type or 'other'}"
    return kernel


def _make_fake(op: str) -> Callable[..., Any]:
    def fake(*args: Any) -> Any:
        CHECKS[op](*args)
        return _empty_outputs(op, *args)

    fake.__name__ = f"sdkern_{op}_fake"
    return fake


_lib = torch.library.Library("sdkern", "DEF")
for _op, _schema in SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_op, _make_kernel(_op, "cpu"), "CPU")
    _lib.impl(_op, _make_kernel(_op, "cuda"), "CUDA")
    _lib.impl(_op, _make_kernel(_op, None), "CompositeExplicitAutograd")
    torch.library.register_fake(f"sdkern::{_op}", _make_fake(_op), lib=_lib)
