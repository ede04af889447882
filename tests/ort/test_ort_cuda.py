"""The same one-op graphs on CUDAExecutionProvider (needs a GPU, onnxruntime-gpu and a library built with
CUDA kernels; skipped otherwise). Inputs are fed from the host; ORT copies them to the device."""

from __future__ import annotations

import pytest
import torch

import sdkern.ort
from sdkern.ops import reference
from tests.ort.ortutil import make_model, ort
from tests.utils import assert_close, randn, to64

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda_session():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")

    so = sdkern.ort.session_options(log_severity_level=3)
    # Fail instead of silently placing the sdkern node on the CPU EP (library built without CUDA kernels).
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")

    def make(model: bytes):
        sess = ort.InferenceSession(model, so, providers=["CUDAExecutionProvider"])
        if "CUDAExecutionProvider" not in sess.get_providers():
            pytest.skip("CUDAExecutionProvider could not be created")
        return sess

    return make


def _np(t: torch.Tensor):
    return t.numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_group_norm(cuda_session, dtype):
    x, gamma, beta = randn(2, 16, 16, 320, dtype=dtype), randn(320), randn(320)
    model = make_model(
        "GroupNorm", [("X", dtype), ("gamma", torch.float32), ("beta", torch.float32)], [("Y", dtype)],
        groups=32, activation=1,
    )  # fmt: skip
    out = cuda_session(model).run(None, {"X": _np(x), "gamma": _np(gamma), "beta": _np(beta)})[0]
    ref = reference.group_norm(*to64(x.permute(0, 3, 1, 2), gamma, beta), 32, 1e-5, True)
    assert_close(torch.from_numpy(out).permute(0, 3, 1, 2), ref, dtype, what="CUDA GroupNorm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_bias_split_gelu_and_add(cuda_session, dtype):
    x, b = randn(2, 64, 2560, dtype=dtype), randn(2560, dtype=dtype)
    out = cuda_session(make_model("BiasSplitGelu", [("X", dtype), ("bias", dtype)], [("Y", dtype)])).run(
        None, {"X": _np(x), "bias": _np(b)}
    )[0]
    assert_close(torch.from_numpy(out), reference.bias_split_gelu(*to64(x, b)), dtype, what="CUDA BiasSplitGelu")
    x, s, b = randn(2, 77, 320, dtype=dtype), randn(2, 77, 320, dtype=dtype), randn(320, dtype=dtype)
    model = make_model("BiasAdd", [("X", dtype), ("bias", dtype), ("skip", dtype)], [("Y", dtype)])
    out = cuda_session(model).run(None, {"X": _np(x), "bias": _np(b), "skip": _np(s)})[0]
    assert_close(torch.from_numpy(out), reference.bias_add(*to64(x, b, s)), dtype, what="CUDA BiasAdd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_mha_packed_kv(cuda_session, dtype):
    b, s, n, h, L = 2, 64, 8, 40, 77
    q, kv = randn(b, s, n, h, dtype=dtype), randn(b, L, n, 2, h, dtype=dtype)
    model = make_model("MultiHeadAttention", [("query", dtype), ("key", dtype)], [("output", dtype)], num_heads=n)
    out = cuda_session(model).run(None, {"query": _np(q.reshape(b, s, n * h)), "key": _np(kv)})[0]
    ref = reference.attention(*to64(q, kv[:, :, :, 0], kv[:, :, :, 1]))
    assert_close(torch.from_numpy(out).reshape(b, s, n, h), ref, dtype, what="CUDA MHA packed KV")
