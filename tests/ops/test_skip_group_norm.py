"""skip_group_norm on every implementation (cpu, triton, cuda, ort) against the float64 reference:
s = x + skip + bias, y = GroupNorm(s) (+SiLU).

As in test_group_norm.py, the CPU numeric tests call the native launcher directly so that a fallback to
the PyTorch reference cannot pass unnoticed. Each implementation keeps its own grid and baseline rule (cpu:
2x torch with the inherited error of the fp32 sum as floor; triton: 2x torch; cuda: the DESIGN.md tolerance
for fp32; ort: NHWC graphs), so the grids are separate functions.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _launch, reference
from tests.ops._harness import DTYPES, assert_close, draws, fp32_sum, impls, randn, to64

CL, NCHW = torch.channels_last, torch.contiguous_format

# The last one has N * groups = 1: NCHW then takes the per-channel-row path instead of the per-group one.
SHAPES = [
    (2, 320, 16, 16, 32),
    (2, 1280, 8, 8, 32),
    (2, 96, 5, 7, 8),
    (1, 64, 1, 1, 32),
    (2, 24, 3, 3, 24),
    (1, 40, 9, 11, 1),
]
SKIPS = ["full", "nc11", "nc"]


def native_skip_group_norm(x, skip, bias, gamma, beta, groups, eps=1e-5, silu=False):
    from sdkern import _C

    return _launch.skip_group_norm(_C, x, skip, bias, gamma, beta, groups, eps, silu)


def make_skip(kind, n, c, h, w, dtype, fmt):
    if kind == "full":
        return randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    if kind == "nc11":
        return randn(n, c, 1, 1, dtype=dtype)
    return randn(n, c, dtype=dtype)


def torch_baseline(x, skip, bias, gamma, beta, groups, eps, silu):
    """Plain PyTorch in x's dtype: (x + skip + bias) rounded, then group_norm (+silu)."""
    sk = skip if skip.dim() == 4 else skip[:, :, None, None]
    s = x + sk
    if bias is not None:
        s = s + bias.to(x.dtype)[None, :, None, None]
    y = F.group_norm(s, groups, gamma.to(x.dtype), beta.to(x.dtype), eps)
    return (F.silu(y) if silu else y), s


def outputs(x, skip, bias, gamma, beta, groups, silu, fmt, eps=1e-5, what="", baseline=True):
    """(y, ry, by, iy), (s, rs, bs): kernel, float64 reference, torch baseline (or None), inherited error."""
    y, s = native_skip_group_norm(x, skip, bias, gamma, beta, groups, eps, silu)
    ry, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), groups, eps, silu)
    by, bs = torch_baseline(x, skip, bias, gamma, beta, groups, eps, silu) if baseline else (None, None)
    # float64 GroupNorm of the fp32 sum: the error every correct kernel inherits from rounding it.
    sk = skip if skip.dim() == 4 else skip[:, :, None, None]
    iy = reference.group_norm(*to64(fp32_sum(x, sk, bias, channel_dim=1), gamma, beta), groups, eps, silu)
    for name, t in (("y", y), ("s", s)):
        assert t.is_contiguous(memory_format=fmt), f"{what}: {name} lost the memory format"
    return (y, ry, by, iy), (s, rs, bs)


def judge(runs, dtype, what):
    """The 2x rule over one or more draws' outputs taken together (tests.utils.draws)."""

    def pool(ts):
        return None if ts[0] is None else torch.cat([t.flatten() for t in ts])

    ys, ss = zip(*runs, strict=True)
    y, ry, by, iy = (pool(ts) for ts in zip(*ys, strict=True))
    s, rs, bs = (pool(ts) for ts in zip(*ss, strict=True))
    assert_close(s, rs, dtype, baseline=bs, what=f"{what} s")
    assert_close(y, ry, dtype, baseline=by, what=f"{what} y", inherent=iy)


def check(x, skip, bias, gamma, beta, groups, silu, fmt, eps=1e-5, what="", baseline=True):
    judge([outputs(x, skip, bias, gamma, beta, groups, silu, fmt, eps, what, baseline)], x.dtype, what)


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", SKIPS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_skip_group_norm(shape, kind, dtype, fmt, poison):
    n, c, h, w, groups = shape
    with_bias = (c + len(kind)) % 2 == 0 or dtype == torch.float32
    silu = kind != "nc"
    what = f"{shape} {kind} bias={with_bias} silu={silu}"
    runs = []
    for _ in range(draws(shape[:4])):  # tiny shapes: several fresh draws judged together
        x = randn(n, c, h, w, dtype=dtype, scale=1.5, shift=0.2).contiguous(memory_format=fmt)
        skip = make_skip(kind, n, c, h, w, dtype, fmt)
        bias = randn(c, dtype=dtype) if with_bias else None
        gamma, beta = randn(c, dtype=dtype, shift=1.0), randn(c, dtype=dtype)
        runs.append(outputs(x, skip, bias, gamma, beta, groups, silu, fmt, what=what))
    judge(runs, dtype, what)


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_group_norm_sd_64x64(dtype, fmt, poison):
    x = randn(2, 320, 64, 64, dtype=dtype).contiguous(memory_format=fmt)
    skip = randn(2, 320, 64, 64, dtype=dtype).contiguous(memory_format=fmt)
    bias, gamma, beta = randn(320, dtype=dtype), randn(320, dtype=dtype), randn(320, dtype=dtype)
    check(x, skip, bias, gamma, beta, 32, True, fmt, what="2x320x64x64")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skip_group_norm_fp32_params(dtype, poison):
    """gamma/beta (and bias) in fp32 with half-precision x, as ONNX Runtime keeps them."""
    x = randn(2, 320, 6, 10, dtype=dtype).contiguous(memory_format=CL)
    skip = randn(2, 320, dtype=dtype)
    bias, gamma, beta = randn(320), randn(320, shift=1.0), randn(320)
    check(x, skip, bias, gamma, beta, 32, True, CL, what="fp32 params")


@pytest.mark.parametrize("xfmt,kfmt", [(CL, NCHW), (NCHW, CL)], ids=["x_nhwc-skip_nchw", "x_nchw-skip_nhwc"])
def test_skip_group_norm_mixed_formats(xfmt, kfmt, poison):
    """skip in the other memory format than x: strided skip rows; outputs follow x."""
    x = randn(2, 64, 5, 6, dtype=torch.float16).contiguous(memory_format=xfmt)
    skip = randn(2, 64, 5, 6, dtype=torch.float16).contiguous(memory_format=kfmt)
    bias, gamma, beta = randn(64), randn(64), randn(64)
    check(x, skip, bias, gamma, beta, 16, True, xfmt, what="mixed formats")


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_skip_group_norm_large_mean(dtype, fmt, poison):
    """s around 1000 (x = 1000 + randn, skip and bias O(1)): no catastrophic cancellation in the statistics.

    The kernel normalises the fp32 sum (x + skip) + bias, whose rounding near 1000 alone is ~1e-5 of the
    O(1) spread, so y is compared with the float64 group norm of that same fp32 sum (s still against the
    exact float64 sum).
    """
    x = randn(2, 320, 20, 20, dtype=dtype, shift=1000.0).contiguous(memory_format=fmt)
    skip = randn(2, 320, 20, 20, dtype=dtype).contiguous(memory_format=fmt)
    bias, gamma, beta = randn(320, dtype=dtype), randn(320, dtype=dtype), randn(320, dtype=dtype)
    y, s = native_skip_group_norm(x, skip, bias, gamma, beta, 32, 1e-5, False)
    _, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), 32, 1e-5, False)
    s32 = (x.float() + skip.float()) + bias.float()[None, :, None, None]
    ry = reference.group_norm(*to64(s32, gamma, beta), 32, 1e-5, False)
    assert_close(s, rs, dtype, what="large mean s")
    assert_close(y, ry.to(torch.float64), dtype, what="large mean y")


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
def test_skip_group_norm_public_op(fmt, poison):
    x = randn(2, 320, 10, 10, dtype=torch.float16).contiguous(memory_format=fmt)
    skip, bias, gamma, beta = randn(2, 320, 1, 1, dtype=torch.float16), randn(320), randn(320), randn(320)
    a = sdkern.ops.skip_group_norm(x, skip, gamma, beta, bias=bias, groups=32, eps=1e-5, silu=True)
    b = torch.ops.sdkern.skip_group_norm(x, skip, bias, gamma, beta, 32, 1e-5, True)
    c = native_skip_group_norm(x, skip, bias, gamma, beta, 32, 1e-5, True)
    for u, v, w in zip(a, b, c, strict=True):
        assert torch.equal(u, w) and torch.equal(v, w)
        assert u.is_contiguous(memory_format=fmt)


def test_skip_group_norm_every_isa(poison):
    from sdkern import _C

    active = _C.cpu_isa()
    try:
        for fmt in (CL, NCHW):
            for dtype in DTYPES:
                x = randn(2, 160, 7, 9, dtype=dtype).contiguous(memory_format=fmt)
                skip = randn(2, 160, 7, 9, dtype=dtype).contiguous(memory_format=fmt)
                bias, gamma, beta = randn(160, dtype=dtype), randn(160), randn(160)
                ry, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), 32, 1e-5, True)
                for isa in _C.build_info()["isa_built"]:
                    if _C.set_cpu_isa(isa):
                        y, s = native_skip_group_norm(x, skip, bias, gamma, beta, 32, 1e-5, True)
                        assert_close(s, rs, dtype, what=f"isa {isa} {dtype} s")
                        assert_close(y, ry, dtype, what=f"isa {isa} {dtype} y")
    finally:
        _C.set_cpu_isa(active)


def test_skip_group_norm_bad_inputs():
    x = randn(2, 64, 4, 4)
    g, b = randn(64), randn(64)
    with pytest.raises(ValueError, match="skip"):
        sdkern.ops.skip_group_norm(x, randn(2, 64, 4, 3), g, b, groups=8)
    with pytest.raises(ValueError, match="skip"):
        sdkern.ops.skip_group_norm(x, randn(2, 63), g, b, groups=8)
    with pytest.raises(TypeError, match="skip"):
        sdkern.ops.skip_group_norm(x, x.half(), g, b, groups=8)
    with pytest.raises(ValueError, match="bias"):
        sdkern.ops.skip_group_norm(x, x, g, b, bias=randn(32), groups=8)
    with pytest.raises(ValueError, match="groups"):
        sdkern.ops.skip_group_norm(x, x, g, b, groups=5)
    with pytest.raises(ValueError, match="gamma"):
        sdkern.ops.skip_group_norm(x, x, randn(32), b, groups=8)


def test_skip_group_norm_native_validates():
    """A direct _C call without skip, or with negative strides, raises instead of crashing."""
    from sdkern import _C

    x, g, b = randn(2, 64, 4, 4), randn(64), randn(64)
    y, s = torch.empty_like(x), torch.empty_like(x)
    head = [x.data_ptr()]
    rest = [0, g.data_ptr(), b.data_ptr(), y.data_ptr(), s.data_ptr(), 2, 64, 16, 8, 1e-5, False, 1024, 16, 1]
    with pytest.raises(ValueError, match="skip"):
        _C.skip_group_norm(*head, 0, *rest, 1024, 16, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="skip"):
        _C.skip_group_norm(*head, x.data_ptr(), *rest, -1024, 16, 1, 0, 0, 0)


# ---------------------------------------------------------------------------------------------- triton


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("skip_kind", ["full", "nc11", "nc"])
def test_skip_group_norm_triton(impl, skip_kind, fmt, dtype, poison):
    n, c, h, w, groups = (2, 640, 5, 6, 32) if skip_kind != "full" else (1, 320, 9, 7, 32)
    x = impl.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    skip = {
        "full": lambda: impl.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt),
        "nc11": lambda: impl.randn(n, c, 1, 1, dtype=dtype),
        "nc": lambda: impl.randn(n, c, dtype=dtype),
    }[skip_kind]()
    bias = impl.randn(c, dtype=dtype) if skip_kind != "nc11" else None
    g, b = impl.randn(c, dtype=dtype), impl.randn(c, dtype=dtype)
    y, s = impl.run("skip_group_norm", x, skip, bias, g, b, groups, 1e-5, True)
    y_ref, s_ref = reference.skip_group_norm(*to64(x, skip, bias, g, b), groups, 1e-5, True)
    want = CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else NCHW
    assert y.is_contiguous(memory_format=want) and s.is_contiguous(memory_format=want)
    sk = skip[:, :, None, None] if skip.dim() == 2 else skip
    s_torch = x + sk + (bias[None, :, None, None] if bias is not None else 0)
    y_torch = F.silu(F.group_norm(s_torch, groups, g, b, 1e-5))
    assert_close(s, s_ref, dtype, baseline=s_torch, what="s")
    assert_close(y, y_ref, dtype, baseline=y_torch, what="y")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_skip_group_norm_large_mean_fp32_bias_triton(impl, poison):
    # Offset data: a naive E[x^2]-E[x]^2 would lose the variance; fp32 bias with fp16 x; pixels split.
    x = impl.randn(1, 40, 17, 13, dtype=torch.float16, shift=300.0).contiguous(memory_format=CL)
    skip, bias = impl.randn(1, 40, dtype=torch.float16), impl.randn(40)
    g, b = impl.randn(40), impl.randn(40)
    y, s = impl.run("skip_group_norm", x, skip, bias, g, b, 4, 1e-5, False)
    y_ref, s_ref = reference.skip_group_norm(*to64(x, skip, bias, g, b), 4, 1e-5, False)
    assert_close(s, s_ref, torch.float16, what="s")
    assert_close(y, y_ref, torch.float16, what="y")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_skip_group_norm_validates_triton(impl):
    x = impl.randn(1, 30, 2, 2)
    with pytest.raises(ValueError, match="skip"):
        impl.module.skip_group_norm(x, impl.randn(1, 30, 2), None, randn(30), randn(30), 3, 1e-5, False)


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
def test_skip_group_norm_wide_offsets_variant_triton(impl, fmt, monkeypatch, poison):
    """The 64-bit channel-offset variant (taken for C * P >= 2**31, issue 19) computes the same result.

    The threshold is lowered so small tensors take it; batch 1 and (1, C) skips (Triton specialises 1).
    """
    gn = importlib.import_module("sdkern.triton.group_norm")
    monkeypatch.setattr(gn, "WIDE_OFFSETS", 0)
    n, c, h, w, groups = 1, 64, 5, 3, 8
    x = impl.randn(n, c, h, w, dtype=torch.float16, shift=1.0).contiguous(memory_format=fmt)
    skip, bias = impl.randn(n, c, dtype=torch.float16), impl.randn(c)
    g, b = impl.randn(c), impl.randn(c)
    y, s = impl.run("skip_group_norm", x, skip, bias, g, b, groups, 1e-5, False)
    ry, rs = reference.skip_group_norm(*to64(x, skip, bias, g, b), groups, 1e-5, False)
    assert_close(s, rs, torch.float16, what="wide sgn s")
    assert_close(y, ry, torch.float16, what="wide sgn y")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_skip_group_norm_parameter_views_triton(impl, poison):
    """Strided / stride-0 gamma, beta and bias views read as the values they show (issue 19 item 1)."""
    n, c, h, w, groups = 2, 64, 3, 5, 8
    x = impl.randn(n, c, h, w).contiguous(memory_format=CL)
    g = impl.randn(2 * c)[::2]
    b = torch.tensor([0.25], device=impl.device).expand(c)
    bias = impl.randn(c, 3)[:, 1]
    skip = impl.randn(n, c)
    y, _ = impl.run("skip_group_norm", x, skip, bias, g, b, groups, 1e-5, False)
    ry, _ = reference.skip_group_norm(*to64(x, skip, bias, g, b), groups, 1e-5, False)
    assert_close(y, ry, torch.float32, what="views skip")


# ------------------------------------------------------------------------------------------------ cuda
# (N, C, H, W, groups): C/groups = 10, 20, 40 at SD sizes, then odd ones (the group_norm CUDA shapes but
# (1, 320, 128, 128)).
CUDA_SHAPES = [
    (2, 320, 64, 64, 32),
    (2, 640, 32, 32, 32),
    (2, 1280, 8, 8, 32),
    (3, 12, 5, 7, 3),
    (1, 6, 1, 1, 2),
    (2, 24, 9, 1, 4),
]


def cuda_baseline(s, gamma, beta, groups: int, silu: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """torch's GroupNorm of the fp32 sum, rounded to ``dtype`` (tightens the fp16/bf16 bound). None for fp32:
    the DESIGN.md fp32 tolerance applies (2x-of-torch would only measure summation order)."""
    if dtype == torch.float32:
        return None
    y = F.group_norm(s, groups, gamma.to(s.dtype), beta.to(s.dtype), 1e-5)
    return (F.silu(y) if silu else y).to(dtype)


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
@pytest.mark.parametrize("skip_kind", SKIPS)
@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_skip_group_norm_cuda(impl, shape, dtype, fmt, skip_kind, poison):
    n, c, h, w, groups = shape
    silu = skip_kind != "nc"
    x = impl.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    if skip_kind == "full":
        skip = impl.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    elif skip_kind == "nc11":
        skip = impl.randn(n, c, 1, 1, dtype=dtype)
    else:
        skip = impl.randn(n, c, dtype=dtype)
    bias = impl.randn(c, dtype=dtype) if skip_kind != "nc11" else None
    gamma, beta = impl.randn(c), impl.randn(c)
    y, s = impl.run("skip_group_norm", x, skip, bias, gamma, beta, groups, 1e-5, silu)
    ry, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), groups, 1e-5, silu)
    sk = skip[:, :, None, None] if skip.dim() == 2 else skip
    sb = x + sk + (bias[None, :, None, None] if bias is not None else 0)
    assert_close(s, rs, dtype, baseline=sb, what=f"s{shape}")
    assert_close(y, ry, dtype, baseline=cuda_baseline(sb.float(), gamma, beta, groups, silu, dtype), what=f"y{shape}")


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
def test_skip_group_norm_mixed_layouts_cuda(impl, poison):
    # x channels-last, skip NCHW: vector kernels with element-wise skip reads
    x = impl.randn(2, 640, 16, 16, dtype=torch.float16).contiguous(memory_format=CL)
    skip = impl.randn(2, 640, 16, 16, dtype=torch.float16).contiguous(memory_format=NCHW)
    bias, gamma, beta = impl.randn(640), impl.randn(640), impl.randn(640)
    y, s = impl.run("skip_group_norm", x, skip, bias, gamma, beta, 32, 1e-5, False)
    ry, rs = reference.skip_group_norm(*to64(x, skip, bias, gamma, beta), 32, 1e-5, False)
    assert_close(y, ry, torch.float16, what="y")
    assert_close(s, rs, torch.float16, what="s")
