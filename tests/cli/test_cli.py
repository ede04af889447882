"""The sdkern command on the tiny preset: bench outputs, generate determinism, argument errors."""

from __future__ import annotations

import csv
import io
import json
import math
import types
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")

from sdkern.bench.report import COLUMNS, ORT_COLUMNS, TABLE_COLUMNS, TABLE_HEADERS  # noqa: E402
from sdkern.cli import main  # noqa: E402

TINY_BENCH = [
    "bench",
    "--preset",
    "tiny",
    "--height",
    "32",
    "--width",
    "32",
    "--steps",
    "2",
    "--batch-count",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    d = tmp_path_factory.mktemp("bench")
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(
            [
                *TINY_BENCH,
                "--engines",
                "eager,sdkern",
                "--json",
                str(d / "r.json"),
                "--csv",
                str(d / "r.csv"),
                "--plot",
                str(d / "r.png"),
            ]
        )
    return rc, out.getvalue(), d


def test_bench_json_schema(bench_run: tuple[int, str, Path]) -> None:
    rc, _, d = bench_run
    assert rc == 0
    doc = json.loads((d / "r.json").read_text())
    assert {"environment", "settings", "results", "wall_s"} <= doc.keys()
    assert doc["settings"]["preset"] == "tiny" and doc["settings"]["steps"] == 2
    rows = {r["engine"]: r for r in doc["results"]}
    assert list(rows) == ["eager", "sdkern"]
    eager = rows["eager"]
    for col in ORT_COLUMNS:
        assert col in eager, col
    assert eager["status"] == "ok" and eager["pipeline"] == "txt2img" and doc["settings"]["pipeline"] == "txt2img"
    assert (eager["height"], eager["width"], eager["steps"], eager["batch_size"]) == (32, 32, 2, 1)
    assert len(eager["latencies"]) == 2 and all(t > 0 for t in eager["latencies"])
    assert eager["average_latency"] == pytest.approx(sum(eager["latencies"]) / 2)
    assert min(eager["latencies"]) <= eager["median_latency"] <= max(eager["latencies"])
    assert eager["first_call_s"] > 0 and eager["unet_steps_per_s"] > 0
    assert eager["first_run_memory_MB"] > 10 and eager["second_run_memory_MB"] > 10  # process RSS peak on CPU
    # The eager first call is the reference of the diff column; eager's own value is its run-to-run difference
    # (first call vs first timed call), exactly 0 for deterministic CPU kernels.
    assert eager["max_abs_diff_vs_eager"] == 0.0
    # sdkern either ran (its diff to eager is small) or says why it was skipped; never a silent blank.
    sk = rows["sdkern"]
    assert sk["status"] == "ok" or sk["status"].startswith("skipped:")
    if sk["status"] == "ok":
        assert sk["max_abs_diff_vs_eager"] < 1e-2


def test_bench_ort_engines_agree_with_eager(tmp_path: Path) -> None:
    """Both ONNX Runtime engines run the tiny preset on CPU and match eager.

    Bound 1e-3 (images in [0, 1]): both run fp32 and differ from eager only in summation order; the
    U-Net alone matches within 1e-4 relative (tests/onnx), two steps do not amplify that past 1e-3.
    """
    pytest.importorskip("onnxruntime")
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main([*TINY_BENCH, "--engines", "eager,ort,ort-sdkern", "--json", str(tmp_path / "r.json")])
    rows = {r["engine"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert rc == 0, out.getvalue()
    assert list(rows) == ["eager", "ort", "ort-sdkern"]
    for name in ("ort", "ort-sdkern"):
        assert rows[name]["status"] == "ok", rows[name]["status"]
        assert rows[name]["max_abs_diff_vs_eager"] < 1e-3, (name, rows[name]["max_abs_diff_vs_eager"])
        assert rows[name]["version"].startswith("onnxruntime")
    assert rows["ort"]["provider"] != rows["ort-sdkern"]["provider"]


def test_ort_engines_say_why_they_cannot_run() -> None:
    import torch

    from sdkern.bench.engines import all_engines

    engines = all_engines()
    pipe = types.SimpleNamespace(unet=types.SimpleNamespace(dtype=torch.bfloat16))
    assert "float32 or float16" in engines["ort"].available(pipe, torch.device("cpu"))
    pipe.unet.dtype = torch.float16
    assert engines["ort"].available(pipe, torch.device("cpu")) is None
    assert "CPU execution provider only" in engines["ort-sdkern"].available(pipe, torch.device("cuda"))
    assert "not on mps" in engines["ort"].available(pipe, torch.device("mps"))


def test_bench_csv_and_table(bench_run: tuple[int, str, Path]) -> None:
    _, text, d = bench_run
    with open(d / "r.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        rows = list(reader)
    assert [r["engine"] for r in rows] == ["eager", "sdkern"]
    assert math.isfinite(float(rows[0]["average_latency"]))
    header = next(line for line in text.splitlines() if line.startswith("engine"))
    assert header.split() == [TABLE_HEADERS[c] for c in TABLE_COLUMNS]
    sdkern_row = next(line for line in text.splitlines() if line.startswith("sdkern "))
    assert sdkern_row.split()[2].endswith("x") or "skipped" in sdkern_row  # speed-up vs eager
    assert "bench wall time" in text


def test_bench_plot_written(bench_run: tuple[int, str, Path]) -> None:
    _, _, d = bench_run
    from PIL import Image

    with Image.open(d / "r.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def _generate(tmp: Path, name: str, *extra: str) -> list[Path]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["generate", "--preset", "tiny", "--steps", "2", "--out", str(tmp / name), *extra])
    assert rc == 0
    return [Path(p) for p in out.getvalue().split()]


def test_generate_deterministic_with_metadata(tmp_path: Path) -> None:
    from PIL import Image

    args = (
        "--seed",
        "7",
        "--n-samples",
        "2",
        "--n-iter",
        "1",
        "--scheduler",
        "euler-a",
        "--no-patch",
        "--prompt",
        "a cat",
        "--negative-prompt",
        "a dog",
    )
    a = _generate(tmp_path, "a", *args)
    b = _generate(tmp_path, "b", *args)
    assert len(a) == 3 and a[-1].name.startswith("grid")
    for pa, pb in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb))), pa.name
    first, second = (np.asarray(Image.open(p), dtype=np.int16) for p in a[:2])
    assert np.abs(first - second).max() > 0  # different seeds, different images
    with Image.open(a[0]) as im:
        meta = im.text
        assert im.size == (32, 32)
    assert meta["prompt"] == "a cat" and meta["negative_prompt"] == "a dog"
    assert meta["seed"] == "7" and meta["steps"] == "2" and meta["scheduler"] == "euler-a"
    assert meta["patched"].startswith("no")
    with Image.open(a[1]) as im:
        assert im.text["seed"] == "8"
    with Image.open(a[-1]) as im:
        assert im.size == (64, 32) and json.loads(im.text["seeds"]) == [7, 8]


def test_generate_image_reproducible_from_its_own_seed(tmp_path: Path) -> None:
    """Image k of a batch equals a single-image run with seed+k (noise drawn per image on CPU)."""
    from PIL import Image

    batch = _generate(tmp_path, "batch", "--seed", "3", "--n-samples", "2", "--no-patch")
    single = _generate(tmp_path, "single", "--seed", "4", "--no-patch")
    got = np.asarray(Image.open(batch[1]), dtype=np.int16)
    want = np.asarray(Image.open(single[0]), dtype=np.int16)
    assert np.abs(got - want).max() <= 1  # batched vs single matmuls may round differently


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--steps", "0"], "positive integer"),
        (["bench", "--height", "30"], "multiple of 8"),
        (["bench", "--engines", "eager,warp-drive"], "unknown engine"),
        (["bench", "--preset", "sd9"], "invalid choice"),
        (["bench", "--device", "cuda:0"], "no CUDA device"),
        (["generate", "--scheduler", "plms"], "invalid choice"),
        (["generate", "--scheduler", "euler", "--eta", "0.5"], "--eta"),
        (["generate", "--preset", "tiny", "--model", "x"], "not allowed with"),
        (["frobnicate"], "invalid choice"),
        (["roofline", "--peak-tflops", "100"], "go together"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


@pytest.mark.parametrize(
    "argv", [["--help"], ["bench", "--help"], ["generate", "--help"], ["info", "--help"], ["roofline", "--help"]]
)
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert "usage: sdkern" in capsys.readouterr().out


def test_info_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    assert "sdkern" in capsys.readouterr().out


def test_generate_patched_matches_unpatched(tmp_path: Path) -> None:
    """With sdkern.patch applied (when available) the images stay within a few levels of plain diffusers."""
    from PIL import Image

    try:
        import sdkern.patch  # noqa: F401
    except ImportError as e:
        pytest.skip(f"sdkern.patch unavailable: {e}")
    plain = _generate(tmp_path, "plain", "--seed", "5", "--no-patch")
    patched = _generate(tmp_path, "patched", "--seed", "5")
    with Image.open(patched[0]) as im:
        assert im.text["patched"] == "yes"
        got = np.asarray(im, dtype=np.int16)
    want = np.asarray(Image.open(plain[0]), dtype=np.int16)
    assert np.abs(got - want).max() <= 2


def test_cpu_commands_tune_malloc_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/generate tune glibc's malloc for CPU runs only, and never with the flag or SDKERN_MALLOC_TUNING=0
    (the tuning itself is process-wide and tested in subprocesses: tests/runtime/test_allocator.py)."""
    import argparse

    from sdkern.apps.cli import commands as cli
    from sdkern.runtime import allocator

    calls: list[int] = []

    def fake_tune() -> allocator.AllocatorTuning:
        calls.append(1)
        return allocator.AllocatorTuning(True, "", {"M_MMAP_MAX": 0})

    monkeypatch.setattr(allocator, "tune_cpu_allocator", fake_tune)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    on = argparse.Namespace(no_malloc_tuning=False)
    assert cli._tune_malloc(on, "cpu") == {"applied": True, "reason": "", "settings": {"M_MMAP_MAX": 0}}
    assert cli._tune_malloc(on, "cuda:0") is None
    assert cli._tune_malloc(argparse.Namespace(no_malloc_tuning=True), "cpu") is None
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert cli._tune_malloc(on, "cpu") is None
    assert calls == [1]
    parser = cli.build_parser()
    assert parser.parse_args(["bench", "--no-malloc-tuning"]).no_malloc_tuning
    assert parser.parse_args(["generate", "--no-malloc-tuning"]).no_malloc_tuning
    assert cli._onnx_device("CUDAExecutionProvider") == "cuda" and cli._onnx_device("cpu") == "cpu"
