"""Host test of the CPU kernels' scalar math (kernels/cpu/vec_math.h), built with UBSan.

exp / erf / erf-GELU run in the tail of every vectorised loop and everywhere on the baseline ISA level.
The driver is compiled with ``-fsanitize=undefined -fno-sanitize-recover=undefined`` (when the compiler
has it), so undefined behaviour on special inputs aborts it; e.g. exp(NaN) used to shift a negative
exponent (a NaN cast to INT_MIN), which only the sanitizer CI step caught. Results are compared with
float64 references: NaN stays NaN, infinities and over/underflow as in IEEE, relative error small.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(__file__).with_name("vec_math_host_test.cpp")
UBSAN = ["-fsanitize=undefined", "-fno-sanitize-recover=undefined"]


def _compile(work: Path) -> Path:
    cxx = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = work / "vec_math_host_test"
    base = [cxx, "-O2", "-std=c++17", f"-I{ROOT / 'kernels' / 'cpu'}", f"-I{ROOT / 'kernels' / 'include'}", str(SRC)]
    r = subprocess.run([*base, *UBSAN, "-o", str(exe)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:  # a compiler without the UBSan runtime: still test the values
        subprocess.run([*base, "-o", str(exe)], check=True, capture_output=True, timeout=120)
    return exe


def _erf(v: float) -> float:
    if math.isnan(v):
        return math.nan
    return math.erf(v) if math.isfinite(v) else math.copysign(1.0, v)


def test_scalar_math_special_and_random(tmp_path: Path, _fresh_seed: int) -> None:
    exe = _compile(tmp_path)
    rng = np.random.default_rng(_fresh_seed)
    special = [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 88.7, 88.72, 88.8, 89.0, -87.3, -103.9, -104.5, -200.0]
    special += [1e-40, -1e-40, 3e38, -3e38, 0.5, -0.5, 0.4999999, 9.9, 10.1, -10.1, 1e-8]
    x = np.concatenate(
        [
            np.array(special, np.float32),
            (rng.standard_normal(20000) * 4).astype(np.float32),
            rng.uniform(-110, 95, 20000).astype(np.float32),
            np.array([0x7FC00001, 0xFFC12345, 0x7F800001], np.uint32).view(np.float32),  # payload / signalling NaNs
        ]
    )
    (tmp_path / "in.f32").write_bytes(x.tobytes())
    r = subprocess.run([str(exe), str(tmp_path / "in.f32"), str(tmp_path / "out.f32")], capture_output=True, text=True)
    assert r.returncode == 0, f"driver failed (UBSan report?): {r.stderr[-2000:]}"
    out = np.frombuffer((tmp_path / "out.f32").read_bytes(), np.float32).reshape(3, -1).astype(np.float64)
    with np.errstate(all="ignore"):
        xd = x.astype(np.float64)
        # 1 + erf(x / sqrt 2) as erfc(-x / sqrt 2): no cancellation where erf ~ -1
        one_plus_erf = np.array([math.erfc(-v / math.sqrt(2.0)) if not math.isnan(v) else math.nan for v in xd])
        refs = {
            "exp": np.exp(xd),
            "erf": np.array([_erf(v) for v in xd]),
            "gelu": 0.5 * xd * one_plus_erf,  # -inf * 0: NaN, as torch gives
        }
    for row, (name, ref) in enumerate(refs.items()):
        got = out[row]
        with np.errstate(over="ignore"):
            ref32 = ref.astype(np.float32).astype(np.float64)  # what a correctly rounded fp32 result is
        nan = np.isnan(ref32)
        assert np.array_equal(np.isnan(got), nan), f"{name}: NaN pattern differs at {x[np.isnan(got) != nan][:5]}"
        inf = np.isinf(ref32)
        assert np.array_equal(got[inf], ref32[inf]), f"{name}: infinities differ"
        fin = ~nan & ~inf & (np.abs(ref) > 1e-37)  # normal-range results: relative error
        rel = np.abs(got[fin] - ref[fin]) / np.abs(ref[fin])
        assert rel.max() <= 2e-6, f"{name}: max rel err {rel.max():.3g} at x={x[fin][rel.argmax()]}"
        tiny = ~nan & ~inf & ~fin  # subnormal / zero results: absolute
        assert np.abs(got[tiny] - ref[tiny]).max(initial=0.0) <= 2e-38, f"{name}: wrong near zero"
