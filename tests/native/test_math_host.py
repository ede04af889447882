"""Host unit test of the per-element math shared by the CPU and CUDA kernels (kernels/include/sdkern/math.h).

Compiles tests/native/math_host_test.cpp with the host C++ compiler and compares its raw outputs with
numpy / torch: fp16 and bf16 decoding of all 65536 bit patterns, encoding (round to nearest even) of
every fp16/bf16 value, every midpoint between neighbours and the floats just around those midpoints,
SiLU / erf-GELU, and the Chan combine of shifted partial sums used by the CUDA group-norm stats.
Runs without a GPU.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(__file__).with_name("math_host_test.cpp")
N_MOMENTS = 100000


def _compiler() -> str | None:
    for cxx in ("g++", "c++", "clang++"):
        if shutil.which(cxx):
            return cxx
    return None


@pytest.fixture(scope="module")
def host_results(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    work = tmp_path_factory.mktemp("math_host")
    exe = work / "math_host_test"
    sanitize = os.environ.get("SDKERN_SANITIZE_FLAGS", "").split()  # .ci/sanitizers.sh: ASan + UBSan
    subprocess.run(
        [cxx, "-O2", "-std=c++17", *sanitize, f"-I{ROOT / 'kernels' / 'include'}", str(SRC), "-o", str(exe)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    moments_data = (rng.standard_normal(N_MOMENTS) * 0.5 + 7.0).astype(np.float32)
    f16_vals = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
    f16_vals = np.sort(f16_vals[np.isfinite(f16_vals)])
    f16_mid = ((f16_vals[1:] + f16_vals[:-1]) / 2).astype(np.float32)  # exact in fp32
    bf16_bits = np.arange(65536, dtype=np.uint32) << 16
    bf16_mid = (bf16_bits | 0x8000).view(np.float32)  # midpoints between bf16 neighbours
    mids = np.concatenate([f16_mid, bf16_mid[np.isfinite(bf16_mid)]])
    around = np.concatenate([np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.0, 65520.0, 1e-8, -1e-8, 6e-8, 3e38, -3e38, 1e-40],
        dtype=np.float32,
    )
    randoms = (rng.standard_normal(20000) * np.exp(rng.uniform(-20, 12, 20000))).astype(np.float32)
    inputs = np.concatenate(
        [moments_data, f16_vals.astype(np.float32), bf16_bits.view(np.float32), mids, around, special, randoms]
    ).astype(np.float32)
    (work / "in.f32").write_bytes(inputs.tobytes())
    subprocess.run([str(exe), str(work / "in.f32"), str(work)], check=True, timeout=120)

    def read(name: str, dtype) -> np.ndarray:
        return np.frombuffer((work / name).read_bytes(), dtype=dtype)

    return inputs, read


def test_f16_decode_all_patterns(host_results):
    _, read = host_results
    got = read("f16_decode.f32", np.float32)
    ref = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # bitwise, keeps -0.0


def test_bf16_decode_all_patterns(host_results):
    _, read = host_results
    got = read("bf16_decode.f32", np.float32)
    ref = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_f16_encode_round_to_nearest_even(host_results):
    inputs, read = host_results
    got = read("f16_encode.u16", np.uint16)
    with np.errstate(over="ignore"):
        ref = inputs.astype(np.float16).view(np.uint16)
    nan = np.isnan(inputs)
    assert np.isnan(got[nan].view(np.float16)).all()
    bad = np.flatnonzero(got[~nan] != ref[~nan])
    assert bad.size == 0, f"{bad.size} mismatches, e.g. {inputs[~nan][bad[:5]]}"


def test_bf16_encode_round_to_nearest_even(host_results):
    inputs, read = host_results
    got = read("bf16_encode.u16", np.uint16)
    ref = torch.from_numpy(inputs.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(inputs)
    assert np.isnan((got[nan].astype(np.uint32) << 16).view(np.float32)).all()
    bad = np.flatnonzero(got[~nan] != ref[~nan])
    assert bad.size == 0, f"{bad.size} mismatches, e.g. {inputs[~nan][bad[:5]]}"


def test_round_trips(host_results):
    _, read = host_results
    # every finite fp16 / bf16 value was among the inputs: encode(decode(h)) == h
    f16_vals = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = np.isfinite(f16_vals)
    got = read("f16_encode.u16", np.uint16)[N_MOMENTS : N_MOMENTS + int(finite.sum())]
    assert np.array_equal(got.view(np.float16), np.sort(f16_vals[finite].astype(np.float64)).astype(np.float16))


def test_activations(host_results):
    inputs, read = host_results
    x = inputs.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(x) & (np.abs(x) < 80)
    silu_ref = x[ok] / (1 + np.exp(-x[ok]))
    gelu_ref = 0.5 * x[ok] * (1 + np.vectorize(math.erf)(x[ok] / math.sqrt(2)))
    # erf-GELU in fp32 cancels for x << 0 (1 + erf -> 0), as torch's fp32 gelu does: allow an
    # absolute error of a few ulps of 0.5*|x| on top of the relative bound.
    for name, ref, slack in (("silu.f32", silu_ref, 0.0), ("gelu.f32", gelu_ref, 3e-7)):
        got = read(name, np.float32)[ok].astype(np.float64)
        bound = 4e-6 * np.abs(ref) + slack * np.abs(x[ok]) + 1e-37
        excess = np.abs(got - ref) / bound
        assert (excess <= 1).all(), f"{name}: worst at x={x[ok][excess.argmax()]}: {excess.max():.2f} x bound"


def test_moments_combine(host_results):
    inputs, read = host_results
    data = inputs[:N_MOMENTS].astype(np.float64)
    mom = read("moments.f32", np.float32).astype(np.float64)
    for n, mean, m2 in (mom[:3], mom[3:]):
        assert n == N_MOMENTS
        assert abs(mean - data.mean()) <= 1e-5 * abs(data.mean())
        assert abs(m2 / n - data.var()) <= 1e-4 * data.var(), (m2 / n, data.var())
