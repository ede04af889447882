"""The ``impl`` fixture of the per-op tests (tests/ops/_harness.py)."""

from tests.ops._harness import impl  # noqa: F401
