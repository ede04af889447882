"""``sdkern generate`` beyond txt2img, end to end on the tiny presets (issue 22, CLI): img2img, inpainting, ControlNet
and the safety checker give the images of the same (patched) diffusers call with the same seeds, and every wrong
input is one error line with the command's exit status (1: a file that cannot be read, 2: a bad argument)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

import torch
from PIL import Image

from sdkern.cli import main

PROMPT = "a photo of a cat"
SIZE = 64  # output side; the tiny VAE downsamples by 2 (32x32 latents)
STEPS = 1  # img2img at strength 0.5 then runs no step: its tests give 2


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((SIZE, SIZE), Image.BILINEAR).save(d / "init.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[::2, ::2]).save(d / "mask_half.png")  # same aspect ratio: resized (nearest) to 64x64
    Image.fromarray(np.zeros((48, SIZE), np.uint8)).save(d / "mask_wide.png")  # another aspect ratio: refused
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(d / "mask_colour.png")
    Image.new("CMYK", (SIZE, SIZE)).save(d / "mask_cmyk.jpg")
    edges = (rng.random((SIZE, SIZE)) > 0.9).astype(np.uint8) * 255
    Image.fromarray(edges).convert("RGB").save(d / "edges.png")
    Image.fromarray(255 - edges).convert("RGB").save(d / "edges_inv.png")
    (d / "not_an_image.png").write_text("plain text")
    (d / "truncated.png").write_bytes((d / "init.png").read_bytes()[:200])
    return {p.stem: p for p in d.iterdir()}


def _run(argv: list[str], progress: bool = False) -> tuple[int, list[Path]]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(
            ["generate", "--steps", str(STEPS), "--prompt", PROMPT, *([] if progress else ["--no-progress"]), *argv]
        )
    return rc, [Path(p) for p in out.getvalue().split()]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _library(preset: str, kind: str, seeds: list[int], steps: int = STEPS, **call: Any) -> list[np.ndarray]:
    """The same run written with the library: the preset, the diffusers pipeline of ``kind``, DDIM,
    ``sdkern.patch``, one CPU generator per image."""
    import diffusers

    import sdkern
    from sdkern import models
    from sdkern.generate import set_scheduler

    pipe = models.build(preset)
    if kind == "img2img":
        pipe = diffusers.AutoPipelineForImage2Image.from_pipe(pipe)
    elif kind == "controlnet" and "controlnet" not in pipe.components:
        raise AssertionError(preset)
    elif kind.startswith("controlnet-"):  # preset + the tiny-controlnet preset's ControlNet, as --controlnet does
        cn = models.build("tiny-controlnet").controlnet  # the weights --controlnet tiny-controlnet loads
        cls = {
            "controlnet-img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
            "controlnet-inpaint": diffusers.StableDiffusionControlNetInpaintPipeline,
        }[kind]
        pipe = cls.from_pipe(pipe, controlnet=cn)
    set_scheduler(pipe, "ddim")
    sdkern.patch(pipe)
    with torch.inference_mode():
        result = pipe(
            prompt=[PROMPT] * len(seeds),
            num_inference_steps=steps,
            guidance_scale=7.5,
            eta=0.0,
            generator=[torch.Generator("cpu").manual_seed(x) for x in seeds],
            output_type="pil",
            **call,
        )
    return [np.asarray(im) for im in result.images]


def test_img2img_equals_the_library_call(tmp_path: Path, images: dict[str, Path]) -> None:
    """Strength 0.6 of 2 steps: one denoising step from the noised init image."""
    args = "--preset tiny --strength 0.6 --steps 2 --seed 3 --n-samples 2".split()
    rc, paths = _run([*args, "--init-image", str(images["init"]), "--out", str(tmp_path / "o")])
    assert rc == 0 and len(paths) == 3
    init = Image.open(images["init"]).convert("RGB")
    want = _library("tiny", "img2img", [3, 4], steps=2, image=[init, init], strength=0.6)
    for path, w in zip(paths[:2], want, strict=True):
        got = _pixels(path)
        assert got.shape == (SIZE, SIZE, 3)
        assert np.array_equal(got, w), np.abs(got.astype(int) - w).max()
    assert not np.array_equal(want[0], want[1])  # per-image seeds
    with Image.open(paths[0]) as im:
        meta = im.text
    assert meta["pipeline"] == "img2img" and meta["strength"] == "0.6" and meta["patched"] == "yes"
    assert meta["init_image"] == str(images["init"]) and meta["seed"] == "3"
    assert "Denoising strength: 0.6" in meta["parameters"]


def test_inpaint_equals_the_library_call_and_resizes_a_smaller_mask(
    tmp_path: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    files = ["--init-image", str(images["init"]), "--mask", str(images["mask_half"]), "--out", str(tmp_path / "o")]
    rc, paths = _run(["--preset", "tiny-inpaint", "--seed", "5", *files], progress=True)
    assert rc == 0
    err = capsys.readouterr().err
    assert "32x32 resized to the init image's 64x64 (nearest)" in err
    assert "sdkern generate" in err and "1/1 " in err  # diffusers' per-step bar
    # the 32x32 mask resized by nearest neighbour is exactly the 64x64 one
    init = Image.open(images["init"]).convert("RGB")
    mask = Image.open(images["mask"]).convert("L")
    want = _library("tiny-inpaint", "inpaint", [5], image=[init], mask_image=[mask], height=SIZE, width=SIZE)
    assert np.array_equal(_pixels(paths[0]), want[0])
    with Image.open(paths[0]) as im:
        assert im.text["pipeline"] == "inpaint" and im.text["strength"] == "1.0"  # diffusers' inpainting default
        assert im.text["mask"] == str(images["mask_half"])


def test_controlnet_equals_the_library_call(tmp_path: Path, images: dict[str, Path]) -> None:
    """``--preset tiny --controlnet tiny-controlnet`` is the ``tiny-controlnet`` preset's pipeline: same U-Net,
    same ControlNet weights (that the control image moves the output: tests of the presets and the patch)."""
    files = ["--control-image", str(images["edges"]), "--out", str(tmp_path / "o")]
    rc, paths = _run(["--preset", "tiny", "--seed", "1", "--controlnet", "tiny-controlnet", *files])
    assert rc == 0
    edges = Image.open(images["edges"]).convert("RGB")
    want = _library("tiny-controlnet", "controlnet", [1], image=edges, height=SIZE, width=SIZE)
    got = _pixels(paths[0])
    assert np.array_equal(got, want[0])
    with Image.open(paths[0]) as im:
        meta = im.text
    assert meta["pipeline"] == "controlnet" and meta["controlnet"] == "tiny-controlnet"
    assert meta["control_image"] == str(images["edges"]) and "ControlNet: tiny-controlnet" in meta["parameters"]


def test_controlnet_img2img_equals_the_library_call(tmp_path: Path, images: dict[str, Path]) -> None:
    """ControlNet with an init image: diffusers' ControlNet img2img pipeline, the control image steering it."""
    args = "--preset tiny --controlnet tiny-controlnet --strength 0.6 --steps 2 --seed 2 --n-samples 2".split()
    files = ["--init-image", str(images["init"]), "--control-image", str(images["edges"])]
    rc, paths = _run([*args, *files, "--out", str(tmp_path / "o")])
    assert rc == 0 and len(paths) == 3
    init = Image.open(images["init"]).convert("RGB")
    edges = Image.open(images["edges"]).convert("RGB")
    call = {"image": [init, init], "control_image": [edges, edges], "strength": 0.6, "height": SIZE, "width": SIZE}
    want = _library("tiny", "controlnet-img2img", [2, 3], steps=2, **call)
    for path, w in zip(paths[:2], want, strict=True):
        assert np.array_equal(_pixels(path), w), np.abs(_pixels(path).astype(int) - w).max()
    plain = _library("tiny", "img2img", [2, 3], steps=2, image=[init, init], strength=0.6)
    assert not np.array_equal(want[0], plain[0])  # the ControlNet is not a no-op here
    with Image.open(paths[0]) as im:
        meta = im.text
    assert meta["pipeline"] == "controlnet-img2img" and meta["strength"] == "0.6"
    assert meta["control_image"] == str(images["edges"]) and meta["init_image"] == str(images["init"])


def test_controlnet_inpaint_equals_the_library_call(tmp_path: Path, images: dict[str, Path]) -> None:
    """ControlNet with an init image and a mask on the 9-channel inpainting U-Net."""
    files = ["--init-image", str(images["init"]), "--mask", str(images["mask"])]
    args = ["--preset", "tiny-inpaint", "--controlnet", "tiny-controlnet", "--seed", "4", *files]
    args += ["--control-image", str(images["edges"])]
    rc, paths = _run([*args, "--out", str(tmp_path / "o")])
    assert rc == 0
    init = Image.open(images["init"]).convert("RGB")
    mask = Image.open(images["mask"]).convert("L")
    edges = Image.open(images["edges"]).convert("RGB")
    call = {"image": [init], "mask_image": [mask], "control_image": [edges], "height": SIZE, "width": SIZE}
    want = _library("tiny-inpaint", "controlnet-inpaint", [4], **call)
    assert np.array_equal(_pixels(paths[0]), want[0])
    with Image.open(paths[0]) as im:
        assert im.text["pipeline"] == "controlnet-inpaint" and im.text["strength"] == "1.0"


def _max_concept_cosine(checker: Any, extractor: Any, image: np.ndarray) -> float:
    """The largest cosine similarity of ``image`` to the checker's concept embeddings (what it thresholds)."""
    clip_input = extractor([Image.fromarray(image)], return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        cos = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(checker.concept_embeds).T
    return float(cos.max())


def test_safety_checker_blacks_out_what_it_flags(
    tmp_path: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """diffusers' safety checker with random weights. With diffusers' initial thresholds (1.0, above every cosine
    similarity: a preset's checker) nothing is flagged and the images are those of a run without it. Then the same
    model saved with its concept thresholds (weights of the module, as in the published checker) set between the
    two images' scores: exactly the image whose similarity exceeds them is flagged, written black with a notice,
    the other unchanged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from sdkern import models

    small = ["--seed", "11", "--n-samples", "2", "--height", "32", "--width", "32"]
    rc, preset_checked = _run(["--preset", "tiny", "--safety-checker", *small, "--out", str(tmp_path / "preset")])
    assert rc == 0
    model = tmp_path / "tiny-with-checker"
    pipe = models.build("tiny", safety_checker=True)
    pipe.save_pretrained(model)
    args = ["--model", str(model), *small]
    rc, plain = _run([*args, "--out", str(tmp_path / "plain")])
    assert rc == 0
    unchecked = [_pixels(p) for p in plain[:2]]
    for path, im in zip(preset_checked[:2], unchecked, strict=True):  # the saved model has the preset's weights
        assert np.array_equal(_pixels(path), im)
        with Image.open(path) as f:
            assert f.text["nsfw_flagged"] == "false" and f.text["safety_checker"] == "on"
    assert "flagged" not in capsys.readouterr().err

    scores = [_max_concept_cosine(pipe.safety_checker, pipe.feature_extractor, im) for im in unchecked]
    assert max(scores) < 1.0 and abs(scores[0] - scores[1]) > 0.01, scores  # room for a threshold (rounded to 1e-3)
    checker = StableDiffusionSafetyChecker.from_pretrained(model / "safety_checker")
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(sum(scores) / 2)
        checker.special_care_embeds_weights.fill_(1.0)  # cosines stay below 1: no special-care adjustment
    checker.save_pretrained(model / "safety_checker")
    rc, checked = _run([*args, "--safety-checker", "--out", str(tmp_path / "checked")])
    assert rc == 0
    err = capsys.readouterr().err
    flagged = [s > sum(scores) / 2 for s in scores]
    assert sorted(flagged) == [False, True]
    for path, im, flag in zip(checked[:2], unchecked, flagged, strict=True):
        got = _pixels(path)
        with Image.open(path) as f:
            assert json.loads(f.text["nsfw_flagged"]) is flag and f.text["safety_checker"] == "on"
            seed = f.text["seed"]
        if flag:
            assert not got.any() and f"{path.name} (seed {seed}) was flagged by the safety checker" in err
        else:
            assert np.array_equal(got, im) and path.name not in err


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--init-image", "{d}/missing.png"], 1, "--init-image {d}/missing.png: no such file"),
        (["--init-image", "{d}"], 1, "is a directory"),
        (["--init-image", "{not_an_image}"], 1, "not an image file"),
        (["--init-image", "{truncated}"], 1, "cannot read the image"),
        (["--control-image", "{d}/missing.png", "--controlnet", "tiny-controlnet"], 1, "no such file"),
        (["--init-image", "{init}", "--strength", "0"], 2, "expected a number in (0, 1], got 0.0"),
        (["--init-image", "{init}", "--strength", "1.5"], 2, "(0, 1]"),
        (["--init-image", "{init}", "--strength", "nan"], 2, "finite"),
        (["--strength", "0.5"], 2, "--strength applies with --init-image"),
        (["--mask", "{mask}"], 2, "--mask needs --init-image"),
        (["--init-image", "{init}", "--mask", "{mask}"], 2, "--mask needs an inpainting model"),
        (["--preset", "tiny-inpaint", "--init-image", "{init}", "--mask", "{mask_colour}"], 2, "colour pixels"),
        (["--preset", "tiny-inpaint", "--init-image", "{init}", "--mask", "{mask_cmyk}"], 2, "mode CMYK"),
        (["--preset", "tiny-inpaint", "--init-image", "{init}", "--mask", "{mask_wide}"], 2, "refused (not resized)"),
        (["--preset", "tiny-inpaint", "--init-image", "{init}"], 2, "inpainting model"),
        (["--preset", "tiny-controlnet"], 2, "give --control-image"),
        (["--control-image", "{edges}"], 2, "--control-image needs a ControlNet"),
        (["--controlnet", "tiny-controlnet"], 2, "--controlnet needs --control-image"),
        (["--controlnet", "nowhere", "--control-image", "{edges}"], 2, "neither a directory nor a ControlNet preset"),
        (["--controlnet", "sd15-controlnet", "--control-image", "{edges}"], 2, "made for another U-Net"),
        (
            [
                "--controlnet",
                "tiny-controlnet",
                "--control-image",
                "{edges}",
                *["--init-image", "{init}"],
                "--mask",
                "{mask}",
            ],
            2,
            "--mask needs an inpainting model",
        ),
        (["--preset", "tiny-controlnet", "--init-image", "{init}"], 2, "give --control-image"),
        (["--preset", "sdxl", "--safety-checker"], 2, "SDXL"),
    ],
)
def test_bad_inputs_are_one_line_errors(
    extra: list[str], status: int, message: str, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each is found before a model is built (a cheap run even for sd15 or sdxl)."""
    names = {k: str(v) for k, v in images.items()} | {"d": str(images["init"].parent)}
    argv = [a.format(**names) for a in extra]
    if "--preset" not in argv:
        argv = ["--preset", "tiny", *argv]
    assert main(["generate", "--out", str(images["init"].parent / "out"), *argv]) == status
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("sdkern generate: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message.format(**names) in lines[0]


def test_onnx_refuses_the_image_options(images: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--onnx", "x", "--init-image", str(images["init"])]) == 2
    assert "not with --onnx" in capsys.readouterr().err


@pytest.mark.parametrize("pipeline", ["img2img", "inpaint", "controlnet"])
def test_bench_pipeline(pipeline: str, tmp_path: Path) -> None:
    """Each engine runs the chosen pipeline on the preset's variant (tiny-inpaint, tiny-controlnet); sdkern's
    images stay at eager's (fp32); an engine that cannot run it says why (ONNX Runtime's U-Net has no ControlNet
    inputs) instead of failing. txt2img: tests/cli/test_cli.py."""
    engines = "eager,sdkern,ort" if pipeline == "controlnet" else "eager,sdkern"
    argv = ["bench", "--preset", "tiny", "--height", "32", "--width", "32", "--steps", "1", "--batch-count", "1"]
    argv += ["--no-progress", "--no-roofline", "--engines", engines, "--pipeline", pipeline]
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main([*argv, "--json", str(tmp_path / "r.json")])
    assert rc == 0, out.getvalue()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["settings"]["pipeline"] == pipeline
    rows = {r["engine"]: r for r in doc["results"]}
    for name in ("eager", "sdkern"):
        assert rows[name]["status"] == "ok" and rows[name]["pipeline"] == pipeline, rows[name]["status"]
    assert rows["eager"]["max_abs_diff_vs_eager"] == 0.0
    assert 0 <= rows["sdkern"]["max_abs_diff_vs_eager"] < 1e-4
    if pipeline == "controlnet":
        assert rows["ort"]["status"] == (
            "skipped: ort does not run controlnet pipelines (the exported U-Net has no inputs for the ControlNet's "
            "residuals)"
        )
        assert "skipped: ort does not run controlnet" in out.getvalue()  # the table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "sd21", "--pipeline", "inpaint"], "preset sd21 has no inpaint variant"),
        (["--preset", "sdxl", "--pipeline", "controlnet"], "preset sdxl has no controlnet variant"),
        (["--pipeline", "outpaint"], "invalid choice"),
    ],
)
def test_bench_pipeline_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--engines", "eager", *argv]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_sdkern_warnings_reach_stderr_without_v(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Notices such as a resized mask or a flagged image are warnings of the "sdkern" logger: shown without -v as
    their message alone (no traceback of a logged exception), and the handler is gone after the command."""
    import logging

    from sdkern.apps.cli import commands as cli

    def noisy(args: Any) -> int:
        log = logging.getLogger("sdkern")
        log.info("sdkern: an info line")
        log.warning("sdkern: a notice")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("sdkern: a logged failure")
        return 0

    monkeypatch.setattr(cli, "_cmd_info", noisy)
    handlers = list(logging.getLogger("sdkern").handlers)
    assert main(["info"]) == 0
    err = capsys.readouterr().err
    assert "sdkern: a notice" in err and "sdkern: a logged failure" in err
    assert "info line" not in err and "Traceback" not in err and "boom" not in err
    assert logging.getLogger("sdkern").handlers == handlers
