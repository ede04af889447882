"""Autograd for the ``torch.ops.sdkern`` operators (backward formulas; the forward stays the fused kernel).

Every op gets an Autograd-key kernel (an ``autograd.Function`` over the op's kernels), so ``loss.backward()`` through a
patched model (LoRA training, textual inversion, ...) gives the same gradients as the eager model:

- an op whose spec has a closed-form ``backward`` uses it (``bias_add``: ``dx = dskip = g``, ``dbias = g``
  summed over rows);
- else the vector-Jacobian product of the spec's ``vjp_of`` (``attention``: torch's scaled_dot_product_attention
  in the accumulation dtype, see ``sdkern/ops/attention.py``) or, by default, of the pure-PyTorch reference
  (:mod:`sdkern.ops.reference`, which defines the ops' semantics: the norms and bias_split_gelu),
  recomputed from the saved inputs in the backward pass. Nothing but the inputs is saved.

The backward is itself differentiable (``create_graph=True`` works: it is built from differentiable
torch ops). Gradients come back in each input's dtype; non-tensor arguments (groups, eps, silu, scale)
get none. Under ``torch.no_grad()`` / inference mode, or when no input requires grad, the forward runs
the kernel directly and nothing is saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sdkern.ops._library import SPECS

__all__ = ["BACKWARD", "TENSOR_ARGS", "register"]

# Positions of the tensor arguments (Tensor or Tensor?) in each op's schema.
TENSOR_ARGS: dict[str, tuple[int, ...]] = {op: spec.tensor_args for op, spec in SPECS.items()}


def _vjp(
    fn: Callable[..., Any],
    args: Sequence[Any],
    tensor_pos: Sequence[int],
    needs: Sequence[bool],
    grads: Sequence[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """Gradients of ``fn(*args)`` w.r.t. ``args[tensor_pos[i]]`` where ``needs[i]``, for output grads ``grads``.

    ``fn`` is recomputed with autograd on detached copies of the inputs; with ``create_graph`` when
    the caller's grad mode is on (double backward).
    """
    create_graph = torch.is_grad_enabled()
    args = list(args)
    wrt: list[torch.Tensor] = []
    with torch.enable_grad():
        for i, need in zip(tensor_pos, needs, strict=True):
            t = args[i]
            if t is None:
                continue
            t = t if create_graph else t.detach()
            if need:
                if not t.requires_grad:
                    t = t.detach().requires_grad_(True)
                wrt.append(t)
            args[i] = t
        out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
    if not wrt:
        return [None] * len(needs)
    if pairs:
        got = torch.autograd.grad(
            [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True, create_graph=create_graph
        )
    else:
        got = (None,) * len(wrt)
    it = iter(got)
    res: list[torch.Tensor | None] = []
    for i, need in zip(tensor_pos, needs, strict=True):
        if need and args[i] is not None:
            g = next(it)
            res.append(torch.zeros_like(args[i]) if g is None else g)
        else:
            res.append(None)
    return res


def backward_of(op: str) -> Callable[..., list[torch.Tensor | None]]:
    """``backward(args, needs, grads) -> grads of the tensor arguments`` for ``op`` (also used by the tests).

    ``args`` are the op's positional arguments, ``needs[i]`` whether tensor argument i needs a
    gradient, ``grads`` the gradients of the op's outputs (None for an output that has none).
    """
    spec = SPECS[op]
    if spec.backward is not None:
        return spec.backward
    fn, pos = spec.vjp_of or spec.reference, spec.tensor_args

    def backward(args: Sequence[Any], needs: Sequence[bool], grads: Sequence[torch.Tensor | None]) -> list:
        return _vjp(fn, args, pos, needs, grads)

    return backward


BACKWARD: dict[str, Callable[..., list[torch.Tensor | None]]] = {op: backward_of(op) for op in TENSOR_ARGS}


_AFTER_AUTOGRAD = torch._C._after_autograd_keyset


def _autograd_kernel(op: str) -> Callable[..., Any]:
    """The Autograd-key kernel of ``op``: an autograd.Function when grad is needed, else a plain redispatch.

    (What :func:`torch.library.register_autograd` builds, without its per-call bookkeeping on the
    no-grad path that every inference call takes.)
    """
    opov = getattr(torch.ops.sdkern, op).default
    pos = TENSOR_ARGS[op]
    bwd = BACKWARD[op]

    def forward(ctx: Any, keyset: Any, *args: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            out = opov.redispatch(keyset & _AFTER_AUTOGRAD, *args)
        ctx.save_for_backward(*(args[i] for i in pos))
        ctx.sdkern_args = tuple(None if i in pos else a for i, a in enumerate(args))
        return out

    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        args = list(ctx.sdkern_args)
        for i, t in zip(pos, ctx.saved_tensors, strict=True):
            args[i] = t
        needs = [bool(ctx.needs_input_grad[1 + i]) for i in pos]
        out: list[torch.Tensor | None] = [None] * (1 + len(args))
        for i, g in zip(pos, bwd(args, needs, grads), strict=True):
            out[1 + i] = g
        return tuple(out)

    fn = type(
        f"SdkernBackward_{op}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )
    is_grad_enabled, any_requires_grad = torch._C.is_grad_enabled, torch._C._any_requires_grad

    def kernel(keyset: Any, *args: Any) -> Any:
        if is_grad_enabled() and any_requires_grad(*args):
            return fn.apply(keyset, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return opov.redispatch(keyset & _AFTER_AUTOGRAD, *args)

    kernel.__name__ = f"sdkern_{op}_autograd"
    return kernel


def register(lib: torch.library.Library) -> None:
    """Register the Autograd kernel (forward: the op's kernels; backward: :data:`BACKWARD`) of every sdkern op."""
    for op in TENSOR_ARGS:
        lib.impl(op, _autograd_kernel(op), "Autograd", with_keyset=True)
