"""fp16 inpainting and ControlNet pipelines on ORT's CPU EP: the 8-bit images of the torch fp16 pipeline within one
level (the img2img case: test_pipelines.test_fp16_img2img_within_one_level_of_torch_fp16).

ORT runs fp16 Conv/MatMul on the CPU EP through inserted Casts to fp32 while torch fp16 on the CPU rounds
differently, so the two fp16 paths differ by fp16 noise; one 8-bit level (1/255) is the image-level statement of
"as good as fp16 allows" (torch fp16 vs torch fp32 differ as much: img2img max 1, mean 0.12). Each directory holds
only the components its pipeline runs, to keep the exports short.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
diffusers = pytest.importorskip("diffusers")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(side: int, seed: int) -> torch.Tensor:
    """(1, 3, side, side) in [-1, 1], as the pipelines' image processors take tensors."""
    return torch.rand(1, 3, side, side, generator=_gen(seed)) * 2 - 1


def _fp16_dir(preset: str, components: tuple[str, ...], tmp_path_factory):
    from sdkern.models import build
    from sdkern.onnx import build as onnx_build

    out = tmp_path_factory.mktemp("onnx") / f"{preset}-fp16"
    pipe = build(preset, seed=0)
    onnx_build.optimize_pipeline(pipe, out, target="cpu", fp16=True, use_cache=False, components=components)
    return out


def _load(path):
    from sdkern.onnx import OrtStableDiffusionPipeline

    return OrtStableDiffusionPipeline.from_pretrained(path, provider="CPUExecutionProvider")


def _input_type(path, name: str) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    elem = next(i for i in model.graph.input if i.name == name).type.tensor_type.elem_type
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name


def _levels(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(np.round(got * 255).astype(np.int16) - np.round(ref * 255).astype(np.int16))


def _within_one_level(got: np.ndarray, ref: np.ndarray, fp32: np.ndarray, what: str) -> None:
    levels = _levels(got, ref)
    print(f"{what}: ORT fp16 vs torch fp16 max {levels.max()} mean {levels.mean():.3f} levels; "
          f"torch fp16 vs fp32 max {_levels(ref, fp32).max()} mean {_levels(ref, fp32).mean():.3f}")  # fmt: skip
    assert got.shape == ref.shape and ref.std() > 0.01
    assert levels.max() <= 1 and levels.mean() < 0.5, (what, levels.max(), levels.mean())


@torch.no_grad()
def test_fp16_inpaint_within_one_level_of_torch_fp16(tmp_path_factory):
    from sdkern.models import build

    out = _fp16_dir("tiny-inpaint", ("text_encoder", "unet", "vae_encoder", "vae_decoder"), tmp_path_factory)
    ort = _load(out)
    assert type(ort) is diffusers.StableDiffusionInpaintPipeline
    assert _input_type(out / "unet" / "model.onnx", "sample") == "float16"
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1.0
    # strength < 1: the VAE encoder gives the init-image latents and the masked-image latents
    kw = dict(prompt="a cat", image=_image(32, 3), mask_image=mask, height=32, width=32, strength=0.6,
              num_inference_steps=3, output_type="np")  # fmt: skip
    ref = build("tiny-inpaint", dtype=torch.float16, seed=0)(generator=_gen(4), **kw).images
    fp32 = build("tiny-inpaint", seed=0)(generator=_gen(4), **kw).images
    got = ort(generator=_gen(4), **kw).images
    _within_one_level(got, ref, fp32, "inpaint")


@torch.no_grad()
def test_fp16_controlnet_within_one_level_of_torch_fp16(tmp_path_factory):
    from sdkern.models import build

    out = _fp16_dir("tiny-controlnet", ("text_encoder", "unet", "vae_decoder", "controlnet"), tmp_path_factory)
    ort = _load(out)
    assert type(ort) is diffusers.StableDiffusionControlNetPipeline
    assert ort.controlnet.dtype == torch.float16
    control = (_image(32, 5) + 1) / 2
    kw = dict(prompt="a cat", negative_prompt="a dog", image=control, num_inference_steps=2,
              controlnet_conditioning_scale=0.7, output_type="np")  # fmt: skip
    ref = build("tiny-controlnet", dtype=torch.float16, seed=0)(generator=_gen(1), **kw).images
    fp32 = build("tiny-controlnet", seed=0)(generator=_gen(1), **kw).images
    got = ort(generator=_gen(1), **kw).images
    _within_one_level(got, ref, fp32, "ControlNet")
