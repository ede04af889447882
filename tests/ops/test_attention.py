"""attention on every implementation (cpu, triton, cuda, ort MultiHeadAttention) against the float64 reference.

Every CPU case runs the public op ``sdkern.ops.attention`` and, to make sure the C++ kernel (not the
PyTorch fallback) produced the result, also the native launcher directly; both must agree bit for
bit. The error bound is DESIGN.md's tolerance, tightened to 2x the error of torch's own SDPA in the
same dtype (tests/utils.py ``bound``); the CUDA cases use the DESIGN.md tolerance for fp32 (their
baseline is None there), so they are separate functions, as are ORT's graphs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _launch, reference
from tests.ops._harness import DTYPES, assert_close, cases, grid, impls, randn, to64


def _native():
    from sdkern import _C

    return _C


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Public op, cross-checked against a direct call of the C++ launcher (no fallback possible)."""
    out = sdkern.ops.attention(q, k, v, scale)
    direct = _launch.attention(_native(), q, k, v, scale)
    assert torch.equal(out, direct), "public op and native kernel disagree (fallback taken?)"
    assert out.is_contiguous()
    return out


def _torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Plain PyTorch in the input dtype, (B, S, H, D) in and out: the baseline error to stay within 2x of."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


def _check(q, k, v, scale=None, what=""):
    dtype = q.dtype
    out = _run(q, k, v, scale)
    ref = reference.attention(*to64(q, k, v), scale)
    assert_close(out, ref, dtype, baseline=_torch_sdpa(q, k, v, scale), what=what)
    return out


def _qkv(b, sq, sk, h, d, dv, dtype, scale=1.0, device="cpu"):
    return (
        randn(b, sq, h, d, dtype=dtype, scale=scale, device=device),
        randn(b, sk, h, d, dtype=dtype, scale=scale, device=device),
        randn(b, sk, h, dv, dtype=dtype, device=device),
    )


def _check_on(impl, q, k, v, scale=None, what=""):
    """``_check`` on ``impl`` (cpu: the public op cross-checked against the C++ launcher)."""
    if impl.name == "cpu":
        return _check(q, k, v, scale, what)
    out = impl.run("attention", q, k, v, scale)
    ref = reference.attention(*to64(q, k, v), scale)
    assert_close(out, ref, q.dtype, baseline=_torch_sdpa(q, k, v, scale), what=what)
    return out


# Self-attention, every SD head dim (B, S, H, D).
SELF = [(2, 64, 8, 40), (1, 256, 2, 64), (2, 96, 5, 80), (1, 128, 2, 128), (2, 72, 1, 160)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SELF, ids=lambda s: "x".join(map(str, s)))
def test_self_attention(shape, dtype, poison):
    b, s, h, d = shape
    _check(*_qkv(b, s, s, h, d, d, dtype), what=f"self {shape}")


# Cross-attention and odd sizes: (B, Sq, Sk, H, D, Dv).
CROSS = [
    (2, 256, 77, 8, 40, 40),  # SD text cross-attention
    (1, 64, 77, 3, 160, 160),
    (2, 333, 37, 3, 64, 64),  # Sq, Sk not multiples of any tile
    (1, 5, 300, 2, 80, 80),  # more than two key tiles, a short query block
    (2, 17, 77, 4, 64, 40),  # D != Dv
    (1, 33, 129, 2, 40, 160),
    (1, 70, 3, 7, 24, 8),  # tiny D, Dv, Sk
    (1, 40, 50, 2, 33, 17),  # odd D and Dv
    (1, 1, 1, 1, 1, 1),
]


# triton (interpreter): every SD head dim at a few query rows, text cross-attention Sk = 77, odd lengths.
TRITON_CROSS = [
    (2, sq, sk, 2, d, d) for d, sq, sk in [(40, 45, 77), (64, 70, 70), (80, 33, 77), (128, 20, 77), (160, 37, 50)]
]


@pytest.mark.parametrize(
    "impl,shape,dtype", cases(cpu=grid(CROSS, DTYPES), triton=grid(TRITON_CROSS, DTYPES)), indirect=["impl"]
)
def test_cross_and_odd(impl, shape, dtype, poison):
    b, sq, sk, h, d, dv = shape
    _check_on(impl, *_qkv(b, sq, sk, h, d, dv, dtype, device=impl.device), what=f"attention {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_qkv_views(dtype, poison):
    """q, k, v as views of one (B, S, 3, H, D) projection: strided, no copies."""
    b, s, h, d = 2, 100, 4, 40
    qkv = randn(b, s, 3, h, d, dtype=dtype)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    _check(q, k, v, what="packed qkv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_kv_views(dtype, poison):
    """k, v from a packed (B, Sk, 2, H, D) projection; q a head-sliced view of a wider tensor."""
    b, sq, sk, h, d = 2, 50, 77, 3, 64
    kv = randn(b, sk, 2, h, d, dtype=dtype)
    q = randn(b, sq, h + 2, d, dtype=dtype)[:, :, 1 : h + 1]
    k, v = kv[:, :, 0], kv[:, :, 1]
    _check(q, k, v, what="packed kv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nondefault_scale(dtype, poison):
    _check(*_qkv(1, 90, 77, 2, 80, 80, dtype), scale=0.3, what="scale 0.3")


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits(dtype, poison):
    """scale*|q.k| of order 50: exp overflows without the running max; softmax must stay exact.

    At logits this large each output row's error is set by the rounding of its few largest logits,
    in sdkern's kernel and in torch's alike (fp32, scale x4: median error 2.0e-6 vs torch's 2.1e-6),
    so the ratio of the two errors is noisy per row; 320 query rows average it (with 80, 0.7% of
    fresh seeds exceeded 2x torch's error; with 320, none of 300, largest ratio 0.74 of the bound).
    """
    b, sq, sk, h, d = 1, 320, 150, 2, 64
    q, k, v = _qkv(b, sq, sk, h, d, d, dtype, scale=4.0)  # logits ~ N(0, 16^2)
    logits = torch.einsum("bqhd,bkhd->bhqk", *to64(q, k)) / math.sqrt(d)
    assert logits.abs().max() > 40  # really large
    _check(q, k, v, what="large logits")
    # Sharper still: near one-hot attention rows.
    _check(q, k, v, scale=4.0 / math.sqrt(d), what="large logits, scale x4")


def test_every_isa(poison):
    _C = _native()
    shapes = [(2, 70, 77, 3, 40, 40), (1, 40, 33, 2, 80, 24)]
    cases = []
    for dtype in DTYPES:
        for b, sq, sk, h, d, dv in shapes:
            q, k, v = _qkv(b, sq, sk, h, d, dv, dtype)
            cases.append((q, k, v, reference.attention(*to64(q, k, v)), _torch_sdpa(q, k, v, None)))
    active = _C.cpu_isa()
    ran = []
    try:
        for isa in _C.build_info()["isa_built"]:
            if not _C.set_cpu_isa(isa):
                continue
            ran.append(isa)
            for q, k, v, ref, base in cases:
                assert_close(_run(q, k, v), ref, q.dtype, baseline=base, what=f"isa {isa} {q.dtype}")
    finally:
        _C.set_cpu_isa(active)
    assert "baseline" in ran


def test_empty_and_zero_sizes(poison):
    q, k, v = _qkv(2, 0, 7, 3, 16, 16, torch.float32)
    out = sdkern.ops.attention(q, k, v)
    assert out.shape == (2, 0, 3, 16)


def test_bad_inputs():
    q, k, v = _qkv(1, 8, 8, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="k"):
        sdkern.ops.attention(q, k[..., :8], v)
    with pytest.raises(TypeError):
        sdkern.ops.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="contiguous"):
        sdkern.ops.attention(q.transpose(-1, -2), k, v)


def test_batch_broadcast_kv(poison):
    """k, v expanded over the batch (stride 0), e.g. one text embedding for a whole batch."""
    q = randn(3, 40, 2, 64, dtype=torch.bfloat16)
    k = randn(1, 77, 2, 64, dtype=torch.bfloat16).expand(3, -1, -1, -1)
    v = randn(1, 77, 2, 64, dtype=torch.bfloat16).expand(3, -1, -1, -1)
    assert k.stride(0) == 0
    _check(q, k, v, what="batch-broadcast k, v")


# ---------------------------------------------------------------------------------------------
# causal (CLIP text self-attention): query i sees keys j <= i + (Sk - Sq)
def _torch_sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Plain PyTorch causal attention in the input dtype (is_causal for Sq == Sk, else the bottom-right mask)."""
    sq, sk = q.shape[1], k.shape[1]
    mask = None if sq == sk else reference.causal_mask(sq, sk, q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=sq == sk, scale=scale
    )
    return o.transpose(1, 2)


def _check_causal(q, k, v, scale=None, what=""):
    out = sdkern.ops.attention(q, k, v, scale, causal=True)
    direct = _launch.attention(_native(), q, k, v, scale, True)
    assert torch.equal(out, direct), "public op and native kernel disagree (fallback taken?)"
    ref = reference.attention(*to64(q, k, v), scale, True)
    assert_close(out, ref, q.dtype, baseline=_torch_sdpa_causal(q, k, v, scale), what=what)
    return out


# (B, Sq, Sk, H, D): CLIP ViT-L/14 text encoder (SD 1.x), OpenCLIP bigG (SDXL text_encoder_2), odd sizes.
CAUSAL = [
    (2, 77, 77, 12, 64),
    (2, 77, 77, 20, 64),
    (1, 1, 1, 2, 64),
    (2, 5, 5, 3, 40),
    (1, 130, 130, 2, 33),  # more than two query blocks and two key tiles, odd head dim
    (1, 70, 201, 2, 80),  # Sq < Sk: bottom-right aligned (the last query sees every key)
    (2, 1, 9, 2, 16),  # one query (decoding step) sees all keys
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CAUSAL, ids=lambda s: "x".join(map(str, s)))
def test_causal(shape, dtype, poison):
    b, sq, sk, h, d = shape
    _check_causal(*_qkv(b, sq, sk, h, d, d, dtype), what=f"causal {shape}")


def test_causal_matches_torch_is_causal():
    """Sq == Sk: the same semantics as torch SDPA's is_causal (float64, exact up to rounding)."""
    q, k, v = to64(*_qkv(2, 77, 77, 3, 64, 64, torch.float32))
    ref = reference.attention(q, k, v, None, True)
    torch.testing.assert_close(ref, _torch_sdpa_causal(q, k, v, None), rtol=1e-12, atol=1e-12)
    # and the mask matters: not the unmasked result
    assert (ref - reference.attention(q, k, v, None, False)).abs().max() > 1e-3


def test_causal_future_keys_ignored(poison):
    """Changing keys/values a query must not see leaves its output bit-identical (masked, not just small).

    (Finite values: a NaN in a masked value reaches the output through 0 * NaN, as in torch's SDPA.)
    """
    q, k, v = _qkv(1, 77, 77, 2, 64, 64, torch.float32)
    out = sdkern.ops.attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, 40:] = 1e4
    v2[:, 40:] = 1e30
    out2 = sdkern.ops.attention(q, k2, v2, causal=True)
    assert torch.equal(out[:, :40], out2[:, :40])


def test_causal_packed_qkv_every_isa(poison):
    _C = _native()
    qkv = randn(1, 77, 3, 2, 64, dtype=torch.float32)
    cases = []
    for dtype in DTYPES:
        q, k, v = qkv.to(dtype).unbind(2)
        cases.append((q, k, v, reference.attention(*to64(q, k, v), None, True), _torch_sdpa_causal(q, k, v, None)))
    active = _C.cpu_isa()
    try:
        for isa in _C.build_info()["isa_built"]:
            if not _C.set_cpu_isa(isa):
                continue
            for q, k, v, ref, base in cases:
                out = _launch.attention(_C, q, k, v, None, True)
                assert_close(out, ref, q.dtype, baseline=base, what=f"causal isa {isa} {q.dtype}")
    finally:
        _C.set_cpu_isa(active)


def test_causal_refuses_sq_over_sk():
    q, k, v = _qkv(1, 8, 5, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="causal attention needs Sq <= Sk"):
        sdkern.ops.attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="causal"):
        _launch.attention(_native(), q, k, v, None, True)  # the C++ check too
    sdkern.ops.attention(q, k, v)  # fine without causal


# ---------------------------------------------------------------------------------------------- triton


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_qkv_views_triton(impl, dtype, poison):
    # Packed projections: q, k, v are strided views of one (B, S, 3, H, D) buffer; no copies.
    b, s, h, d = 1, 50, 3, 40
    qkv = impl.randn(b, s, 3, h, d, dtype=dtype, scale=2.0)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    _check_on(impl, q, k, v, 0.3, what="packed qkv")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_cross_kv_views_dv_triton(impl, poison):
    # Cross-attention with packed KV (B, 77, 2, H, D) and a different value head dim.
    q = impl.randn(2, 17, 2, 64, dtype=torch.float16)
    kv = impl.randn(2, 77, 2, 2, 64, dtype=torch.float16)
    k, v = kv[:, :, 0], kv[:, :, 1, :, :24]
    out = impl.run("attention", q, k, v, None)
    assert out.shape == (2, 17, 2, 24)
    assert_close(out, reference.attention(*to64(q, k, v), None), torch.float16, what="kv views, Dv=24")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_validates_triton(impl):
    q = impl.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k"):
        impl.module.attention(q, impl.randn(1, 4, 3, 8), q, None)
    with pytest.raises(TypeError, match="v"):
        impl.module.attention(q, q, q.half(), None)


# (B, Sq, Sk, H, D): CLIP text self-attention per head (77 tokens, head dim 64; SD 1.x has 12 heads, SDXL's
# bigG encoder 20: every (batch, head) is its own program, so 2 heads keep the interpreter quick and cover
# the same per-program work; the CPU tests run the full head counts), odd lengths, Sq < Sk (bottom-right
# aligned), one query.
@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 77, 77, 2, 64), (1, 1, 1, 2, 64), (2, 5, 5, 2, 40), (1, 20, 45, 2, 80)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_causal_triton(impl, shape, dtype, poison):
    b, sq, sk, h, d = shape
    qkv = impl.randn(b, sq, 3, h, d, dtype=dtype)  # packed QKV views when Sq == Sk
    q = qkv[:, :, 0]
    if sq == sk:
        k, v = qkv[:, :, 1], qkv[:, :, 2]
    else:
        k, v = impl.randn(b, sk, h, d, dtype=dtype), impl.randn(b, sk, h, d, dtype=dtype)
    out = impl.run("attention", q, k, v, None, True)
    ref = reference.attention(*to64(q, k, v), None, True)
    assert_close(out, ref, dtype, baseline=_torch_sdpa_causal(q, k, v, 1.0 / math.sqrt(d)), what=f"causal {shape}")


@pytest.mark.parametrize("impl", impls("triton"), indirect=True)
def test_causal_refuses_sq_over_sk_triton(impl):
    q = impl.randn(1, 6, 2, 16)
    with pytest.raises(ValueError, match="causal"):
        impl.module.attention(q, q[:, :4], q[:, :4], None, True)


# ------------------------------------------------------------------------------------------------ cuda
