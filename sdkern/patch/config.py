"""PatchConfig: what :func:`sdkern.patch` rewrites and which op implementation the rewrites call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

BACKENDS: tuple[str, ...] = ("auto", "triton", "cuda", "cpu", "reference")


@dataclass
class PatchConfig:
    """Options of :func:`sdkern.patch`.

    Attributes
    ----------
    backend : str
        Which implementation the rewritten modules call:

        - ``"auto"`` (default) and ``"cpu"``: the ``torch.ops.sdkern`` ops, which pick the implementation
          for the tensors' device (CPU C++ kernels on CPU; Triton or CUDA C++ on CUDA; the PyTorch
          reference elsewhere), falling back with one log line when one cannot run;
        - ``"triton"`` / ``"cuda"``: as ``"auto"``, with that CUDA implementation preferred
          (``sdkern.ops.set_cuda_impl``; process-wide);
        - ``"reference"``: the pure-PyTorch references of ``sdkern.ops.reference``, called directly
          (useful to check the rewrite logic apart from the kernels).
    channels_last : bool or None
        Convert the convolution weights of the U-Net and VAE to channels-last (NHWC) so activations
        flow NHWC, which the fused group norms prefer. ``None`` (default) means True on CUDA and CPU
        devices and False elsewhere.
    group_norm : bool
        ResnetBlock2D norm1+SiLU -> ``group_norm(silu)``, ``h + temb`` + norm2 + SiLU ->
        ``skip_group_norm``, conv_norm_out + SiLU -> ``group_norm(silu)``, and the GroupNorm inside
        VAE attention blocks.
    attention : bool
        diffusers ``Attention`` (U-Net transformer blocks, VAE mid-block) -> an sdkern processor running
        ``sdkern::attention`` on (B, S, H, D) strided views of the projections.
    qkv_fusion : bool
        With ``attention``: one packed QKV (self-attention) or KV (cross-attention) projection. The
        original ``to_q/to_k/to_v`` parameters are re-pointed to views of the packed weight, so there
        is one copy and in-place updates of either stay consistent.
    geglu : bool
        diffusers ``GEGLU`` -> Linear without bias + ``bias_split_gelu``.
    skip_layer_norm : bool
        BasicTransformerBlock residual + norm2 / norm3 and CLIP encoder residual + layer_norm2 ->
        ``skip_layer_norm``.
    bias_add : bool
        Feed-forward last Linear bias + residual (BasicTransformerBlock, CLIP MLP) -> Linear without
        bias + ``bias_add``.
    cuda_graphs : bool
        Capture the U-Net in CUDA graphs. Not implemented yet (the runtime issue adds it); True raises
        ``NotImplementedError``.
    deepcache : Any
        DeepCache configuration (a later issue); must be None for now.
    """

    backend: str = "auto"
    channels_last: bool | None = None
    group_norm: bool = True
    attention: bool = True
    qkv_fusion: bool = True
    geglu: bool = True
    skip_layer_norm: bool = True
    bias_add: bool = True
    cuda_graphs: bool = False
    deepcache: Any = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"PatchConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    def replace(self, **overrides: Any) -> PatchConfig:
        """A copy with ``overrides`` applied (unknown names raise ``TypeError``)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown PatchConfig field(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def use_channels_last(self, device_type: str) -> bool:
        """Whether channels-last applies to modules on ``device_type``."""
        if self.channels_last is None:
            return device_type in ("cuda", "cpu")
        return bool(self.channels_last)
