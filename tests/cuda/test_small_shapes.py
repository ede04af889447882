"""Every op on both CUDA implementations at small and odd shapes: the compute-sanitizer target.

``benchmarks/gpu_check.sh`` runs this file under compute-sanitizer memcheck, racecheck and synccheck
(small shapes keep the instrumented run short; edge tiles, batch 1, odd channel counts, broadcast
skips and strided views are where out-of-bounds accesses and barrier bugs live). Also a plain
correctness test. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import sdkern.ops
from sdkern.ops import reference
from tests.utils import assert_close, randn, to64

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_op_small(dtype, gpu_impl, poison):
    impl, calls = gpu_impl
    cuda = lambda t: t.cuda()
    for n, c, h, w, g in ((1, 12, 3, 5, 3), (2, 32, 1, 7, 8), (3, 64, 4, 4, 32)):
        for fmt in (torch.channels_last, torch.contiguous_format):
            x = cuda(randn(n, c, h, w, dtype=dtype)).contiguous(memory_format=fmt)
            gamma, beta, bias = cuda(randn(c)), cuda(randn(c)), cuda(randn(c))
            y = sdkern.ops.group_norm(x, gamma, beta, g, 1e-5, True)
            assert_close(y, reference.group_norm(*to64(x, gamma, beta), g, 1e-5, True), dtype, what=f"gn {impl}")
            for skip in (cuda(randn(n, c, dtype=dtype)), cuda(randn(n, c, h, w, dtype=dtype))):
                y, _s = sdkern.ops.skip_group_norm(x, skip, gamma, beta, bias, g, 1e-5, False)
                ry, _ = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), g, 1e-5, False)
                assert_close(y, ry, dtype, what=f"sgn {impl}")
    for m, c in ((1, 8), (3, 40), (5, 100), (2, 1030)):
        x, skip = cuda(randn(m, c, dtype=dtype)), cuda(randn(m, c, dtype=dtype))
        gamma, beta, bias = cuda(randn(c)), cuda(randn(c)), cuda(randn(c))
        y, _ = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, 1e-5)
        assert_close(y, reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), 1e-5)[0], dtype, what="sln")
        z = sdkern.ops.bias_add(x, bias, skip)
        assert_close(z, reference.bias_add(*to64(x, bias, skip)), dtype, what="bias_add")
        if c % 2 == 0:
            z = sdkern.ops.bias_split_gelu(x, bias)
            assert_close(z, reference.bias_split_gelu(*to64(x, bias)), dtype, what="bsg")
    for b, sq, sk, h, d in ((1, 1, 1, 1, 8), (1, 17, 5, 3, 40), (2, 33, 77, 2, 64), (1, 70, 9, 1, 160)):
        q = cuda(randn(b, sq, h, d, dtype=dtype))
        kv = cuda(randn(b, sk, 2, h, d, dtype=dtype))
        o = sdkern.ops.attention(q, kv[:, :, 0], kv[:, :, 1])
        ref = reference.attention(*to64(q, kv[:, :, 0], kv[:, :, 1]))
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        err = ((o.double().cpu() - ref).norm() / ref.norm()).item()
        assert err <= tol, f"attention {impl} {(b, sq, sk, h, d)}: {err:.2e}"
    assert calls["group_norm"] and calls["skip_group_norm"] and calls["bias_add"], f"{impl} did not run: {calls}"
