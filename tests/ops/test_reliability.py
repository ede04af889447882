"""Regression tests for the defects of issue 19 in the torch ops (CPU): each failed before its fix.

- item 1: strided / stride-0 parameter vectors were read as if contiguous (garbage or SIGSEGV);
- item 2: attention scratch allocated inside the OpenMP region (bad_alloc -> terminate, SIGABRT);
- item 3: SIMD attention turned NaN/Inf into finite values on AVX2/AVX-512;
- item 10: overlapping rows of x refused without the ``sdkern.`` prefix, None tensors -> AttributeError,
  ``reference.group_norm`` failing for N = 0;
- item 11: the attention scratch only grew (+256 MiB kept after one Sk = 2**19 call).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sdkern.ops
from sdkern.ops import reference
from tests.utils import randn, to64

ROOT = Path(__file__).resolve().parents[2]
SANITIZED = os.environ.get("SDKERN_SANITIZE") == "1"  # ASan reserves terabytes of address space


def _strided_vectors(c: int) -> dict[str, torch.Tensor]:
    """[C] vectors that are not contiguous: stride 2, stride 0 (expanded), and a reversed-order copy view."""
    return {
        "stride2": randn(2 * c)[::2],
        "stride0": randn(1).expand(c),
        "offset_stride3": randn(3 * c + 1)[1::3],
    }


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert out.shape == ref.shape
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"rel L2 error {err:.3e}"


# ---------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("kind", ["stride2", "stride0", "offset_stride3"])
@pytest.mark.parametrize("which", ["gamma", "beta"])
@pytest.mark.parametrize("nhwc", [False, True])
def test_group_norm_noncontiguous_params(kind, which, nhwc, poison):
    x = randn(2, 64, 5, 7)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    p = {"gamma": randn(64), "beta": randn(64)}
    p[which] = _strided_vectors(64)[kind]
    out = sdkern.ops.group_norm(x, p["gamma"], p["beta"], 8, 1e-5, silu=True)
    _close(out, reference.group_norm(*to64(x, p["gamma"], p["beta"]), 8, 1e-5, True))


@pytest.mark.parametrize("kind", ["stride2", "stride0", "offset_stride3"])
@pytest.mark.parametrize("which", ["gamma", "beta", "bias"])
def test_skip_group_norm_noncontiguous_params(kind, which, poison):
    x, skip = randn(2, 32, 4, 4), randn(2, 32)
    p = {"gamma": randn(32), "beta": randn(32), "bias": randn(32)}
    p[which] = _strided_vectors(32)[kind]
    y, s = torch.ops.sdkern.skip_group_norm(x, skip, p["bias"], p["gamma"], p["beta"], 4, 1e-5, False)
    ry, rs = reference.skip_group_norm(*to64(x, skip, p["bias"], p["gamma"], p["beta"]), 4, 1e-5, False)
    _close(y, ry)
    _close(s, rs)


@pytest.mark.parametrize("kind", ["stride2", "stride0", "offset_stride3"])
@pytest.mark.parametrize("which", ["gamma", "beta", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_skip_layer_norm_noncontiguous_params(kind, which, dtype, poison):
    x, skip = randn(3, 5, 96, dtype=dtype), randn(3, 5, 96, dtype=dtype)
    p = {"gamma": randn(96), "beta": randn(96), "bias": randn(96)}
    p[which] = _strided_vectors(96)[kind]
    y, s = sdkern.ops.skip_layer_norm(x, skip, p["gamma"], p["beta"], p["bias"], 1e-5)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, p["gamma"], p["beta"], p["bias"]), 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    _close(y, ry, tol)
    _close(s, rs, tol)


@pytest.mark.parametrize("kind", ["stride2", "stride0", "offset_stride3"])
def test_bias_add_noncontiguous_bias(kind, poison):
    x, skip = randn(4, 64), randn(4, 64)
    bias = _strided_vectors(64)[kind]
    _close(sdkern.ops.bias_add(x, bias, skip), reference.bias_add(*to64(x, bias, skip)))


def test_bias_add_issue_reproducers(poison):
    x = torch.randn(4, 64)
    out = torch.ops.sdkern.bias_add(x, torch.tensor([1.0]).expand(64), x)
    torch.testing.assert_close(out, x + 1.0 + x)
    b = torch.randn(128)[::2]
    torch.testing.assert_close(torch.ops.sdkern.bias_add(x, b, x), x + b + x)


@pytest.mark.parametrize("kind", ["stride2", "stride0", "offset_stride3"])
def test_bias_split_gelu_noncontiguous_bias(kind, poison):
    x = randn(3, 7, 128)
    bias = _strided_vectors(128)[kind]
    _close(sdkern.ops.bias_split_gelu(x, bias), reference.bias_split_gelu(*to64(x, bias)))


# --------------------------------------------------------------------------------------------- item 10
def test_overlapping_rows_accepted(poison):
    row = randn(1, 64)
    xe = row.expand(5, 64)  # stride-0 rows (the reference handles them)
    skip, bias, g = randn(5, 64), randn(64), randn(64)
    _close(sdkern.ops.bias_add(xe, bias, skip), reference.bias_add(*to64(xe, bias, skip)))
    _close(sdkern.ops.bias_add(skip, bias, xe), reference.bias_add(*to64(skip, bias, xe)))
    y, s = sdkern.ops.skip_layer_norm(xe, skip, g, None, bias, 1e-5)
    ry, rs = reference.skip_layer_norm(*to64(xe, skip, g), None, to64(bias)[0], 1e-5)
    _close(y, ry)
    _close(s, rs)
    # overlapping (not just repeated) rows: row stride 32 < C = 64
    xo = randn(32 * 6 + 64).as_strided((6, 64), (32, 1))
    _close(sdkern.ops.bias_split_gelu(xo, bias), reference.bias_split_gelu(*to64(xo, bias)))
    skip6 = randn(6, 64)
    _close(sdkern.ops.bias_add(xo, bias, skip6), reference.bias_add(*to64(xo, bias, skip6)))


def test_native_errors_have_the_prefix():
    from sdkern import _C

    x = randn(4, 64)
    with pytest.raises(ValueError, match=r"^sdkern\.bias_add: "):
        _C.bias_add(x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), 4, 64, 0, 64, 0, 0)


_TENSOR_ARGS = {
    "group_norm": (lambda: [randn(1, 4, 2, 2), randn(4), randn(4), 2, 1e-5, False], {0: "x", 1: "gamma", 2: "beta"}),
    "skip_group_norm": (
        lambda: [randn(1, 4, 2, 2), randn(1, 4, 2, 2), randn(4), randn(4), randn(4), 2, 1e-5, False],
        {0: "x", 1: "skip", 3: "gamma", 4: "beta"},
    ),
    "bias_split_gelu": (lambda: [randn(2, 8), randn(8)], {0: "x", 1: "bias"}),
    "skip_layer_norm": (
        lambda: [randn(2, 8), randn(2, 8), randn(8), randn(8), randn(8), 1e-5],
        {0: "x", 2: "gamma"},  # skip=None is a plain LayerNorm (test below)
    ),
    "bias_add": (lambda: [randn(2, 8), randn(8), randn(2, 8)], {0: "x", 1: "bias", 2: "skip"}),
    "attention": (
        lambda: [randn(1, 3, 2, 8), randn(1, 5, 2, 8), randn(1, 5, 2, 8), None],
        {0: "q", 1: "k", 2: "v"},
    ),
}


@pytest.mark.parametrize("op", list(_TENSOR_ARGS))
def test_none_tensor_argument_is_a_type_error(op):
    make, names = _TENSOR_ARGS[op]
    fn = getattr(torch.ops.sdkern, op)
    for i, name in names.items():
        args = make()
        args[i] = None
        with pytest.raises(TypeError, match=rf"^sdkern\.{op}: {name} must be a tensor"):
            fn(*args)


def test_none_optional_arguments_still_accepted(poison):
    x, skip, g = randn(2, 8), randn(2, 8), randn(8)
    y, _ = torch.ops.sdkern.skip_layer_norm(x, skip, g, None, None, 1e-5)
    ry, _ = reference.skip_layer_norm(*to64(x, skip, g), None, None, 1e-5)
    _close(y, ry)
    y, _ = torch.ops.sdkern.skip_layer_norm(x, None, g, None, None, 1e-5)  # no skip: a plain LayerNorm
    _close(y, torch.nn.functional.layer_norm(x.double(), (8,), g.double(), None, 1e-5))


@pytest.mark.parametrize("n", [0])
def test_reference_group_norms_empty_batch(n):
    x = torch.randn(n, 8, 3, 3)
    assert reference.group_norm(x, torch.ones(8), torch.zeros(8), 4, 1e-5, True).shape == x.shape
    y, s = reference.skip_group_norm(x, torch.randn(n, 8), None, torch.ones(8), torch.zeros(8), 4, 1e-5, False)
    assert y.shape == s.shape == x.shape


# ---------------------------------------------------------------------------------------------- item 3
def _isas() -> list[str]:
    from sdkern import _C

    return list(_C.build_info()["isa_built"])


def _attention_specials() -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, float | None]]:
    nan, inf = float("nan"), float("inf")
    cases = []
    q, k, v = randn(1, 70, 2, 64), randn(1, 150, 2, 64), randn(1, 150, 2, 64)
    q1 = q.clone()
    q1[0, 3, 1, 5] = nan
    cases.append(("nan in q", q1, k, v, None))
    k1 = k.clone()
    k1[0, 140, 0, 7] = nan
    cases.append(("nan in k", q, k1, v, None))
    k2 = k.clone()
    k2[0, 9, 1, :] = inf
    cases.append(("+inf in k", q, k2, v, None))
    cases.append(("all keys -inf", q, torch.full_like(k, -inf), v, None))
    v1 = v.clone()
    v1[0, 20, 0, 3] = nan
    cases.append(("nan in v", q, k, v1, None))
    cases.append(("scale inf", q, k, v, inf))
    cases.append(("scale 1e300", q, k, v, 1e300))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_nan_inf_propagate_on_every_isa(dtype):
    from sdkern import _C

    active = _C.cpu_isa()
    try:
        for what, q, k, v, scale in _attention_specials():
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            ref = reference.attention(q.float(), k.float(), v.float(), scale)  # fp32 arithmetic, like the op
            for isa in _isas():
                if not _C.set_cpu_isa(isa):
                    continue
                out = torch.ops.sdkern.attention(q, k, v, scale).float()
                assert torch.equal(out.isnan(), ref.isnan()), f"{what} on {isa}: NaN pattern differs"
                assert ref.isnan().any(), f"{what}: the case should produce NaN"
    finally:
        _C.set_cpu_isa(active)


# ------------------------------------------------------------------------------------------ items 2, 11
def _run(code: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True, timeout=timeout
    )


_VM = """
def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
def rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
"""


@pytest.mark.skipif(SANITIZED or not sys.platform.startswith("linux"), reason="needs RLIMIT_AS (not under ASan)")
def test_attention_allocation_failure_is_an_error_not_an_abort():
    # Issue reproducer shape: q (1,1,1,64), k = v expanded along Sk; 2**20 keys need 512 MiB of
    # per-thread scratch, the address-space limit leaves 200 MiB.
    proc = _run(
        _VM
        + textwrap.dedent("""
        import resource
        import torch
        import sdkern.ops
        q = torch.randn(1, 1, 1, 64)
        k = torch.randn(1, 1, 1, 64).expand(1, 2**20, 1, 64)
        torch.ops.sdkern.attention(q, k[:, :1000], k[:, :1000], None)  # threads and small scratch exist
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (200 << 20), resource.RLIM_INFINITY))
        try:
            torch.ops.sdkern.attention(q, k, k, None)
            print("RESULT ok")
        except (RuntimeError, MemoryError) as e:
            print("RESULT error", type(e).__name__, e)
        """),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, f"process died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "RESULT error" in proc.stdout and "out of memory" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_attention_scratch_limit_falls_back(poison):
    proc = _run(
        """
        import torch
        import sdkern.ops
        from sdkern import _C
        from sdkern.ops import reference
        q, k, v = torch.randn(1, 9, 2, 64), torch.randn(1, 5000, 2, 64), torch.randn(1, 5000, 2, 64)
        try:  # 5000 keys * (64 + 64) * 4 B = 2.4 MiB > the 1 MiB limit
            _C.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.data_ptr(), 1, 9, 5000, 2, 64, 64,
                         *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], 0.125, False, 0)
            print("native ran")
        except NotImplementedError as e:
            print("native refused:", e)
        out = torch.ops.sdkern.attention(q, k, v, None)
        ref = reference.attention(q.double(), k.double(), v.double())
        print("fallback err", ((out.double() - ref).norm() / ref.norm()).item())
        """,
        env={"SDKERN_ATTENTION_SCRATCH_MB": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "native refused: sdkern.attention:" in proc.stdout and "SDKERN_ATTENTION_SCRATCH_MB" in proc.stdout
    err = float(proc.stdout.split("fallback err")[1])
    assert err < 1e-5


@pytest.mark.skipif(SANITIZED or not sys.platform.startswith("linux"), reason="RSS measurement (not under ASan)")
def test_attention_large_scratch_is_released():
    proc = _run(
        _VM
        + textwrap.dedent("""
        import gc
        import torch
        import sdkern.ops
        q = torch.randn(1, 1, 1, 64)
        k = torch.randn(1, 1, 1, 64).expand(1, 2**19, 1, 64)  # 2**19 keys: 256 MiB of scratch
        torch.ops.sdkern.attention(q, k[:, :100], k[:, :100], None)
        gc.collect()
        before = rss_bytes()
        torch.ops.sdkern.attention(q, k, k, None)
        gc.collect()
        print("KEPT_MIB", (rss_bytes() - before) / 2**20)
        """),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = float(proc.stdout.split("KEPT_MIB")[1])
    assert kept < 64, f"{kept:.0f} MiB kept after one Sk=2**19 call"
