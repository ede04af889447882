"""The shape of sdkern.ops: one module per op, registration from its spec, one argument check per call.

- every registered op comes from ``sdkern/ops/<op>.py`` (its SPEC, its public wrapper, its reference);
- sdkern.triton imports only the neutral parts of sdkern.ops (op modules, _spec, _layout), and those
  import neither the dispatcher nor a backend;
- a call through the dispatcher is checked once: the Triton launcher skips its own check there, and
  checks when called directly;
- the native launch is looked up in ``sdkern.ops._launch`` per call (what tests/cuda wrap to count launches).
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import sdkern.ops
from sdkern.ops import _launch, _library, _spec, reference

ROOT = Path(__file__).resolve().parents[1]
NEUTRAL = {"sdkern.ops._spec", "sdkern.ops._layout", *(f"sdkern.ops.{op}" for op in sdkern.ops.OPS)}


def _imports(path: Path) -> set[str]:
    """Modules a file imports (``from a import b`` counts as a.b when a.b is a module of sdkern.ops)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if node.module == "sdkern.ops")
    return out


def test_every_op_is_one_module():
    for op in sdkern.ops.OPS:
        mod = sys.modules[f"sdkern.ops.{op}"]
        spec = _library.SPECS[op]
        assert mod.SPEC is spec and spec.name == op
        assert getattr(sdkern.ops, op) is getattr(mod, op)  # the public keyword wrapper
        assert spec.reference is getattr(reference, op)
        assert str(getattr(torch.ops.sdkern, op).default._schema) == f"sdkern::{spec.schema}"
        assert _library.REFERENCES.__dict__[op] is spec.reference


def test_triton_imports_no_dispatcher():
    for path in sorted((ROOT / "sdkern" / "triton").glob("*.py")):
        ops_imports = {m for m in _imports(path) if m == "sdkern.ops" or m.startswith("sdkern.ops.")}
        assert ops_imports <= NEUTRAL, f"{path.name} imports {sorted(ops_imports - NEUTRAL)}"
    for name in NEUTRAL | {"sdkern.ops._native", "sdkern.ops.reference"}:  # and what those import
        path = ROOT / (name.replace(".", "/") + ".py")
        bad = {
            m
            for m in _imports(path)
            if m.startswith(("sdkern.triton", "sdkern.ops._library", "sdkern.ops._dispatch", "sdkern.ops._autograd"))
            or m in ("sdkern.ops._launch", "sdkern.patch")
        }
        assert not bad, f"{name} imports {sorted(bad)}"


def test_call_validated_restores_the_flag():
    def refuse():
        assert _spec.validated_by_caller()
        raise NotImplementedError("declined")

    assert not _spec.validated_by_caller()
    with pytest.raises(NotImplementedError):
        _spec.call_validated(refuse)
    assert not _spec.validated_by_caller()


def test_dispatcher_checks_once_and_triton_checks_direct_calls(monkeypatch):
    """The CUDA chain (Triton first) on CPU tensors in Triton's interpreter: the call is served by Triton,
    and Triton's own check runs only for the direct call."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or not importlib.import_module("sdkern.triton._common").interpreting():
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, no GPU)")
    trit = importlib.import_module("sdkern.triton")
    tmod = importlib.import_module("sdkern.triton.bias_add")
    counts: Counter[str] = Counter()
    own_check = tmod.check

    def counted_check(*args):
        counts["triton check"] += 1
        return own_check(*args)

    orig = trit.bias_add

    def served(*args):
        counts["served"] += 1
        return orig(*args)

    monkeypatch.setattr(tmod, "check", counted_check)
    monkeypatch.setattr(trit, "bias_add", served)
    previous = sdkern.ops.cuda_impl_order()[0]
    sdkern.ops.set_cuda_impl("triton")
    try:
        kernel = _library._make_kernel("bias_add", "cuda")
        x, b, s = torch.randn(3, 8), torch.randn(8), torch.randn(3, 8)
        torch.testing.assert_close(kernel(x, b, s), x + b + s)
        assert counts == {"served": 1}
        with pytest.raises(ValueError, match=r"^sdkern\.bias_add: bias must have shape \[8\]"):
            kernel(x, torch.randn(7), s)  # the dispatcher's check, before any implementation
        assert counts == {"served": 1}
    finally:
        sdkern.ops.set_cuda_impl(previous)
    torch.testing.assert_close(trit.bias_add(x, b, s), x + b + s)  # direct: Triton checks
    assert counts == {"served": 2, "triton check": 1}
    with pytest.raises(ValueError, match="bias"):
        orig(x, torch.randn(7), s)


def test_native_launch_is_looked_up_per_call(monkeypatch):
    if _library.selected("bias_add", "cpu")[0] != "cpp":
        pytest.skip("sdkern._C is not built")
    for op in sdkern.ops.OPS:
        assert getattr(_launch, op) is _library.SPECS[op].launch
    seen = []
    orig = _launch.bias_add

    def wrapped(mod, *args):
        seen.append(mod.__name__)
        return orig(mod, *args)

    monkeypatch.setattr(_launch, "bias_add", wrapped)
    x, b = torch.randn(3, 8), torch.randn(8)
    sdkern.ops.bias_add(x, b, x)
    assert seen == ["sdkern._C"]
