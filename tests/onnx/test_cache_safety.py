"""The ONNX cache of `sdkern optimize` (issue 19 items 5 and 6, and the CLI part of item 10): --clean-cache
deletes only entries sdkern wrote and only after every argument is valid; the cache key is the same in every
process; bad --lora / --out / a missing ORT library are refused before any export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdkern.cli import main

ROOT = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef0123456789abcdef"


def _entry(cache: Path, key: str = KEY) -> Path:
    """A cache entry as optimize_pipeline writes it (a directory named by its key, the manifest naming it)."""
    d = cache / key
    (d / "unet").mkdir(parents=True)
    (d / "unet" / "model.onnx").write_bytes(b"onnx")
    (d / "sdkern_manifest.json").write_text(json.dumps({"format": 1, "key": key}))
    return d


def _user_files(cache: Path) -> list[Path]:
    """What a user keeps next to (or mistakenly under) the cache directory: none of it is sdkern's."""
    photos = cache / "photos"
    photos.mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"jpg")
    lookalike = cache / "fedcba9876543210fedcba9876543210"  # key-shaped name, no manifest
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("mine")
    forged = cache / "00000000000000000000000000000000"  # a manifest naming another key
    forged.mkdir()
    (forged / "sdkern_manifest.json").write_text(json.dumps({"format": 1, "key": KEY}))
    (cache / "readme.txt").write_text("x")
    return [photos / "a.jpg", lookalike / "notes.txt", forged / "sdkern_manifest.json", cache / "readme.txt"]


def test_clean_cache_deletes_only_sdkern_entries(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from sdkern.onnx import build as onnx_build

    cache = tmp_path / "cache"
    entry = _entry(cache)
    leftover = cache / f".{KEY}.partial-abc123"  # what an interrupted run leaves
    leftover.mkdir()
    (tmp_path / "elsewhere").mkdir()
    link = cache / "ffffffffffffffffffffffffffffffff"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    keep = _user_files(cache)
    assert onnx_build.clean_cache(cache) == 2
    assert not entry.exists() and not leftover.exists()
    for f in keep:
        assert f.exists(), f
    assert link.is_symlink() and (tmp_path / "elsewhere").is_dir()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "missing.safetensors"], "--lora"),
        (["--lora", "style.bin"], "pickle"),
        (["--lora-scale", "nan"], "--lora-scale"),
        (["--target", "tpu"], "--target"),
    ],
)
def test_bad_arguments_delete_nothing(tmp_path: Path, extra: list[str], message: str, capsys) -> None:
    cache = tmp_path / "cache"
    entry = _entry(cache)
    argv = ["optimize", "--model", "tiny", "--out", str(tmp_path / "out"), "--cache-dir", str(cache), "--clean-cache"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert entry.is_dir()


def test_existing_out_is_refused_before_the_cache_is_cleaned(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    entry = _entry(cache)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["optimize", "--out", str(out), "--cache-dir", str(cache), "--clean-cache"]) == 2
    assert "--out" in capsys.readouterr().err
    assert entry.is_dir()


def test_unwritable_out_is_refused_before_the_export(tmp_path: Path, monkeypatch, capsys) -> None:
    from sdkern.onnx import command

    def no_export(*a, **k):
        raise AssertionError("the pipeline was loaded before --out was checked")

    monkeypatch.setattr(command, "_load", no_export)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["optimize", "--out", str(blocker / "onnx")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not a directory" in err and "Traceback" not in err
    assert main(["optimize", "--out", str(blocker), "--overwrite"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_missing_ort_library_fails_before_the_export_for_cpu_only(tmp_path: Path, monkeypatch, capsys) -> None:
    import sdkern.ort
    from sdkern.onnx import command

    def missing() -> Path:
        raise sdkern.ort.OrtLibraryMissing("libsdkern_ort.so is not in this installation")

    loaded: list[str] = []

    def fake_load(model, seed, parser, **kw):
        loaded.append(model)
        raise SystemExit(0)  # stop after the checks: nothing below is under test here

    monkeypatch.setattr(sdkern.ort, "library_path", missing)
    monkeypatch.setattr(command, "_load", fake_load)
    assert main(["optimize", "--out", str(tmp_path / "cpu")]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdkern optimize: error:") and "--target cpu" in lines[0], err
    assert loaded == [] and not (tmp_path / "cpu").exists()
    assert main(["optimize", "--out", str(tmp_path / "cuda"), "--target", "cuda"]) == 0  # needs no library
    assert loaded == ["tiny"]


_HASH = """
import sys
from sdkern.models import build
from sdkern.onnx.build import source_hash
print(source_hash(build("tiny", seed=0)))
"""


def test_cache_key_is_the_same_in_every_process() -> None:
    """source_hash of the same model in processes with different PYTHONHASHSEED (set iteration order differs:
    diffusers' `_use_default_values` list followed it, so every run made a new cache entry)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("onnx")
    hashes = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _HASH], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        hashes.add(proc.stdout.strip().splitlines()[-1])
    assert len(hashes) == 1, hashes


def test_canonical_config_ignores_load_bookkeeping() -> None:
    pytest.importorskip("onnx")
    from sdkern.onnx.build import canonical_config

    a = {"in_channels": 4, "block_out_channels": (32, 64), "_use_default_values": ["a", "b"], "_name_or_path": "x"}
    b = {"_use_default_values": ["b", "a"], "block_out_channels": [32, 64], "in_channels": 4, "_name_or_path": "y"}
    assert canonical_config(a) == canonical_config(b)
    assert canonical_config(a) != canonical_config({**b, "in_channels": 8})


def test_generate_onnx_without_the_library_is_one_line(tiny_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    """`sdkern generate --onnx DIR` of a cpu-target directory in an installation without the ORT library:
    one line naming the library, exit 1 (it was a 9-frame traceback)."""
    import sdkern.ort

    def missing() -> Path:
        raise sdkern.ort.OrtLibraryMissing("libsdkern_ort.so is not in this installation")

    monkeypatch.setattr(sdkern.ort, "library_path", missing)
    out, _, _ = tiny_dir
    assert main(["generate", "--onnx", str(out), "--steps", "1", "--out", str(tmp_path / "img")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "sdkern generate" in ln]
    assert len(err) == 1 and err[0].startswith("sdkern generate: error:") and "libsdkern_ort.so" in err[0], err
