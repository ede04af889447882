"""Fixtures of the SVD tests: ``fp32_noise`` (the patch tests' fixture) so that the float64 oracle denoises the noise
the fp32 runs draw (``randn_tensor(dtype=float64)`` draws other numbers)."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("diffusers") is not None:  # else every SVD test module skips itself
    from tests.patch.conftest import fp32_noise  # noqa: F401
