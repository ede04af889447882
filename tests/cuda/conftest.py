"""The ``gpu_impl`` fixture of the GPU-only tests: each CUDA implementation in turn, counted per op.

(The per-op numeric tests of each implementation are in tests/ops/test_<op>.py, fixture ``impl``.)
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest

import sdkern.ops
from sdkern.ops import _launch, _native
from tests.ops._harness import count_launches


@pytest.fixture(params=["triton", "cuda"])
def gpu_impl(request, monkeypatch) -> tuple[str, Counter]:
    """Each CUDA implementation in turn (Triton, CUDA C++), preferred and counted per op.

    Yields ``(name, calls)``; a test asserts ``calls[op]`` went up, so a silent fallback fails.
    """
    name = request.param
    calls: Counter[str] = Counter()
    if name == "cuda":
        mod = _native.load("_C_cuda")
        if mod is None:
            pytest.fail(f"CUDA GPU present but {_native.load_error('_C_cuda')}")
        count_launches(monkeypatch, _launch, calls, mod)
    else:
        count_launches(monkeypatch, importlib.import_module("sdkern.triton"), calls, None)
    previous = sdkern.ops.cuda_impl_order()[0]
    sdkern.ops.set_cuda_impl(name)
    yield name, calls
    sdkern.ops.set_cuda_impl(previous)
