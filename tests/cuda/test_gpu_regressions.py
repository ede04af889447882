"""GPU regressions of issue 19 ("GPU kernels: defects found by review and by compiling for sm_80").

Each case runs on both CUDA implementations (Triton and CUDA C++), proving the chosen one ran:
batch-1 GroupNorm / SkipGroupNorm in both layouts with (1, C) and (1, C, 1, 1) skips (Triton did not
compile for N = 1); packed QKV / KV views with Sk = 77 over the SD head dims, Sq off the tile, a
misaligned view; B*H = 65536 (Triton's grid axis 1 stopped at 65535); skip_layer_norm at the
shared-memory boundary C = 12224 / 12225 / 12288; GroupNorm with ``cudaMallocAsync`` while a second
stream allocates (the workspace was released before the kernels ran); tensors on cuda:1 while cuda:0
is current (no device guard); Triton refusing GPUs below sm_80 with a reason. Skipped without a GPU.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sdkern.ops
from sdkern.ops import reference
from tests.utils import assert_close, randn, to64

pytestmark = pytest.mark.cuda

IMPLS = ["triton", "cuda"]
ROOT = Path(__file__).resolve().parents[2]


def _naive_attention(q, k, v, scale):
    if q.dtype == torch.float32:
        return None
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


# ---- 1. batch-1 group norms ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 320, 16, 16, 32), (1, 64, 5, 7, 8), (1, 512, 1, 1, 32)])
def test_group_norm_batch1(shape, dtype, fmt, gpu_impl, poison):
    impl, calls = gpu_impl
    n, c, h, w, g = shape
    x = randn(n, c, h, w, dtype=dtype, shift=0.3).cuda().contiguous(memory_format=fmt)
    gamma, beta = randn(c).cuda(), randn(c).cuda()
    y = sdkern.ops.group_norm(x, gamma, beta, groups=g, eps=1e-5, silu=True)
    assert calls["group_norm"] == 1, f"{impl} did not run"
    assert_close(y, reference.group_norm(*to64(x, gamma, beta), g, 1e-5, True), dtype, what=f"{impl} {shape}")


@pytest.mark.parametrize("skip_kind", ["(1,C)", "(1,C,1,1)", "full"])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_skip_group_norm_batch1(skip_kind, fmt, dtype, gpu_impl, poison):
    impl, calls = gpu_impl
    n, c, h, w, g = 1, 320, 8, 8, 32
    x = randn(n, c, h, w, dtype=dtype).cuda().contiguous(memory_format=fmt)
    shape = {"(1,C)": (n, c), "(1,C,1,1)": (n, c, 1, 1), "full": (n, c, h, w)}[skip_kind]
    skip = randn(*shape, dtype=dtype).cuda()
    bias, gamma, beta = randn(c).cuda(), randn(c).cuda(), randn(c).cuda()
    y, s = sdkern.ops.skip_group_norm(x, skip, gamma, beta, bias, groups=g, eps=1e-5, silu=True)
    assert calls["skip_group_norm"] == 1, f"{impl} did not run"
    ry, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), g, 1e-5, True)
    assert_close(s, rs, dtype, what=f"{impl} s")
    assert_close(y, ry, dtype, what=f"{impl} y")


# ---- 2. attention: packed views, Sk = 77, SD head dims, odd Sq, misaligned -------------------
@pytest.mark.parametrize("d", [40, 64, 80, 128, 160])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_packed_views_sk77(d, dtype, gpu_impl, poison):
    impl, calls = gpu_impl
    b, sq, sk, h = 2, 333, 77, 4
    qkv = randn(b, sq, 3, h, d, dtype=dtype).cuda()  # self-attention: packed QKV projection
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = sdkern.ops.attention(q, k, v, scale=0.3)
    assert_close(out, reference.attention(*to64(q, k, v), 0.3), dtype, _naive_attention(q, k, v, 0.3), f"{impl} qkv")
    kv = randn(b, sk, 2, h, d, dtype=dtype).cuda()  # cross-attention: packed KV of the 77 text tokens
    k, v = kv[:, :, 0], kv[:, :, 1]
    out = sdkern.ops.attention(q, k, v)
    scale = 1 / math.sqrt(d)
    assert_close(out, reference.attention(*to64(q, k, v)), dtype, _naive_attention(q, k, v, scale), f"{impl} kv")
    assert calls["attention"] == 2, f"{impl} did not run"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attention_misaligned_view(dtype, gpu_impl, poison):
    impl, calls = gpu_impl
    b, s, h, d = 2, 97, 3, 64
    buf = randn(b * s * h * d + 1, dtype=dtype).cuda()
    q = buf[1:].view(b, s, h, d)  # data pointer 2 or 4 bytes off any 16-byte boundary
    k = randn(b, 77, h, d, dtype=dtype).cuda()
    v = randn(b, 77, h, d, dtype=dtype).cuda()
    out = sdkern.ops.attention(q, k, v)
    if impl == "cuda":  # the CUDA C++ launcher may decline a misaligned view; then Triton ran
        assert calls["attention"] <= 1
    else:
        assert calls["attention"] == 1
    ref = reference.attention(*to64(q, k, v))
    assert_close(out, ref, dtype, _naive_attention(q, k, v, 1 / math.sqrt(d)), f"{impl} misaligned")


def test_attention_65536_batch_heads(gpu_impl):
    """B*H = 65536 (temporal attention: B = 2*64*64 frames' pixels, H = 8): over the old grid-y limit."""
    impl, calls = gpu_impl
    b, s, h, d = 8192, 16, 8, 40
    q, k, v = (randn(b, s, h, d, dtype=torch.float16).cuda() for _ in range(3))
    out = sdkern.ops.attention(q, k, v)
    assert calls["attention"] == 1, f"{impl} did not run"
    torch.cuda.synchronize()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)
    ).transpose(1, 2)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-3, f"{impl}: rel L2 {err:.2e}"
    last = slice(b - 2, b)  # the last programs of the grid, where a wrapped index would land
    assert_close(out[last], reference.attention(*to64(q[last], k[last], v[last])), torch.float16, what="tail")


# ---- 3. skip_layer_norm at the shared-memory boundary ---------------------------------------
@pytest.mark.parametrize("c", [12224, 12225, 12288])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_skip_layer_norm_smem_boundary(c, dtype, gpu_impl, poison):
    impl, calls = gpu_impl
    x, skip = randn(3, c, dtype=dtype).cuda(), randn(3, c, dtype=dtype).cuda()
    gamma, beta, bias = randn(c).cuda(), randn(c).cuda(), randn(c).cuda()
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, eps=1e-5)
    assert calls["skip_layer_norm"] == 1, f"{impl} did not run"
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), 1e-5)
    assert_close(y, ry, dtype, what=f"{impl} C={c}")
    assert_close(s, rs, dtype, what=f"{impl} C={c} s")


# ---- 4. workspace lifetime under cudaMallocAsync with a second stream allocating -------------
_ASYNC_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import sdkern.ops
    from sdkern.ops import reference
    sdkern.ops.set_cuda_impl(sys.argv[1])
    assert torch.cuda.get_allocator_backend() == "cudaMallocAsync", torch.cuda.get_allocator_backend()
    torch.manual_seed(0)
    n, c, h, w, g = 2, 640, 32, 32, 32
    xs = [torch.randn(n, c, h, w, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(4)]
    gamma, beta = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    refs = [reference.group_norm(x.double(), gamma.double(), beta.double(), g, 1e-5, True) for x in xs]
    other = torch.cuda.Stream()
    worst = 0.0
    for it in range(50):
        ys = []
        for x in xs:
            ys.append(sdkern.ops.group_norm(x, gamma, beta, g, 1e-5, True))
            with torch.cuda.stream(other):  # allocate and scribble while the norms may still be queued
                junk = torch.full((1 << 20,), float("nan"), device="cuda")
                junk.add_(1)
        torch.cuda.synchronize()
        for y, r in zip(ys, refs):
            worst = max(worst, ((y.double() - r).norm() / r.norm()).item())
    print("worst", worst)
    sys.exit(0 if worst < 1e-5 else 1)
    """
)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_workspace_cuda_malloc_async(impl):
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", _ASYNC_SCRIPT, impl], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


# ---- 5. tensors on cuda:1 while cuda:0 is current --------------------------------------------
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_second_gpu(gpu_impl, poison):
    impl, calls = gpu_impl
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    x = randn(2, 64, 8, 8).to(dev).contiguous(memory_format=torch.channels_last)
    gamma, beta = randn(64).to(dev), randn(64).to(dev)
    y = sdkern.ops.group_norm(x, gamma, beta, 8, 1e-5, False)
    q, k, v = (randn(2, 33, 2, 64, dtype=torch.float16).to(dev) for _ in range(3))
    o = sdkern.ops.attention(q, k, v)
    rx, rb, rk = randn(5, 96).to(dev), randn(96).to(dev), randn(5, 96).to(dev)
    z = sdkern.ops.bias_add(rx, rb, rk)
    yl, _ = sdkern.ops.skip_layer_norm(rx, rk, rb, rb, rb, 1e-5)
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0
    assert calls["group_norm"] == calls["attention"] == calls["bias_add"] == calls["skip_layer_norm"] == 1, impl
    assert y.device == o.device == z.device == dev
    assert_close(y, reference.group_norm(*to64(x, gamma, beta), 8, 1e-5, False), torch.float32, what=impl)
    assert_close(o, reference.attention(*to64(q, k, v)), torch.float16, _naive_attention(q, k, v, 0.125), impl)
    assert_close(z, reference.bias_add(*to64(rx, rb, rk)), torch.float32, what=impl)
    assert_close(yl, reference.skip_layer_norm(*to64(rx, rk, rb, rb, rb), 1e-5)[0], torch.float32, what=impl)


# ---- 6. old GPUs: Triton declines with a reason and the op falls back -------------------------
def test_triton_declines_below_sm80(monkeypatch, poison):
    _common = importlib.import_module("sdkern.triton._common")
    trit = importlib.import_module("sdkern.triton")
    idx = torch.cuda.current_device()
    monkeypatch.setitem(_common._CAPABILITY, idx, (7, 5))
    x = randn(1, 64, 4, 4).cuda()
    gamma, beta = randn(64).cuda(), randn(64).cuda()
    with pytest.raises(NotImplementedError, match="sm_75"):
        trit.group_norm(x, gamma, beta, 8, 1e-5, False)
    previous = sdkern.ops.cuda_impl_order()[0]
    sdkern.ops.set_cuda_impl("triton")
    try:
        y = sdkern.ops.group_norm(x, gamma, beta, 8, 1e-5, False)  # CUDA C++ or the reference
    finally:
        sdkern.ops.set_cuda_impl(previous)
    assert_close(y, reference.group_norm(*to64(x, gamma, beta), 8, 1e-5, False), torch.float32, what="fallback")
