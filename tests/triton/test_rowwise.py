"""Triton bias_add, bias_split_gelu and skip_layer_norm against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sdkern.triton as T
from sdkern.ops import reference
from tests.triton.conftest import DEVICE
from tests.utils import DTYPES, assert_close, randn, to64

ROW_SHAPES = [(2, 33, 320), (3, 7, 96), (1, 1, 3), (2, 5, 1280), (4, 77, 768)]


def _r(*shape, dtype=torch.float32, **kw):
    return randn(*shape, dtype=dtype, device=DEVICE, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_bias_add(shape, dtype, poison):
    x, skip, bias = _r(*shape, dtype=dtype), _r(*shape, dtype=dtype), _r(shape[-1], dtype=dtype)
    out = T.bias_add(x, bias, skip)
    ref = reference.bias_add(*to64(x, bias, skip))
    assert_close(out, ref, dtype, baseline=x + bias + skip, what=f"bias_add{shape}")


def test_bias_add_strided_fp32_bias(poison):
    base = _r(2, 19, 640, dtype=torch.float16)
    x, skip, bias = base[:, :, 320:], _r(2, 19, 320, dtype=torch.float16), _r(320)
    out = T.bias_add(x, bias, skip)
    assert out.is_contiguous()
    assert_close(out, reference.bias_add(*to64(x, bias, skip)), torch.float16, what="strided rows, fp32 bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9, 2 * 320), (3, 5, 2 * 37), (1, 2560), (2, 3, 2 * 1280)])
def test_bias_split_gelu(shape, dtype, poison):
    x, bias = _r(*shape, dtype=dtype), _r(shape[-1], dtype=dtype)
    out = T.bias_split_gelu(x, bias)
    a, g = (x + bias).chunk(2, dim=-1)
    assert_close(out, reference.bias_split_gelu(*to64(x, bias)), dtype, baseline=a * F.gelu(g), what=f"bsg{shape}")


def test_bias_split_gelu_strided(poison):
    base = _r(3, 11, 700)
    x, bias = base[..., 10:650], _r(640, dtype=torch.float32)
    assert_close(T.bias_split_gelu(x, bias), reference.bias_split_gelu(*to64(x, bias)), torch.float32, what="strided")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "beta", "bias"),
    [((2, 33, 320), True, True), ((3, 7, 100), True, False), ((1, 5, 768), False, True), ((2, 1024), False, False)],
)
def test_skip_layer_norm(shape, beta, bias, dtype, poison):
    c = shape[-1]
    x, skip = _r(*shape, dtype=dtype, shift=0.5), _r(*shape, dtype=dtype)
    g, be, bi = _r(c, dtype=dtype), _r(c, dtype=dtype) if beta else None, _r(c, dtype=dtype) if bias else None
    y, s = T.skip_layer_norm(x, skip, g, be, bi, 1e-5)
    y_ref, s_ref = reference.skip_layer_norm(*to64(x, skip, g, be, bi), 1e-5)
    s_torch = x + skip + (bi if bi is not None else 0)
    y_torch = F.layer_norm(s_torch, (c,), g, be, 1e-5)
    assert_close(s, s_ref, dtype, baseline=s_torch, what="s")
    assert_close(y, y_ref, dtype, baseline=y_torch, what="y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_layer_norm_chunked_rows(dtype, poison):
    # 10000 channels > MAX_WHOLE_ROW: chunked Welford path; strided x, fp32 params.
    base = _r(2, 10010, dtype=dtype, shift=2.0)
    x, skip = base[:, 10:], _r(2, 10000, dtype=dtype)
    g, be, bi = _r(10000), _r(10000), _r(10000)
    y, s = T.skip_layer_norm(x, skip, g, be, bi, 1e-6)
    y_ref, s_ref = reference.skip_layer_norm(*to64(x, skip, g, be, bi), 1e-6)
    assert_close(s, s_ref, dtype, what="s")
    assert_close(y, y_ref, dtype, what="y")


def test_launchers_validate():
    x = _r(2, 8, 16)
    with pytest.raises(ValueError, match="bias"):
        T.bias_add(x, _r(15), x)
    with pytest.raises(ValueError, match="even"):
        T.bias_split_gelu(_r(2, 7), _r(7))
    with pytest.raises(TypeError, match="skip"):
        T.skip_layer_norm(x, x.half(), _r(16), None, None, 1e-5)


def test_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = randn(2, 16)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        T.bias_add(x, randn(16), x)


def test_parameter_views(poison):
    """Strided / stride-0 bias, gamma and beta views read as the values they show (issue 19 item 1)."""
    m, c = 5, 96
    x, skip = randn(m, c, device=DEVICE), randn(m, c, device=DEVICE)
    bias = randn(2 * c, device=DEVICE)[::2]
    gamma = torch.tensor([1.5], device=DEVICE).expand(c)
    beta = randn(c, 3, device=DEVICE)[:, 2]
    assert_close(T.bias_add(x, bias, skip), reference.bias_add(*to64(x, bias, skip)), torch.float32, what="bias_add")
    y = T.bias_split_gelu(x, bias)
    assert_close(y, reference.bias_split_gelu(*to64(x, bias)), torch.float32, what="bias_split_gelu")
    y, _ = T.skip_layer_norm(x, skip, gamma, beta, bias, 1e-5)
    ry, _ = reference.skip_layer_norm(*to64(x, skip, gamma, beta, bias), 1e-5)
    assert_close(y, ry, torch.float32, what="skip_layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 9, 768), (1, 5, 1280), (3, 7, 100)])
def test_layer_norm_no_skip(shape, dtype, poison):
    # skip=None: a plain LayerNorm (CLIP's layer_norm1 / final_layer_norm: widths 768 and 1280; few rows
    # keep the interpreter quick, every row is its own program)
    c = shape[-1]
    x = _r(*shape, dtype=dtype, shift=0.5)
    g, be = _r(c, dtype=dtype), _r(c, dtype=dtype)
    y, s = T.skip_layer_norm(x, None, g, be, None, 1e-5)
    y_ref, _ = reference.skip_layer_norm(*to64(x, None, g, be, None), 1e-5)
    assert_close(y, y_ref, dtype, baseline=F.layer_norm(x, (c,), g, be, 1e-5), what="layer_norm y")
    assert torch.equal(s, x)


def test_layer_norm_no_skip_chunked_rows(poison):
    x = _r(1, 8500, shift=2.0)  # > MAX_WHOLE_ROW: the chunked path
    g, bi = _r(8500), _r(8500)
    y, s = T.skip_layer_norm(x, None, g, None, bi, 1e-6)
    y_ref, s_ref = reference.skip_layer_norm(*to64(x, None, g, None, bi), 1e-6)
    assert_close(s, s_ref, torch.float32, what="s")
    assert_close(y, y_ref, torch.float32, what="y")
