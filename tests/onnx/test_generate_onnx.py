"""``sdkern generate --onnx DIR``: the optimised tiny pipeline on ONNX Runtime vs the torch path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")
pytest.importorskip("PIL")

from sdkern.cli import main
from tests.onnx.helpers import assert_same_images, cuda_only_copy
from tests.onnx.helpers import generate as _generate


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])
def test_onnx_image_matches_torch_image_of_the_same_seed(tiny_dir, tmp_path: Path, scheduler: str) -> None:
    """Same seeds, same CPU-drawn latents, same per-image noise in the ancestral steps.

    Tolerance: at most 1 level of 255 per pixel channel, mean below 0.05 levels. Each ONNX component
    matches PyTorch within 1e-4 relative L2 (test_component_parity_with_pytorch) and the pipeline
    within 1e-3 (test_full_ort_pipeline_matches_torch), far below half a level (2e-3 of the [0, 1]
    range), so a pixel can differ only where its value sits at a rounding boundary of the 8-bit
    quantisation, by one level. Measured here: identical images.
    """
    from PIL import Image

    out, _, _ = tiny_dir
    common = ["--steps", "2", "--seed", "5", "--n-samples", "2", "--scheduler", scheduler]
    common += ["--prompt", "a cat", "--negative-prompt", "a dog"]
    onnx = _generate("--onnx", str(out), *common, "--out", str(tmp_path / "onnx"))
    torch_ = _generate("--preset", "tiny", "--no-patch", *common, "--out", str(tmp_path / "torch"))
    assert (
        [p.name for p in onnx] == [p.name for p in torch_] == ["00000-seed5.png", "00001-seed6.png", "grid-seed5.png"]
    )
    meta = assert_same_images(onnx[:2], torch_[:2], (32, 32, 3))
    assert meta["patched"] == "onnx" and meta["model"] == f"onnx:{out}"
    assert meta["device"] == "CPUExecutionProvider" and meta["dtype"] == "float32"
    assert meta["scheduler"] == scheduler and meta["seed"] == "6" and meta["negative_prompt"] == "a dog"
    with Image.open(onnx[-1]) as im:
        assert im.size == (64, 32) and json.loads(im.text["seeds"]) == [5, 6]


def test_onnx_size_option(tiny_dir, tmp_path: Path) -> None:
    out, _, _ = tiny_dir
    paths = _generate("--onnx", str(out), "--steps", "1", "--height", "48", "--width", "16", "--out", str(tmp_path))
    from PIL import Image

    with Image.open(paths[0]) as im:
        assert im.size == (16, 48)


def test_onnx_errors_are_clear(tiny_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    out, _, _ = tiny_dir

    def fails(*argv: str) -> str:
        assert main(["generate", *argv, "--out", str(tmp_path / "img")]) == 2
        return capsys.readouterr().err

    assert "no such directory" in fails("--onnx", str(tmp_path / "missing"))
    assert "not an ONNX pipeline directory" in fails("--onnx", str(out / "unet"))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "has no CUDAExecutionProvider" in fails("--onnx", str(out), "--provider", "cuda")
    cuda_dir = cuda_only_copy(out, tmp_path / "cuda-dir")
    # default provider = the directory's target (cuda): refused when this onnxruntime lacks it, else runs
    err = fails("--onnx", str(cuda_dir), "--provider", "cpu")
    assert "GroupNorm" in err and "no kernel on CPUExecutionProvider" in err and "--provider cuda" in err
    assert "not used with --onnx" in fails("--onnx", str(out), "--dtype", "float16")
    assert "--provider applies to --onnx only" in fails("--preset", "tiny", "--provider", "cpu")
    assert "not allowed with" in fails("--preset", "tiny", "--onnx", str(out))
    assert not (tmp_path / "img").exists()


def test_fp16_onnx_directory_generates_close_to_torch_fp32(tiny_fp16_dir, tmp_path: Path) -> None:
    """An ``optimize --fp16`` directory on the CPU EP: fp16 latents in, the image of the fp32 torch path.

    Tolerance: at most 4 levels of 255, mean below 0.5. One fp16 U-Net call differs from torch fp32 by
    ~1.5e-3 relative L2 (test_fp16_cpu), about 0.4 of a level on the image scale; a few steps and the fp16
    VAE add to that. Measured here (4 euler-a steps): max 1 level, mean 0.11.
    """
    from PIL import Image

    out = tiny_fp16_dir
    common = ["--steps", "4", "--seed", "5", "--scheduler", "euler-a"]
    onnx = _generate("--onnx", str(out), *common, "--out", str(tmp_path / "onnx"))
    torch_ = _generate("--preset", "tiny", "--no-patch", *common, "--out", str(tmp_path / "torch"))
    with Image.open(onnx[0]) as im:
        assert im.text["dtype"] == "float16"
        got = np.asarray(im, dtype=np.int16)
    diff = np.abs(got - np.asarray(Image.open(torch_[0]), dtype=np.int16))
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())
