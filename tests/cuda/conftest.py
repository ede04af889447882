"""Fixtures for the CUDA C++ kernel tests: route sdkern.ops to sdkern._C_cuda and prove it ran."""

from __future__ import annotations

import importlib
from collections import Counter

import pytest

import sdkern.ops
from sdkern.ops import _launch, _native


@pytest.fixture
def cuda_native(monkeypatch):
    """Prefer the CUDA C++ implementation and count successful ``sdkern._C_cuda`` launches per op.

    A test asserts its op's count went up, so a silent fallback to Triton or the PyTorch reference
    (which would make the comparison meaningless) fails the test.
    """
    mod = _native.load("_C_cuda")
    if mod is None:
        pytest.fail(f"CUDA GPU present but {_native.load_error('_C_cuda')}")
    previous = sdkern.ops.cuda_impl_order()[0]
    sdkern.ops.set_cuda_impl("cuda")
    calls: Counter[str] = Counter()
    for op in sdkern.ops.OPS:
        orig = getattr(_launch, op)

        def wrapped(m, *args, _orig=orig, _op=op):
            out = _orig(m, *args)
            if m is mod:
                calls[_op] += 1
            return out

        monkeypatch.setattr(_launch, op, wrapped)
    yield calls
    sdkern.ops.set_cuda_impl(previous)


@pytest.fixture(params=["triton", "cuda"])
def gpu_impl(request, monkeypatch) -> tuple[str, Counter]:
    """Each CUDA implementation in turn (Triton, CUDA C++), preferred and counted per op like ``cuda_native``.

    Yields ``(name, calls)``; a test asserts ``calls[op]`` went up, so a silent fallback fails.
    """
    name = request.param
    calls: Counter[str] = Counter()
    if name == "cuda":
        mod = _native.load("_C_cuda")
        if mod is None:
            pytest.fail(f"CUDA GPU present but {_native.load_error('_C_cuda')}")
        for op in sdkern.ops.OPS:
            orig = getattr(_launch, op)

            def wrapped(m, *args, _orig=orig, _op=op):
                out = _orig(m, *args)
                if m is mod:
                    calls[_op] += 1
                return out

            monkeypatch.setattr(_launch, op, wrapped)
    else:
        trit = importlib.import_module("sdkern.triton")
        for op in sdkern.ops.OPS:
            orig = getattr(trit, op)

            def wrapped(*args, _orig=orig, _op=op):
                out = _orig(*args)
                calls[_op] += 1
                return out

            monkeypatch.setattr(trit, op, wrapped)
    previous = sdkern.ops.cuda_impl_order()[0]
    sdkern.ops.set_cuda_impl(name)
    yield name, calls
    sdkern.ops.set_cuda_impl(previous)
