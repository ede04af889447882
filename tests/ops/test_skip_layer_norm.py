"""skip_layer_norm on every implementation (cpu, triton, cuda, ort) against the float64 reference, including
the native-only mean / inv_std outputs (ONNX Runtime's optional outputs) through sdkern._C and the ORT op.

The main grids keep each implementation's own baseline rule (cpu: 2x torch with the inherited error of the
fp32 sum as floor; triton: 2x torch; cuda: 2x torch computed in fp32 for fp16/bf16, the DESIGN.md tolerance
for fp32), so they are separate functions; the plain LayerNorm (skip=None) is one function over all three.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _dispatch, reference
from tests.ops._harness import DTYPES, assert_close, cases, draws, fp32_sum, grid, impls, randn, to64

# SD transformer widths (tokens x C) and odd ones: M = 35 rows of 96, C = 3, a single row, and C = 4500
# (longer than the kernel's row buffer: the recompute path).
SHAPES = [
    (2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 77, 768), (2, 77, 1024),
    (35, 96), (3, 7, 3), (1, 1, 5), (3, 4500),
]  # fmt: skip
EPS = 1e-5


@pytest.fixture(autouse=True)
def _native_only(monkeypatch):
    """Fail instead of silently falling back to the PyTorch reference: these tests are for the kernels."""

    def fail(key, msg, *args, **kwargs):
        raise AssertionError("sdkern fell back: " + msg % args)

    monkeypatch.setattr(_dispatch, "log_once", fail)


def _torch_same_dtype(x, skip, gamma, beta, bias):
    s = x + skip
    if bias is not None:
        s = s + bias.to(x.dtype)
    b = beta.to(x.dtype) if beta is not None else None
    return F.layer_norm(s, (s.shape[-1],), gamma.to(x.dtype), b, EPS), s


def _results(x, skip, gamma, beta, bias):
    """(kernel, float64 reference, torch same-dtype, inherited) outputs y, and (kernel, reference, torch) sums s."""
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, EPS)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), EPS)
    by, bs = _torch_same_dtype(x, skip, gamma, beta, bias)
    # float64 LayerNorm of the fp32 sum (x + skip) + bias the kernel normalises: its inherited error.
    v = fp32_sum(x, skip, bias)
    iy, _ = reference.skip_layer_norm(*to64(v, torch.zeros_like(v), gamma, beta, None), EPS)
    return (y, ry, by, iy), (s, rs, bs)


def _assert(runs, dtype, what):
    """The 2x rule over one or more runs' outputs taken together (see :func:`draws`)."""
    ys, ss = zip(*runs, strict=True)
    y, ry, by, iy = (torch.cat([t.flatten() for t in ts]) for ts in zip(*ys, strict=True))
    s, rs, bs = (torch.cat([t.flatten() for t in ts]) for ts in zip(*ss, strict=True))
    assert_close(y, ry, dtype, baseline=by, what=f"{what} y", inherent=iy)
    assert_close(s, rs, dtype, baseline=bs, what=f"{what} s")


def _check(x, skip, gamma, beta, bias, dtype, what):
    _assert([_results(x, skip, gamma, beta, bias)], dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_skip_layer_norm(shape, dtype, poison):
    c = shape[-1]
    runs = []
    for _ in range(draws(shape)):  # tiny shapes: several fresh draws judged together
        x, skip = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
        gamma, beta, bias = randn(c, dtype=dtype), randn(c, dtype=dtype), randn(c, dtype=dtype)
        runs.append(_results(x, skip, gamma, beta, bias))
    _assert(runs, dtype, f"skip_layer_norm{shape}")


@pytest.mark.parametrize("with_beta", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optional_params(with_beta, with_bias, dtype, poison):
    x, skip = randn(3, 21, 640, dtype=dtype), randn(3, 21, 640, dtype=dtype)
    gamma = randn(640, dtype=dtype)
    beta = randn(640, dtype=dtype) if with_beta else None
    bias = randn(640, dtype=dtype) if with_bias else None
    _check(x, skip, gamma, beta, bias, dtype, f"beta={with_beta} bias={with_bias}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_params(dtype, poison):
    x, skip = randn(2, 33, 768, dtype=dtype), randn(2, 33, 768, dtype=dtype)
    gamma, beta, bias = randn(768), randn(768), randn(768)
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, EPS)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), EPS)
    assert_close(y, ry, dtype, what="fp32 params y")
    assert_close(s, rs, dtype, what="fp32 params s")


def test_strided_rows(poison):
    xb, kb = randn(2, 50, 1000), randn(2, 50, 700)
    x, skip = xb[:, :, 17:337], kb[:, :, 300:620]  # rows 1000 / 700 apart, last dim contiguous
    gamma, beta, bias = randn(320), randn(320), randn(320)
    y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, EPS)
    assert y.is_contiguous() and s.is_contiguous()
    _check(x, skip, gamma, beta, bias, torch.float32, "strided rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_mean(dtype, poison):
    """Rows with a large mean and std ~1: a one-pass E[s^2] - E[s]^2 variance would lose everything.

    The inputs are quantised so that s = x + skip is exact in fp32 (as the op's semantics round s to
    fp32, an inexact s would put the rounding of s itself, not the kernel, into the comparison).
    """
    mean, q = (1000.0, 1024.0) if dtype == torch.float32 else (96.0, 2.0)
    x = (torch.randn(4, 64, 640, dtype=torch.float64) * q).round() / q + mean
    skip = (torch.randn(4, 64, 640, dtype=torch.float64) * 0.5 * q).round() / q
    x, skip = x.to(dtype), skip.to(dtype)
    assert torch.equal(x.double() + skip.double(), (x.float() + skip.float()).double())
    gamma, beta = randn(640), randn(640)
    y, _ = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, None, EPS)
    ry, _ = reference.skip_layer_norm(*to64(x, skip, gamma, beta, None), EPS)
    assert_close(y, ry, dtype, what="large mean")


def test_every_isa(poison):
    from sdkern import _C

    x, skip = randn(3, 17, 1280, dtype=torch.float16), randn(3, 17, 1280, dtype=torch.float16)
    gamma, beta, bias = randn(1280), randn(1280), randn(1280)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), EPS)
    active = _C.cpu_isa()
    ran = []
    try:
        for isa in _C.build_info()["isa_built"]:
            if _C.set_cpu_isa(isa):
                ran.append(isa)
                y, s = sdkern.ops.skip_layer_norm(x, skip, gamma, beta, bias, EPS)
                assert_close(y, ry, torch.float16, what=f"isa {isa} y")
                assert_close(s, rs, torch.float16, what=f"isa {isa} s")
    finally:
        _C.set_cpu_isa(active)
    assert "baseline" in ran


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_mean_inv_std(dtype, poison):
    """sdkern._C.skip_layer_norm with the optional fp32 mean / inv_std outputs, no s, beta or bias."""
    from sdkern import _C

    m, c = 37, 320
    x, skip = randn(m, c, dtype=dtype, shift=3.0), randn(m, c, dtype=dtype, scale=2.0)
    gamma = randn(c, dtype=dtype)
    y = torch.empty(m, c, dtype=dtype)
    mean, inv_std = torch.empty(m), torch.empty(m)
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    _C.skip_layer_norm(
        x.data_ptr(), skip.data_ptr(), gamma.data_ptr(), 0, 0, y.data_ptr(), 0, m, c, c, c, EPS, code, code,
        mean=mean.data_ptr(), inv_std=inv_std.data_ptr(),
    )  # fmt: skip
    x64, k64, g64 = to64(x, skip, gamma)
    s64 = x64 + k64
    mu = s64.mean(-1)
    var = (s64 - mu[:, None]).square().mean(-1)
    istd = (var + EPS).rsqrt()
    assert_close(mean, mu, torch.float32, what="mean")
    assert_close(inv_std, istd, torch.float32, what="inv_std")
    ry, _ = reference.skip_layer_norm(x64, k64, g64, None, None, EPS)
    assert_close(y, ry, dtype, what="y without s")


def test_bad_inputs():
    x = randn(2, 8, 16)
    g = randn(16)
    with pytest.raises(ValueError, match="gamma"):
        sdkern.ops.skip_layer_norm(x, x, randn(15), None, None, EPS)
    with pytest.raises(ValueError, match="beta"):
        sdkern.ops.skip_layer_norm(x, x, g, randn(8), None, EPS)
    with pytest.raises(ValueError, match="bias"):
        sdkern.ops.skip_layer_norm(x, x, g, None, randn(17), EPS)
    with pytest.raises(ValueError, match="skip"):
        sdkern.ops.skip_layer_norm(x, randn(2, 8, 15), g, None, None, EPS)
    with pytest.raises(TypeError, match="skip"):
        sdkern.ops.skip_layer_norm(x, x.half(), g, None, None, EPS)
    with pytest.raises(TypeError, match="gamma"):
        sdkern.ops.skip_layer_norm(x.half(), x.half(), g.bfloat16(), None, None, EPS)
    with pytest.raises(ValueError, match="eps"):
        sdkern.ops.skip_layer_norm(x, x, g, None, None, -1.0)
    with pytest.raises(ValueError, match="contiguous"):
        sdkern.ops.skip_layer_norm(randn(16, 8).t(), randn(8, 16), g, None, None, EPS)


def test_native_rejects_bad_sizes():
    from sdkern import _C

    x, g, y = randn(4, 16), randn(16), randn(4, 16)
    args = [x.data_ptr(), x.data_ptr(), g.data_ptr(), 0, 0, y.data_ptr(), 0, 4, 16]
    with pytest.raises(ValueError, match="stride"):
        _C.skip_layer_norm(*args, 8, 16, EPS, 0, 0)
    with pytest.raises(ValueError, match="eps"):
        _C.skip_layer_norm(*args, 16, 16, -1.0, 0, 0)
    with pytest.raises(ValueError, match="null"):
        _C.skip_layer_norm(0, *args[1:], 16, 16, EPS, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.skip_layer_norm(*args, 16, 16, EPS, 0, 5)


# ---------------------------------------------------------------------------------------------
# skip=None: a plain LayerNorm (CLIP layer_norm1 / final_layer_norm, the transformer blocks' norm1)
# CLIP widths: SD 1.x (768), SDXL text_encoder_2 (1280); odd ones and the recompute path (C > the
# kernel's row buffer). (A U-Net block's norm1 width, 640, is in test_layer_norm_no_skip_variants.)
PLAIN_SHAPES = [(2, 77, 768), (2, 77, 1280), (35, 96), (1, 1, 5), (3, 4500)]


# triton: few rows (every row is its own program in the interpreter); cuda: vector, scalar and uncached-row kernels.
TRITON_PLAIN_SHAPES = [(1, 9, 768), (1, 5, 1280), (3, 7, 100)]
CUDA_PLAIN_SHAPES = [(2, 77, 768), (2, 77, 1280), (3, 7, 100), (2, 20000)]


@pytest.mark.parametrize(
    "impl,shape,dtype,shift",
    cases(
        cpu=grid(PLAIN_SHAPES, DTYPES, [0.5]),
        triton=grid(TRITON_PLAIN_SHAPES, DTYPES, [0.5]),
        cuda=grid(CUDA_PLAIN_SHAPES, DTYPES, [0.0]),
    ),
    indirect=["impl"],
)
def test_layer_norm_no_skip(impl, shape, dtype, shift, poison):
    c = shape[-1]
    ys, rys, bys = [], [], []
    for _ in range(draws(shape)):  # tiny shapes: several fresh draws judged together
        x = impl.randn(*shape, dtype=dtype, shift=shift)
        gamma, beta = impl.randn(c, dtype=dtype), impl.randn(c, dtype=dtype)
        y, s = impl.run("skip_layer_norm", x, None, gamma, beta, None, EPS)
        ry, _ = reference.skip_layer_norm(*to64(x, None, gamma, beta, None), EPS)
        torch.testing.assert_close(ry, F.layer_norm(*to64(x), (c,), *to64(gamma, beta), EPS), rtol=1e-12, atol=1e-12)
        assert torch.equal(s, x)  # s = x without skip and bias
        ys.append(y.flatten()), rys.append(ry.flatten()), bys.append(F.layer_norm(x, (c,), gamma, beta, EPS).flatten())
    y, ry, by = torch.cat(ys), torch.cat(rys), torch.cat(bys)
    assert_close(y, ry, dtype, baseline=by, what=f"layer_norm{shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_no_skip_variants(dtype, poison):
    """fp32 params on half input, no beta, a bias, strided rows (a view of a wider tensor)."""
    base = randn(3, 21, 700, dtype=dtype)
    x = base[..., 30:670]
    gamma, bias = randn(640), randn(640)
    y, s = sdkern.ops.skip_layer_norm(x, None, gamma, None, bias, EPS)
    ry, rs = reference.skip_layer_norm(*to64(x, None, gamma, None, bias), EPS)
    assert_close(y, ry, dtype, what="layer_norm strided, bias, no beta")
    assert_close(s, rs, dtype, what="s = x + bias")


def test_layer_norm_no_skip_checks():
    x = randn(2, 8, 16)
    with pytest.raises(ValueError, match="gamma"):
        sdkern.ops.skip_layer_norm(x, None, randn(15), None, None, EPS)
    y, _ = sdkern.ops.skip_layer_norm(x[:, :0], None, randn(16), None, None, EPS)
    assert y.shape == (2, 0, 16)


# ---------------------------------------------------------------------------------------------- triton


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "beta", "bias"),
    [((2, 33, 320), True, True), ((3, 7, 100), True, False), ((1, 5, 768), False, True), ((2, 1024), False, False)],
)
def test_skip_layer_norm_triton(impl, shape, beta, bias, dtype, poison):
    c = shape[-1]
    x, skip = impl.randn(*shape, dtype=dtype, shift=0.5), impl.randn(*shape, dtype=dtype)
    g = impl.randn(c, dtype=dtype)
    be = impl.randn(c, dtype=dtype) if beta else None
    bi = impl.randn(c, dtype=dtype) if bias else None
    y, s = impl.run("skip_layer_norm", x, skip, g, be, bi, 1e-5)
    y_ref, s_ref = reference.skip_layer_norm(*to64(x, skip, g, be, bi), 1e-5)
    s_torch = x + skip + (bi if bi is not None else 0)
    y_torch = F.layer_norm(s_torch, (c,), g, be, 1e-5)
    assert_close(s, s_ref, dtype, baseline=s_torch, what="s")
    assert_close(y, y_ref, dtype, baseline=y_torch, what="y")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_layer_norm_chunked_rows_triton(impl, dtype, poison):
    # 10000 channels > MAX_WHOLE_ROW: chunked Welford path; strided x, fp32 params.
    base = impl.randn(2, 10010, dtype=dtype, shift=2.0)
    x, skip = base[:, 10:], impl.randn(2, 10000, dtype=dtype)
    g, be, bi = impl.randn(10000), impl.randn(10000), impl.randn(10000)
    y, s = impl.run("skip_layer_norm", x, skip, g, be, bi, 1e-6)
    y_ref, s_ref = reference.skip_layer_norm(*to64(x, skip, g, be, bi), 1e-6)
    assert_close(s, s_ref, dtype, what="s")
    assert_close(y, y_ref, dtype, what="y")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_parameter_views_triton(impl, poison):
    """Strided / stride-0 bias, gamma and beta views read as the values they show (issue 19 item 1)."""
    m, c = 5, 96
    x, skip = impl.randn(m, c), impl.randn(m, c)
    bias = impl.randn(2 * c)[::2]
    gamma = torch.tensor([1.5], device=impl.device).expand(c)
    beta = impl.randn(c, 3)[:, 2]
    y, _ = impl.run("skip_layer_norm", x, skip, gamma, beta, bias, 1e-5)
    ry, _ = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), 1e-5)
    assert_close(y, ry, torch.float32, what="skip_layer_norm")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_launcher_validates_triton(impl):
    x = impl.randn(2, 8, 16)
    with pytest.raises(TypeError, match="skip"):
        impl.module.skip_layer_norm(x, x.half(), impl.randn(16), None, None, 1e-5)


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_layer_norm_no_skip_chunked_rows_triton(impl, poison):
    x = impl.randn(1, 8500, shift=2.0)  # > MAX_WHOLE_ROW: the chunked path
    g, bi = impl.randn(8500), impl.randn(8500)
    y, s = impl.run("skip_layer_norm", x, None, g, None, bi, 1e-6)
    y_ref, s_ref = reference.skip_layer_norm(*to64(x, None, g, None, bi), 1e-6)
    assert_close(s, s_ref, torch.float32, what="s")
    assert_close(y, y_ref, torch.float32, what="y")


# ------------------------------------------------------------------------------------------------ cuda
# (M rows, C): SD widths, then odd sizes, then rows too long for the shared-memory row cache.
CUDA_SHAPES = [(4096, 320), (1024, 640), (154, 768), (77, 1024), (256, 1280), (33, 7), (5, 1000), (3, 20000)]


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_skip_layer_norm_cuda(impl, shape, dtype, with_bias, poison):
    m, c = shape
    x, skip = impl.randn(m, c, dtype=dtype), impl.randn(m, c, dtype=dtype)
    gamma, beta = impl.randn(c, dtype=dtype), impl.randn(c, dtype=dtype)
    bias = impl.randn(c, dtype=dtype) if with_bias else None
    y, s = impl.run("skip_layer_norm", x, skip, gamma, beta, bias, 1e-5)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), 1e-5)
    sb = x + skip + (bias if bias is not None else 0)
    assert_close(s, rs, dtype, what=f"s{shape}")
    # torch in the same dtype tightens the fp16/bf16 bound; fp32 uses the DESIGN.md tolerance (both are
    # within a few ulps there, and 2x-of-torch would only measure summation order)
    base = None if dtype == torch.float32 else F.layer_norm(sb.float(), (c,), gamma.float(), beta.float()).to(dtype)
    assert_close(y, ry, dtype, baseline=base, what=f"y{shape}")


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
def test_skip_layer_norm_no_beta_fp32_params_strided_cuda(impl, poison):
    base = impl.randn(2, 77, 1024 + 8, dtype=torch.bfloat16)
    x = base[..., :1024]
    skip = impl.randn(2, 77, 1024, dtype=torch.bfloat16)
    gamma, bias = impl.randn(1024), impl.randn(1024)
    y, s = impl.run("skip_layer_norm", x, skip, gamma, None, bias, 1e-6)
    ry, rs = reference.skip_layer_norm(*to64(x, skip, gamma, None, bias), 1e-6)
    assert_close(y, ry, torch.bfloat16, what="y")
    assert_close(s, rs, torch.bfloat16, what="s")


@pytest.mark.parametrize("impl", impls("cuda"), indirect=True)
def test_skip_layer_norm_large_mean_cuda(impl, poison):
    # mean far from zero relative to the spread: the two-pass variance must not cancel
    x = impl.randn(64, 640, shift=20.0)
    skip = impl.randn(64, 640)
    gamma, beta = impl.randn(640), impl.randn(640)
    y, _ = impl.run("skip_layer_norm", x, skip, gamma, beta, None, 1e-5)
    ry, _ = reference.skip_layer_norm(*to64(x, skip, gamma, beta, None), 1e-5)
    assert_close(y, ry, torch.float32, what="large mean")
