"""Triton integration tests (the per-op Triton cases are in tests/ops/test_<op>.py, implementation ``triton``).

They run compiled on CUDA, or in Triton's CPU interpreter when there is no GPU (TRITON_INTERPRET=1, set
by tests/conftest.py before anything imports sdkern.triton). Every test here is marked ``triton``.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.triton)
