"""PatchConfig: what :func:`sdkern.patch` rewrites and which op implementation the rewrites call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

BACKENDS: tuple[str, ...] = ("auto", "triton", "cuda", "cpu", "reference")


@dataclass
class PatchConfig:
    """Options of :func:`sdkern.patch`.

    Attributes
    ----------
    backend : str
        Which implementation the rewritten modules call:

        - ``"auto"`` (default): the ``torch.ops.sdkern`` ops, which pick the implementation for the
          tensors' device (CPU C++ kernels on CPU; Triton or CUDA C++ on CUDA, in the order of
          ``sdkern.ops.cuda_impl_order()``; the PyTorch reference elsewhere), falling back with one log
          line when one cannot run;
        - ``"cpu"``: the same dispatch as ``"auto"``, spelled for CPU deployments: on a CPU model it runs
          the CPU C++ kernels (with their logged fallback); it sets no CUDA preference, and on a model that
          is not on the CPU it logs a warning and behaves as ``"auto"`` (the tensors' device decides);
        - ``"triton"`` / ``"cuda"``: as ``"auto"``, with that CUDA implementation preferred in the patched
          model's own forward calls (hooks on its root module, removed by :func:`sdkern.unpatch`; other code
          and other models keep their own preference; :mod:`sdkern.patch.preference`);
        - ``"reference"``: the pure-PyTorch references of ``sdkern.ops.reference``, called directly
          (useful to check the rewrite logic apart from the kernels).
    channels_last : bool or None
        Convert the convolution weights of the U-Net and VAE to channels-last (NHWC) so activations
        flow NHWC, which the fused group norms prefer. ``None`` (default) means True on CUDA, True on
        CPU for fp16/bf16 models, False for fp32 models on CPU, False elsewhere. Why not fp32 on CPU:
        PyTorch's oneDNN NHWC fp32 convolution is about 3x faster there but about 4x less accurate than
        the NCHW one (measured rel. L2 vs float64, 320->320 3x3 conv: 6.6e-7 vs 1.8e-7), which breaks
        the "as close to eager as eager is to float64" promise on a full-size SD 1.5 U-Net (2.4e-6 vs
        eager 6.9e-7). Pass ``channels_last=True`` to take the speed.
    group_norm : bool
        ResnetBlock2D norm1+SiLU -> ``group_norm(silu)``, ``h + temb`` + norm2 + SiLU ->
        ``skip_group_norm``, conv_norm_out + SiLU -> ``group_norm(silu)``, and the GroupNorm inside
        VAE attention blocks.
    attention : bool
        diffusers ``Attention`` (U-Net transformer blocks, VAE mid-block) -> an sdkern processor running
        ``sdkern::attention`` on (B, S, H, D) strided views of the projections; transformers'
        ``CLIPAttention`` (text encoders: ``causal=True``) -> ``sdkern::attention`` likewise (a padding
        attention mask runs transformers' attention).
    qkv_fusion : bool
        With ``attention``: one packed QKV (self-attention) or KV (cross-attention) projection. The
        original ``to_q/to_k/to_v`` parameters are re-pointed to views of the packed weight, so there
        is one copy and in-place updates of either stay consistent.
    geglu : bool
        diffusers ``GEGLU`` -> Linear without bias + ``bias_split_gelu``.
    skip_layer_norm : bool
        BasicTransformerBlock residual + norm2 / norm3 and CLIP encoder residual + layer_norm2 ->
        ``skip_layer_norm``; every other affine ``nn.LayerNorm`` (CLIP layer_norm1 / final_layer_norm,
        the blocks' norm1) -> ``skip_layer_norm`` with ``skip=None``.
    bias_add : bool
        Feed-forward last Linear bias + residual (BasicTransformerBlock, CLIP MLP) -> Linear without
        bias + ``bias_add``.
    cpu_engine : bool or None
        Run every ``nn.Conv2d`` and ``nn.Linear`` of a CPU model (float32 or bfloat16) on oneDNN
        primitives whose weights are reordered once at patch time, with bias and residual adds fused
        into them and activations kept channels-last end to end (:mod:`sdkern.patch.cpu_engine`).
        ``None`` (default) means on for CPU models in float32/bfloat16, off elsewhere. While patched,
        the engine's weights are frozen (``requires_grad=False``, opaque until :func:`sdkern.unpatch`);
        pass ``cpu_engine=False`` to fine-tune a patched model.
    winograd : bool
        With the CPU engine: float32 3x3 stride-1 convolutions with at least 640 input and output channels
        run as Winograd F(2x2, 3x3) (2.25x fewer multiplies; per convolution 1.2-1.6x faster than the
        prepacked direct one on those shapes and slightly more accurate, but only +0-3 % on a whole SD1.5 step
        with 2 threads while its transforms were torch ops; they are fused C++ kernels now, see
        :mod:`sdkern.patch.winograd`). Off by default: the transformed filters are held
        next to the original weights (+~3.6 GB on an SD1.5 U-Net).
    dtype : torch.dtype or None
        Run every patched component in this floating dtype (e.g. ``torch.bfloat16`` on an fp32
        pipeline): weights converted once at patch time, floating inputs cast in and outputs cast back
        to the caller's dtype at each component's ``forward`` (:mod:`sdkern.patch.dtype`). The original
        weights are kept for an exact :func:`sdkern.unpatch` (fp32 -> bf16 holds 1.5x the weights).
    cuda_graphs : bool
        Run the U-Net forward, VAE decode and text encoder(s) through :mod:`sdkern.runtime.graphs`:
        one captured CUDA graph per input signature (bounded LRU), replayed with static buffers;
        eager on non-CUDA devices and under autograd; freed by :func:`unpatch`.
    deepcache : DeepCacheConfig, dict or None
        Enable :mod:`sdkern.deepcache` on the U-Net (with graphs: one graph for the full pass and one
        for the shallow pass).
    """

    backend: str = "auto"
    channels_last: bool | None = None
    group_norm: bool = True
    attention: bool = True
    qkv_fusion: bool = True
    geglu: bool = True
    skip_layer_norm: bool = True
    bias_add: bool = True
    cpu_engine: bool | None = None
    winograd: bool = False
    dtype: torch.dtype | None = None
    cuda_graphs: bool = False
    deepcache: Any = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"PatchConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"PatchConfig.dtype must be a floating torch.dtype or None, got {self.dtype!r}")

    def replace(self, **overrides: Any) -> PatchConfig:
        """A copy with ``overrides`` applied (unknown names raise ``TypeError``)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown PatchConfig field(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def use_cpu_engine(self, device_type: str, dtype: torch.dtype) -> bool:
        """Whether the CPU engine applies to a module on ``device_type`` whose weights are ``dtype``."""
        if self.cpu_engine is None:
            return device_type == "cpu" and dtype in (torch.float32, torch.bfloat16) and self.backend != "reference"
        return bool(self.cpu_engine) and device_type == "cpu"

    def use_channels_last(self, device_type: str, dtype: torch.dtype = torch.float16) -> bool:
        """Whether channels-last applies to a module on ``device_type`` whose weights are ``dtype``."""
        if self.channels_last is None:
            return device_type == "cuda" or (device_type == "cpu" and dtype != torch.float32)
        return bool(self.channels_last)
