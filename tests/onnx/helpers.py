"""Helpers shared by the ONNX tests: CPU sessions with sdkern's library, relative errors, image checks."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np


def session(path: Path):
    """An ORT CPU session of ``path`` with sdkern's custom-op library registered."""
    import onnxruntime as ort

    from sdkern.onnx.pipeline import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def generate(*argv: str) -> list[Path]:
    """Run ``sdkern generate *argv`` in this process; the paths it printed (it must exit 0)."""
    from sdkern.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["generate", *argv])
    assert rc == 0
    return [Path(p) for p in out.getvalue().split()]


def rel(a, b) -> float:
    """Relative L2 error of ``a`` against ``b`` (in float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_same_images(got_paths: list[Path], want_paths: list[Path], shape: tuple[int, ...]) -> dict[str, str]:
    """The PNGs agree within one 8-bit level (mean < 0.05) and are real images; returns the last PNG's text."""
    from PIL import Image

    meta: dict[str, str] = {}
    for po, pt in zip(got_paths, want_paths, strict=True):
        with Image.open(po) as im:
            meta = dict(im.text)
            got = np.asarray(im, dtype=np.int16)
        want = np.asarray(Image.open(pt), dtype=np.int16)
        assert got.shape == want.shape == shape
        diff = np.abs(got - want)
        assert diff.max() <= 1 and diff.mean() < 0.05, (po.name, diff.max(), diff.mean())
        assert want.std() > 1  # a real image, not a constant
    return meta


def cuda_only_copy(src: Path, dst: Path) -> Path:
    """A copy of a CPU directory whose U-Net uses com.microsoft ops, as a --target cuda directory does."""
    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "unet" / "model.onnx"))
    for node in model.graph.node:
        if node.domain == "sdkern":
            node.domain = "com.microsoft"
    onnx.save(model, str(dst / "unet" / "model.onnx"))
    manifest = json.loads((dst / "sdkern_manifest.json").read_text())
    manifest["options"]["target"] = "cuda"
    (dst / "sdkern_manifest.json").write_text(json.dumps(manifest))
    return dst
