"""Shared checks of the patch tests: float64 eager oracle, accuracy criterion, bit-exact unpatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import sdkern
from sdkern.patch.cpu_engine import dtype_problem
from tests.utils import rel_l2

#: None where this CPU has PyTorch's bf16 oneDNN primitives (AVX-512 BW/VL/DQ or AVX-NE-CONVERT); else why not.
#: Without them the CPU engine holds bf16 weights as fp32 (sdkern.patch.cpu_engine.compute_dtype).
NO_BF16_PRIMITIVES = dtype_problem(torch.bfloat16)
needs_bf16_primitives = pytest.mark.skipif(
    NO_BF16_PRIMITIVES is not None, reason=f"bf16 oneDNN primitives only: {NO_BF16_PRIMITIVES}"
)


def onednn_log(capfd: pytest.CaptureFixture[str], fn: Callable[[], object]) -> list[list[str]]:
    """The primitives oneDNN executes during ``fn()`` (run under no_grad), from its own verbose log captured on fd 1:
    one comma-split field list per ``exec`` line; field 5 is the primitive ("convolution", "reorder", ...)."""
    capfd.readouterr()
    with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        fn()
    out = capfd.readouterr().out
    return [ln.split(",") for ln in out.splitlines() if ln.startswith("onednn_verbose") and ",exec," in ln]


def criterion(patched: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    """(error of patched, bound), the project's whole-model criterion (docs/ARCHITECTURE.md).

    fp32: rel_l2(patched, f64) <= max(2 * rel_l2(eager fp32, f64), 1e-5); fp16/bf16: <= 2 * rel_l2(eager, f64).
    """
    err, base = rel_l2(patched, ref64), rel_l2(eager, ref64)
    return err, (max(2 * base, 1e-5) if patched.dtype == torch.float32 else 2 * base)


def check_model(
    model: torch.nn.Module,
    run: Callable[[torch.nn.Module, torch.dtype], torch.Tensor],
    dtype: torch.dtype,
    what: str,
    **patch_kwargs: Any,
):
    """Float64 eager oracle, eager in ``dtype``, patched in ``dtype`` (criterion), unpatched (bit-exact).

    ``model`` is fp32 on entry and is left in ``dtype``, unpatched. Returns the patch report.
    """
    with torch.no_grad():
        model.double()  # fp32 -> f64 -> fp32 is exact
        ref64 = run(model, torch.float64)
        model.to(dtype)
        eager = run(model, dtype)
        report = sdkern.patch(model, report=True, **patch_kwargs)
        patched = run(model, dtype)
        assert torch.isfinite(patched).all(), f"{what}: non-finite patched output"
        err, bound = criterion(patched, eager, ref64)
        assert err <= bound, f"{what}: patched rel L2 {err:.3e} > bound {bound:.3e} (eager {rel_l2(eager, ref64):.3e})"
        sdkern.unpatch(model)
        again = run(model, dtype)
    assert torch.equal(again, eager), f"{what}: output after unpatch is not bit-identical to eager"
    return report, err, bound
