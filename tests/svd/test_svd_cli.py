"""sdkern generate --frames / bench --pipeline svd on tiny-svd, end to end (in process), and the SVD presets."""

from __future__ import annotations

import json
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image

from sdkern import models
from sdkern.cli import main


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def init_image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


GEN = ("generate", "--preset", "tiny-svd", "--frames", "3", "--steps", "2", "--seed", "5")


def test_generate_video_end_to_end(tmp_path: Path, init_image: Path) -> None:
    rc, out, err = _run(*GEN, "--init-image", str(init_image), "--out", str(tmp_path / "a"))
    assert rc == 0, err
    paths = [Path(p) for p in out.split()]
    frames, anim = paths[:-1], paths[-1]
    assert [p.name for p in frames] == ["frame_000.png", "frame_001.png", "frame_002.png"]
    assert anim.suffix in (".webp", ".gif") and anim.is_file()
    with Image.open(anim) as im:
        assert im.is_animated and im.n_frames == 3 and im.size == (32, 32)
    with Image.open(frames[1]) as im:
        meta = im.text
    assert meta["frame"] == "1" and meta["frames"] == "3" and meta["seed"] == "5" and meta["patched"] == "yes"
    assert "step" in err  # diffusers' per-step progress bar
    # the unpatched run (same seed) gives the same video within one level
    rc, out3, _ = _run(*GEN, "--init-image", str(init_image), "--out", str(tmp_path / "c"), "--no-patch")
    assert rc == 0
    a = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in frames])
    c = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in out3.split()[:-1]])
    assert np.abs(a - c).max() <= 1


@pytest.mark.parametrize(
    ("extra", "rc", "message"),
    [
        (("--init-image", "{tmp}/missing.png"), 1, "--init-image {tmp}/missing.png: no such file"),
        (("--init-image", "{tmp}/bad.png"), 1, "--init-image {tmp}/bad.png: not an image Pillow can read"),
        (("--init-image", "{tmp}"), 1, "is a directory, not an image"),
        ((), 2, "image-to-video needs the conditioning image: --init-image PATH"),
        (("--init-image", "{tmp}/in.png", "--preset", "tiny"), 2, "--frames needs an image-to-video preset"),
        (("--init-image", "{tmp}/in.png", "--n-samples", "2"), 2, "one video per run"),
    ],
    ids=["missing", "unreadable", "directory", "no-image", "not-svd", "n-samples"],
)
def test_generate_video_errors(tmp_path: Path, init_image: Path, extra: tuple[str, ...], rc: int, message: str) -> None:
    (tmp_path / "bad.png").write_text("not an image")
    argv = [a.format(tmp=tmp_path) for a in (*GEN, *extra, "--out", str(tmp_path / "o"))]
    got, _, err = _run(*argv)
    assert got == rc
    last = err.strip().splitlines()[-1]
    assert last.startswith("sdkern generate: error: ") and message.format(tmp=tmp_path) in last
    assert not (tmp_path / "o").exists()  # nothing written


def test_bench_pipeline_svd(tmp_path: Path) -> None:
    argv = ["bench", "--pipeline", "svd", "--preset", "tiny-svd", "--frames", "2", "--steps", "2"]
    argv += [
        "--height",
        "32",
        "--width",
        "32",
        "--batch-count",
        "1",
        "--no-progress",
        "--json",
        str(tmp_path / "r.json"),
    ]
    rc, out, err = _run(*argv)
    assert rc == 0, err
    assert out.splitlines()[0].split() == ["engine", "median_s", "vs_eager", "max_diff", "status"]
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["engine"] for r in rows] == ["eager", "sdkern"] and all(r["status"] == "ok" for r in rows)
    assert rows[1]["frames"] == 2 and 0 <= rows[1]["max_abs_diff_vs_eager"] < 1e-3
    rc, _, err = _run("bench", "--pipeline", "svd", "--preset", "tiny")
    assert rc == 2 and "--pipeline svd needs --preset svd or tiny-svd" in err


def test_svd_parameter_counts_on_meta() -> None:
    # stabilityai/stable-video-diffusion-img2vid(-xt): U-Net 1,524,623,082 parameters (the published fp16 U-Net,
    # 3.05 GB = 2 bytes each); temporal VAE 97.74M (196 MB fp16); image encoder OpenCLIP ViT-H/14 vision with
    # projection 632.08M (1.26 GB fp16).
    unet = models.build_component("svd", "unet", device="meta")
    assert type(unet).__name__ == "UNetSpatioTemporalConditionModel"
    assert models.count_parameters(unet) == models.PRESETS["svd"].known_unet_params == 1_524_623_082
    # nothing allocated but AlphaBlender's 1-element mix_factor (diffusers makes it with torch.Tensor([alpha]),
    # which ignores the device context)
    assert all(p.is_meta for n, p in unet.named_parameters() if not n.endswith("time_mixer.mix_factor"))
    vae = models.build_component("svd", "vae", device="meta")
    assert type(vae).__name__ == "AutoencoderKLTemporalDecoder" and models.count_parameters(vae) == 97_742_847
    enc = models.build_component("svd", "image_encoder", device="meta")
    assert models.count_parameters(enc) / 1e6 == pytest.approx(632.08, abs=0.01)


def test_tiny_svd_pipeline_is_deterministic() -> None:
    a, b, c = models.build("tiny-svd", seed=3), models.build("tiny-svd", seed=3), models.build("tiny-svd", seed=4)
    assert type(a).__name__ == "StableVideoDiffusionPipeline"
    assert (
        type(a.scheduler).__name__ == "EulerDiscreteScheduler" and a.scheduler.config.prediction_type == "v_prediction"
    )
    assert type(a.feature_extractor).__name__.startswith("CLIPImageProcessor")
    for comp in ("unet", "vae", "image_encoder"):
        sa, sb, sc = (getattr(p, comp).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), comp
        assert all(torch.isfinite(v).all() for v in sa.values()), comp
    with pytest.raises(ValueError, match="'unet', 'vae' or 'image_encoder'"):
        models.build_component("tiny-svd", "text_encoder", device="meta")
