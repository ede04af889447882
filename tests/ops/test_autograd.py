"""Autograd through torch.ops.sdkern (issue 19 item 4): backward formulas, op gradients, a patched U-Net.

The ops run fp32/fp16/bf16 only, so the backward formulas themselves (sdkern.ops._autograd.BACKWARD)
are checked with torch.autograd.gradcheck in float64 on the references' forward; the ops' own
gradients (fused forward + registered backward) are compared in fp32 with the float64 reference's
autograd gradients; a patched tiny U-Net must give every parameter eager gives a gradient, matching
eager's within the whole-model criterion.
"""

from __future__ import annotations

import pytest
import torch

import sdkern
import sdkern.ops
from sdkern.ops import _autograd, reference
from tests.utils import rel_l2

_ops = torch.ops.sdkern


def _inputs(op: str, dtype: torch.dtype, param_dtype: torch.dtype | None = None) -> tuple:
    """Small random arguments (odd sizes, non-trivial parameters) in the op's positional order."""
    pd = param_dtype or dtype
    r = lambda *s, dt=dtype: torch.randn(*s, dtype=dt)
    if op == "group_norm":
        return (r(2, 12, 3, 5), 1 + 0.2 * r(12, dt=pd), 0.2 * r(12, dt=pd), 4, 1e-5, True)
    if op == "skip_group_norm":
        return (r(2, 12, 3, 5), r(2, 12), 0.3 * r(12, dt=pd), 1 + 0.2 * r(12, dt=pd), 0.2 * r(12, dt=pd), 3, 1e-5, True)
    if op == "bias_split_gelu":
        return (r(2, 3, 14), r(14, dt=pd))
    if op == "skip_layer_norm":
        return (r(2, 3, 10), r(2, 3, 10), 1 + 0.2 * r(10, dt=pd), 0.2 * r(10, dt=pd), 0.3 * r(10, dt=pd), 1e-5)
    if op == "bias_add":
        return (r(2, 3, 10), r(10, dt=pd), r(2, 3, 10))
    assert op == "attention"
    return (r(2, 5, 2, 8), r(2, 7, 2, 8), r(2, 7, 2, 6), 0.4)


def _require_grad(args: tuple) -> tuple:
    return tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)


def _tensors(args: tuple) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def _loss(out, weights):
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True))


class _RefWithBackward(torch.autograd.Function):
    """Forward: the float64 reference; backward: sdkern's registered formula (the thing under test)."""

    @staticmethod
    def forward(ctx, op, *args):
        ctx.op, ctx.args = op, args
        return getattr(reference, op)(*args)

    @staticmethod
    def backward(ctx, *grads):
        pos = _autograd.TENSOR_ARGS[ctx.op]
        needs = [ctx.needs_input_grad[1 + i] for i in pos]
        out = [None] * (1 + len(ctx.args))
        for i, g in zip(pos, _autograd.BACKWARD[ctx.op](list(ctx.args), needs, grads), strict=True):
            out[1 + i] = g
        return tuple(out)


@pytest.mark.parametrize("op", sdkern.ops.OPS)
def test_backward_formula_gradcheck_float64(op):
    args = _require_grad(_inputs(op, torch.float64))
    assert torch.autograd.gradcheck(
        lambda *a: _RefWithBackward.apply(op, *a), args, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize("op", ["group_norm", "skip_layer_norm", "attention", "bias_add"])
def test_backward_formula_gradgradcheck_float64(op):
    """The backward is built from differentiable ops: second derivatives are right too."""
    args = _require_grad(_inputs(op, torch.float64))
    assert torch.autograd.gradgradcheck(
        lambda *a: _RefWithBackward.apply(op, *a), args, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True
    )


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", sdkern.ops.OPS)
def test_op_gradients_match_reference(op, param_dtype):
    """Gradients of the fused op (CPU kernels) match the float64 reference's autograd gradients.

    fp32 throughout, and bf16 activations with fp32 parameters (the mixed case of the norms).
    """
    dtype = torch.float32 if param_dtype == torch.float32 else torch.bfloat16
    pdt = torch.float32 if op != "attention" else dtype
    args = _require_grad(_inputs(op, dtype, pdt))
    out = getattr(_ops, op)(*args)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.grad_fn is not None for o in outs), "op output has no grad_fn"
    weights = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    _loss(out, weights).backward()

    ref_args = _require_grad(tuple(a.detach().double() if isinstance(a, torch.Tensor) else a for a in args))
    _loss(getattr(reference, op)(*ref_args), weights).backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for i, (a, r) in enumerate(zip(_tensors(args), _tensors(ref_args), strict=True)):
        assert a.grad is not None, f"{op}: tensor argument {i} has no gradient"
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape
        err = rel_l2(a.grad, r.grad)
        assert err <= tol, f"{op}: gradient of tensor argument {i}: rel L2 {err:.2e} > {tol:.0e}"


def test_optional_arguments_and_partial_requires_grad():
    x, skip, gamma, _beta, _bias, eps = _inputs("skip_layer_norm", torch.float32)
    x.requires_grad_(True)
    y, s = _ops.skip_layer_norm(x, skip, gamma, None, None, eps)
    (y.sum() + 2 * s.sum()).backward()
    x64 = x.detach().double().requires_grad_(True)
    y64, s64 = reference.skip_layer_norm(x64, skip.double(), gamma.double(), None, None, eps)
    (y64.sum() + 2 * s64.sum()).backward()
    assert rel_l2(x.grad, x64.grad) <= 1e-5
    assert gamma.grad is None and skip.grad is None
    # only one output used: the other's gradient is zero
    x.grad = None
    _ops.skip_layer_norm(x, skip, gamma, None, None, eps)[1].sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_no_grad_paths_record_nothing():
    args = _require_grad(_inputs("group_norm", torch.float32))
    with torch.no_grad():
        assert _ops.group_norm(*args).grad_fn is None
    with torch.inference_mode():
        assert _ops.group_norm(*args).grad_fn is None
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    assert _ops.group_norm(*plain).grad_fn is None


def _param_grads(model: torch.nn.Module, args: dict, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(**args).sample
    (out.double() * weight).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("qkv_fusion", [False, True], ids=["separate_qkv", "packed_qkv"])
def test_patched_unet_gradients_match_eager(qkv_fusion):
    # (packed QKV: the processor concatenates the Parameters when grad is enabled, so they get gradients)
    """Every parameter with an eager gradient has one after sdkern.patch, within the whole-model criterion.

    Criterion per parameter (fp32, vs the float64 eager gradient):
    ``err(patched) <= max(2 * err(eager fp32), 1e-5)`` on the concatenation of all gradients, and every
    single parameter within 1e-3 (small parameters see a few-ulp difference as a larger relative error).
    """
    from tests.patch import models as M

    model = M.unet(M.TINY_UNET).train()
    args = M.unet_inputs(model, batch=2, size=8, seq=16)
    args["encoder_hidden_states"].requires_grad_(True)
    weight = torch.randn(2, model.config.out_channels, 8, 8, dtype=torch.float64)

    model.double()
    ref = _param_grads(model, M.cast_inputs(args, torch.float64), weight)
    model.float()
    eager = _param_grads(model, args, weight)
    sdkern.patch(model, qkv_fusion=qkv_fusion, cpu_engine=False)  # the CPU engine is inference-only
    try:
        patched = _param_grads(model, args, weight)
    finally:
        sdkern.unpatch(model)
    assert len(eager) == len(ref) == sum(1 for _ in model.parameters())
    missing = sorted(set(eager) - set(patched))
    assert not missing, f"{len(missing)} of {len(eager)} parameters lost their gradient, e.g. {missing[:5]}"
    cat = lambda g: torch.cat([g[n].flatten().double() for n in sorted(ref)])
    err, base = rel_l2(cat(patched), cat(ref)), rel_l2(cat(eager), cat(ref))
    assert err <= max(2 * base, 1e-5), f"gradients: patched rel L2 {err:.2e}, eager {base:.2e}"
    worst = max(((rel_l2(patched[n], ref[n]), n) for n in ref), key=lambda t: t[0])
    assert worst[0] <= 1e-3, f"gradient of {worst[1]}: rel L2 {worst[0]:.2e}"


def test_cpu_engine_refuses_gradient_of_packed_weights():
    """With the CPU engine on, a grad-mode call that would need a packed weight's gradient raises clearly."""
    from tests.patch import models as M

    model = M.unet(M.TINY_UNET)
    args = M.unet_inputs(model, batch=1, size=8, seq=16)
    sdkern.patch(model)
    try:
        with pytest.raises(RuntimeError, match="cpu_engine=False"):
            model(**args)
        with torch.no_grad():
            assert torch.isfinite(model(**args).sample).all()
    finally:
        sdkern.unpatch(model)


@pytest.mark.parametrize("form", ["attention_causal", "attention_causal_sq_lt_sk", "layer_norm"])
def test_optional_forms_gradients_match_reference(form):
    """Causal attention (Sq == Sk: torch's is_causal; Sq < Sk: the bottom-right mask) and skip_layer_norm
    without skip: gradients of the CPU op match the float64 reference's autograd gradients."""
    r = lambda *s: torch.randn(*s, dtype=torch.float32)
    if form == "layer_norm":
        op, args = "skip_layer_norm", (r(2, 3, 10), None, 1 + 0.2 * r(10), 0.2 * r(10), None, 1e-5)
    else:
        sk = 7 if form == "attention_causal" else 11
        op, args = "attention", (r(2, 7, 2, 8), r(2, sk, 2, 8), r(2, sk, 2, 6), 0.4, True)
    args = _require_grad(args)
    out = getattr(_ops, op)(*args)
    outs = out if isinstance(out, tuple) else (out,)
    weights = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    _loss(out, weights).backward()
    ref_args = _require_grad(tuple(a.detach().double() if isinstance(a, torch.Tensor) else a for a in args))
    _loss(getattr(reference, op)(*ref_args), weights).backward()
    for i, (a, ra) in enumerate(zip(_tensors(args), _tensors(ref_args), strict=True)):
        err = rel_l2(a.grad, ra.grad)
        assert err <= 1e-5, f"{form}: gradient of tensor argument {i}: rel L2 {err:.2e}"
    # and the float64 formula itself (the backward sdkern registers) passes gradcheck
    args64 = _require_grad(tuple(a.detach().double() if isinstance(a, torch.Tensor) else a for a in args))
    assert torch.autograd.gradcheck(
        lambda *a: _RefWithBackward.apply(op, *a), args64, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )
