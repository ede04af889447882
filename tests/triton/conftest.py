"""Triton tests run compiled on CUDA, or in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, i.e. before
``sdkern.triton`` is first imported; sdkern imports it lazily (only for CUDA tensors), so setting it
here, at collection of this directory, is early enough and leaves other test directories unaffected.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.triton)
