"""Batch-invariant execution: a sample's result does not depend on the batch it runs in.

The server batches requests and promises each one the image it would get alone, bit for bit. On CPU,
three kernels were found not batch-invariant (same sample, different last bits with the batch size):

- PyTorch's convolution (oneDNN): a 3x3 conv of 8x32x4x4 differs from the same conv of its first
  sample alone; oneDNN picks its kernel and blocking by shape, batch included, and another blocking
  sums the IC*KH*KW products in another order. It cannot be told otherwise from PyTorch.
- PyTorch's channels-last GroupNorm chooses between parallelising over N*groups and over pixels by
  the batch size, which changes the summation order of the statistics. (sdkern's own NHWC group
  norms had the same flaw, chunking each image by a count that depended on N; they now chunk by the
  image size and thread budget only, see kernels/cpu/group_norm_impl.h.)
- PyTorch's Linear (MKL GEMM) picks another kernel for a small row count: the U-Net's time embedding
  (one row per sample) gave other last bits for 8 rows than for 2 rows of the same values. sdkern's
  patched blocks call ``F.linear`` on packed QKV/KV, GEGLU and feed-forward weights themselves, which
  the ``nn.Linear`` wrap does not reach: the SD 1.5 U-Net at 256x256 (1024 tokens a sample) still
  differed by ~1e-6 with those batched and matched bit for bit once whole transformer blocks
  (``BasicTransformerBlock``), ``Attention`` modules (the VAE's) and CLIP encoder layers ran per sample
  (the batched GEMMs are the likely cause; not isolated further).

What stays batched: sdkern's fused group norms in the ResNet blocks (now invariant), the time
embedding's elementwise parts, up/down sampling glue and the scheduler arithmetic.

:func:`make_batch_invariant` therefore runs every ``nn.Conv2d``, ``nn.GroupNorm`` and ``nn.Linear``
module and the blocks above one sample at a time (the same N=1 shape whatever the batch, so the same
kernel and summation order) and concatenates the results; everything else keeps running batched. It is reversible with
:func:`undo_batch_invariant`.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("sdkern")

_ATTR = "_sdkern_batch_invariant"


def _per_sample_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's class ``forward`` on each sample of ``x`` (N, C, H, W) separately; (N, C', H', W')."""
    if x.dim() < 2 or x.shape[0] <= 1:
        return type(self).forward(self, x)
    return torch.cat([type(self).forward(self, x[i : i + 1]) for i in range(x.shape[0])])


def _cat(outs: list[Any]) -> Any:
    first = outs[0]
    if torch.is_tensor(first):
        return torch.cat(outs)
    if isinstance(first, tuple):
        return tuple(_cat([o[k] for o in outs]) for k in range(len(first)))
    return first  # None and other non-batched results


def _per_sample_block(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's class ``forward`` per sample: every tensor argument whose first dim is the batch N is
    sliced (a (1, ...) mask or a shared tensor is passed whole); tensor / tuple outputs are concatenated."""
    fwd = type(self).forward
    x = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(x) or x.dim() < 2 or x.shape[0] <= 1:
        return fwd(self, *args, **kwargs)
    n = x.shape[0]

    def pick(v: Any, i: int) -> Any:
        return v[i : i + 1] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v

    outs = [fwd(self, *(pick(a, i) for a in args), **{k: pick(v, i) for k, v in kwargs.items()}) for i in range(n)]
    return _cat(outs)


# Blocks that call F.linear on packed / bias-free weights themselves (sdkern's QKV / KV projections,
# GEGLU and the feed-forward output + residual), or the CPU engine's fused conv/GEMM + residual
# (ResnetBlock2D's conv2, Transformer2DModel's proj_out), which the Conv2d / Linear wraps do not reach.
_BLOCKS = ("BasicTransformerBlock", "Attention", "CLIPEncoderLayer", "ResnetBlock2D", "Transformer2DModel")


def _is_block(m: nn.Module) -> bool:
    return any(c.__name__ in _BLOCKS for c in type(m).__mro__)


def make_batch_invariant(*modules: Any) -> int:
    """Make every Conv2d, GroupNorm and Linear in ``modules`` run per sample; return how many changed.

    Parameters
    ----------
    *modules : nn.Module or None
        Typically the pipeline's ``unet`` and ``vae`` (None entries are skipped).
    """
    n = 0
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if getattr(m, _ATTR, False):
                continue
            if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.Linear)):
                m.forward = types.MethodType(_per_sample_forward, m)
            elif _is_block(m):
                m.forward = types.MethodType(_per_sample_block, m)
            else:
                continue
            setattr(m, _ATTR, True)
            n += 1
    logger.info("sdkern serve: %d Conv2d/GroupNorm/Linear modules run per sample (batch-invariant results)", n)
    return n


def undo_batch_invariant(*modules: Any) -> int:
    """Undo :func:`make_batch_invariant`; return how many modules were restored."""
    n = 0
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if getattr(m, _ATTR, False):
                del m.forward
                delattr(m, _ATTR)
                n += 1
    return n
