"""The implementations every op test runs on, and the shared rule they are held to.

An op's tests live in ``tests/ops/test_<op>.py`` and are parametrised over the implementations of the op:

- ``cpu``: the C++ kernel through ``sdkern._C`` (a fallback to the PyTorch reference fails the test);
- ``triton``: the Triton kernel, compiled on a GPU or in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
  set by tests/conftest.py when there is no GPU); marked ``triton``, skipped when triton is not installed;
- ``cuda``: the CUDA C++ kernel through ``sdkern._C_cuda``, counted per launch so that a silent fallback
  fails; marked ``cuda``, skipped without a GPU (tests/conftest.py);
- ``ort``: the op in sdkern's ONNX Runtime library (domain ``sdkern``) on the CPU execution provider;
  skipped when onnxruntime or onnx is not installed, or the library is not built (tests/conftest.py).

Each implementation keeps its own case list (``cases``): the Triton interpreter is slow, so its cases are few
and small; the CUDA cases are SD-sized. Every case compares against the float64 reference
(``sdkern.ops.reference``) with :func:`tests.utils.assert_close`: the DESIGN.md tolerance, tightened to
twice the error of plain PyTorch in the same dtype when a baseline is given (the 2x rule).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.utils import DTYPES, TOL, assert_close, bound, draws, fp32_sum, randn, rel_l2, to64

__all__ = [
    "DTYPES", "IMPLS", "TOL", "Impl", "as_nchw", "assert_close", "bound", "cases", "count_launches", "draws",
    "fp32_sum", "grid", "impl", "impls", "ort_input", "randn", "rel_l2", "to64",
]  # fmt: skip

IMPLS = ("cpu", "triton", "cuda", "ort")


def _missing(*modules: str) -> str | None:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(absent)} (not installed)" if absent else None


TRITON_MISSING = _missing("triton")
ORT_MISSING = _missing("onnxruntime", "onnx")

MARKS: dict[str, tuple[Any, ...]] = {
    "cpu": (),
    "triton": (pytest.mark.triton, pytest.mark.skipif(TRITON_MISSING is not None, reason=str(TRITON_MISSING))),
    "cuda": (pytest.mark.cuda,),  # skipped without a GPU, with the reason, by tests/conftest.py
    "ort": (pytest.mark.skipif(ORT_MISSING is not None, reason=str(ORT_MISSING)),),
}


def _id(v: Any) -> str:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, tuple) and all(isinstance(e, int) for e in v):
        return "x".join(map(str, v))
    if v is torch.channels_last:
        return "nhwc"
    if v is torch.contiguous_format:
        return "nchw"
    return str(v)


def cases(**per_impl: Iterable[Any]) -> list[Any]:
    """``pytest.param(impl, *case)`` for each implementation's own cases (ids ``impl-...``), for
    ``@pytest.mark.parametrize("impl,a,b", cases(cpu=[(a, b), ...], triton=[...]), indirect=["impl"])``.

    A case is a tuple of the test's other parameters (:func:`grid` makes them). Implementations come in
    the order of IMPLS.
    """
    unknown = set(per_impl) - set(IMPLS)
    assert not unknown, f"unknown implementations {unknown}"
    out = []
    for name in IMPLS:
        for case in per_impl.get(name, ()):
            assert isinstance(case, tuple), f"a case is a tuple of parameters, got {case!r}"
            out.append(pytest.param(name, *case, marks=MARKS[name], id="-".join([name, *map(_id, case)])))
    return out


def impls(*names: str) -> list[Any]:
    """The implementations ``names`` as parameters of the ``impl`` fixture (with their marks)."""
    return [pytest.param(n, marks=MARKS[n], id=n) for n in names]


def grid(*axes: Iterable[Any]) -> list[tuple[Any, ...]]:
    """The cartesian product of ``axes`` as case tuples (the first axis varies slowest)."""
    out: list[tuple[Any, ...]] = [()]
    for axis in axes:
        out = [(*c, v) for c in out for v in axis]
    return out


@dataclass
class Impl:
    """One implementation of the ops, ready to run.

    ``calls`` counts the launches of this implementation per op (cuda: through ``sdkern._C_cuda``; triton:
    calls of ``sdkern.triton.<op>``); :meth:`run` asserts that the count went up, so a fallback fails.
    """

    name: str
    device: str
    calls: Counter[str] = field(default_factory=Counter)
    module: ModuleType | None = None  # triton: sdkern.triton; ort: tests.ort.ortutil

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, shift: float = 0.0):
        """:func:`tests.utils.randn` on this implementation's device."""
        return randn(*shape, dtype=dtype, device=self.device, scale=scale, shift=shift)

    def run(self, op: str, *args: Any) -> Any:
        """``op`` with its schema's positional arguments (``torch.ops.sdkern.<op>``) on this implementation.

        cpu and cuda: the public torch op (cpu with fallbacks turned into failures, cuda counted);
        triton: the launcher ``sdkern.triton.<op>`` (the kernel itself, no dispatcher in between).
        """
        if self.name == "triton":
            assert self.module is not None
            before = self.calls[op]
            out = getattr(self.module, op)(*args)
            assert self.calls[op] == before + 1, f"sdkern.triton.{op} did not run"
            return out
        if self.name in ("cpu", "cuda"):
            before = self.calls[op]
            out = getattr(torch.ops.sdkern, op)(*args)
            if self.name == "cuda":
                assert self.calls[op] == before + 1, f"{op} did not run through sdkern._C_cuda: {dict(self.calls)}"
            return out
        raise NotImplementedError(f"{self.name} runs ONNX graphs, not torch ops")


def count_launches(monkeypatch: pytest.MonkeyPatch, module: Any, calls: Counter[str], only: ModuleType | None) -> None:
    """Count calls of ``module.<op>`` for every op (the launcher's first argument must be ``only`` if given)."""
    import sdkern.ops

    for op in sdkern.ops.OPS:
        orig = getattr(module, op)

        def wrapped(*args: Any, _orig: Callable[..., Any] = orig, _op: str = op) -> Any:
            out = _orig(*args)
            if only is None or args[0] is only:
                calls[_op] += 1
            return out

        monkeypatch.setattr(module, op, wrapped)


@pytest.fixture
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The implementation named by the test's ``impl`` parameter, preferred for the test's duration."""
    name = request.param
    if name == "cpu":
        from sdkern.ops import _dispatch

        def fail(key: Any, msg: str, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("sdkern fell back: " + msg % args)

        monkeypatch.setattr(_dispatch, "log_once", fail)  # a fallback to the PyTorch reference fails the test
        yield Impl("cpu", "cpu")
    elif name == "triton":
        trit = importlib.import_module("sdkern.triton")
        it = Impl("triton", "cuda" if torch.cuda.is_available() else "cpu", module=trit)
        count_launches(monkeypatch, trit, it.calls, None)
        if torch.cuda.is_available():
            import sdkern.ops

            previous = sdkern.ops.cuda_impl_order()[0]
            sdkern.ops.set_cuda_impl("triton")
            yield it
            sdkern.ops.set_cuda_impl(previous)
        else:
            yield it
    elif name == "cuda":
        import sdkern.ops
        from sdkern.ops import _launch, _native

        mod = _native.load("_C_cuda")
        if mod is None:
            pytest.fail(f"CUDA GPU present but {_native.load_error('_C_cuda')}")
        it = Impl("cuda", "cuda")
        count_launches(monkeypatch, _launch, it.calls, mod)
        previous = sdkern.ops.cuda_impl_order()[0]
        sdkern.ops.set_cuda_impl("cuda")
        yield it
        sdkern.ops.set_cuda_impl(previous)
    elif name == "ort":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
        yield Impl("ort", "cpu", module=importlib.import_module("tests.ort.ortutil"))
    else:
        raise ValueError(f"unknown implementation {name!r}")


def ort_input(n: int, h: int, w: int, c: int, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """An ORT GroupNorm input: (N, H, W, C) when ``channels_last`` else (N, C, H, W), contiguous."""
    x = randn(n, h, w, c, dtype=dtype, scale=2.0, shift=0.5)
    return x if channels_last else x.permute(0, 3, 1, 2).contiguous()


def as_nchw(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` of :func:`ort_input`'s layout viewed as (N, C, H, W)."""
    return t.permute(0, 3, 1, 2) if channels_last else t
