"""Fast LoRA load / fuse / unfuse / switch that keeps patched and graph-captured pipelines valid.

LoRA weights are fused *in place* into the existing weight tensors of the U-Net and text
encoder(s): no module is replaced, storage never moves, so sdkern's patched modules (whose fused
QKV/KV projections are views of one tensor) and captured CUDA graphs see the new weights without
recapture. The original weights of every touched layer are kept once (a copy taken before the first
fuse), which makes :func:`unfuse` bit-exact and lets :func:`set_adapters` switch among adapters
without drift: each fuse recomputes ``W = W0 + sum_a weight_a * scale_a * (B_a @ A_a)``.
Updates are batched: targets whose (out, in, rank) agree are fused with one ``bmm`` on the device.

Formats (safetensors only; pickle checkpoints are refused):
- diffusers / PEFT: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (also ``text_encoder.``,
  ``text_encoder_2.``), the older ``<path>.lora.down.weight`` / ``lora.up.weight`` and attention
  processor keys (``...processor.to_q_lora.down.weight``), optional ``<path>.alpha``;
- kohya / A1111: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``lora_up.weight`` /
  ``.alpha`` and ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for the text encoders.
"""

from sdkern.lora.api import delete, fuse, list_adapters, load, set_adapters, unfuse
from sdkern.lora.weights import dense_weight as dense_weight
from sdkern.lora.weights import write_weight as write_weight

list = list_adapters  # the documented name is sdkern.lora.list(pipe)

__all__ = ["delete", "fuse", "list_adapters", "load", "set_adapters", "unfuse"]
