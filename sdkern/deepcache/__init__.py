"""DeepCache: reuse the U-Net's deep features across denoising steps.

Every ``interval``-th step (or on a non-uniform schedule, denser near the start) runs the full U-Net
and stores the feature that the chosen shallow up-block receives from the deep part. The steps in
between run only the shallow branch — ``conv_in``, the down blocks above ``layer_id``, the first
``block_id + 1`` sub-blocks of down block ``layer_id``, the tail of the matching up block and
``conv_out`` — and take the deep feature from the cache.

It works by giving the skipped sub-modules an instance-level ``forward`` that either runs the
original (full steps) or returns a placeholder / the cached tensor (shallow steps), so diffusers'
own ``UNet2DConditionModel.forward`` still drives the computation, the module tree and state_dict
are untouched, and disabling restores everything. The cache is a persistent buffer written with
``copy_`` so a CUDA-graph runner can capture one graph for the full pass and one for the shallow
pass (the DeepCache mode is part of the graph signature).

Layout of the shallow branch for a U-Net with ``m`` sub-blocks (resnet[+attention]) per down block:
up block ``U = up_blocks[n-1-layer_id]`` has ``m+1`` sub-blocks; its sub-block ``k`` consumes the
residual of down sub-block ``m-1-k``. With down sub-blocks ``0..block_id`` computed, ``U``'s sub-blocks
``k >= m-1-block_id`` can run; the cache is the output of sub-block ``m-2-block_id`` (or the input of
``U`` when ``block_id = m-1``). ``block_id = m`` is the authors' (horseee/DeepCache) "whole level": down level
``layer_id`` including its downsampler runs, and so does the last sub-block of the next deeper up block (the one
that consumes the downsampler's output) with its upsampler; the cache is that sub-block's input. It is the
``(layer_id + 1, -1)`` branch: nothing of level ``layer_id + 1`` runs.

ControlNet pipelines (``pipe.controlnet``, one ControlNetModel or a MultiControlNetModel): on shallow steps the
ControlNet runs only the blocks whose residuals the shallow branch consumes (the same down sub-blocks as the U-Net);
its other residuals and the mid-block residual are left unconsumed (the U-Net's skipped blocks ignore them). When a
shallow step's conditioning scale is 0 (``controlnet_conditioning_scale=0`` or outside ``control_guidance_start/end``)
no residual is consumed at all and the ControlNet is not run; ``(1, 1, 1, 1)`` zeros are returned (they broadcast).
Full steps run everything, bit-identical to the plain pipeline. (Before, a ControlNet pipeline failed on the first
shallow step: the whole ControlNet's deep residuals do not match the shapes of the skipped U-Net blocks' placeholders.)

img2img / inpainting: the pipeline's ``get_timesteps`` (the strength-shortened timesteps) and the scheduler's
``set_begin_index`` are hooked too, so the schedule is laid over the steps that actually run.
"""

from sdkern.deepcache.api import disable, enable, flops_fraction, state_of
from sdkern.deepcache.schedule import DeepCacheConfig, full_steps, quad_center_steps
from sdkern.deepcache.state import DeepCacheState

__all__ = [
    "DeepCacheConfig",
    "DeepCacheState",
    "disable",
    "enable",
    "flops_fraction",
    "full_steps",
    "quad_center_steps",
    "state_of",
]
