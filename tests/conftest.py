"""Test-wide fixtures: fresh seeds (printed on failure) and NaN-poisoned fresh allocations."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in Triton's CPU interpreter when there is no GPU. TRITON_INTERPRET is read when
# ``triton.jit`` decorates a kernel, i.e. when sdkern.triton is first imported -- which any test
# directory may trigger (info reports, benchmarks' bookkeeping) -- so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The sdkern CLI tunes glibc's malloc for CPU runs (process-wide, irreversible). Tests that run the CLI
# in this process must not change the allocator of the whole test session; the tuning itself is tested
# in subprocesses (tests/runtime/test_allocator.py).
os.environ.setdefault("SDKERN_MALLOC_TUNING", "0")

from tests.utils import fresh_seed


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = int(os.environ.get("SDKERN_TEST_SEED", fresh_seed()))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


def _missing_ort_library(exc: BaseException | None) -> BaseException | None:
    """The sdkern.ort.OrtLibraryMissing in ``exc`` or its chain of causes, if any."""
    seen = 0
    while exc is not None and seen < 20:
        if type(exc).__name__ == "OrtLibraryMissing":
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    # A test (or fixture) that needs sdkern's ONNX Runtime library skips, with the reason, in an installation
    # without it (every build from this repository has it: tests/test_build_hermetic.py checks that).
    missing = _missing_ort_library(call.excinfo.value) if rep.failed and call.excinfo is not None else None
    if missing is not None:
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs sdkern's ORT library: {missing}")
        return
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("seed", f"reproduce with SDKERN_TEST_SEED={seeds[0]}"))


@pytest.fixture
def poison():
    """Make torch.empty* return NaN-filled memory, so any output element a kernel fails to write fails."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
