"""CPU checks of benchmarks/ops_cuda.py: cases build, byte counts are right, --help works."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sdkern.ops import _checks

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "ops_cuda.py"


def _load():
    spec = importlib.util.spec_from_file_location("ops_cuda", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ops_cuda", mod)  # dataclasses look their module up
    spec.loader.exec_module(sys.modules["ops_cuda"])
    mod = sys.modules["ops_cuda"]
    return mod


def test_cases_are_valid_op_inputs():
    b = _load()
    check = {
        "group_norm": lambda x, g, be, groups, eps, silu: _checks.check_group_norm(x, g, be, groups, eps),
        "skip_group_norm": lambda x, sk, bi, g, be, groups, eps, silu: _checks.check_skip_group_norm(
            x, sk, bi, g, be, groups, eps
        ),
        "bias_split_gelu": _checks.check_bias_split_gelu,
        "skip_layer_norm": _checks.check_skip_layer_norm,
        "bias_add": _checks.check_bias_add,
        "attention": _checks.check_attention,
    }
    cs = b.cases()
    assert {c.op for c in cs} == set(b.OPS)
    att = [c.params for c in cs if c.op == "attention"]
    assert {p["d"] for p in att} == {40, 64, 80, 160} and {p["sq"] for p in att} == {4096, 1024, 256, 64}
    assert any(p["sk"] == 77 for p in att) and {p["h"] for p in att} == {8, 10, 20}
    for c in cs:
        check[c.op](*b.make_inputs(c, torch.float16, "meta"))


def test_min_bytes():
    b = _load()
    cs = {(c.op, c.label): c for c in b.cases()}
    m, c = 2 * 4096, 320
    assert b.min_bytes(cs[("bias_add", "2x4096x320")], torch.float16) == 2 * (3 * m * c + c)
    m, d2 = 2 * 4096, 2560
    assert b.min_bytes(cs[("bias_split_gelu", "2x4096x2560")], torch.float32) == 4 * (m * d2 + d2 + m * d2 // 2)
    n, ch, hw = 2, 320, 64
    sgn = cs[("skip_group_norm", "N2 C320 64x64 G32 silu")]
    assert b.min_bytes(sgn, torch.float16) == 2 * (3 * n * ch * hw * hw + n * ch + 3 * ch)
    att = cs[("attention", "B2 H8 S4096 Sk77 D40")]
    assert b.min_bytes(att, torch.bfloat16) == 2 * 2 * 8 * 40 * (2 * 4096 + 2 * 77)
    assert b.attention_flops(att) == 4 * 2 * 8 * 4096 * 77 * 40


def test_help_and_no_gpu(capsys):
    b = _load()
    with pytest.raises(SystemExit) as e:
        b.main(["--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert b.main(["--out", "/nonexistent/never_written.json"]) == 2
