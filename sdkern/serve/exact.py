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
  (one row per sample) gave other last bits for 8 rows than for 2 rows of the same values.

sdkern's attention (per sample and head), LayerNorm and the elementwise scheduler arithmetic were
measured batch-invariant.

:func:`make_batch_invariant` therefore runs every ``nn.Conv2d``, ``nn.GroupNorm`` and ``nn.Linear`` module of the given
modules one sample at a time (the same N=1 shape whatever the batch, so the same kernel and summation
order) and concatenates the results; everything else keeps running batched. It is reversible with
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
            if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.Linear)) and not getattr(m, _ATTR, False):
                m.forward = types.MethodType(_per_sample_forward, m)
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
