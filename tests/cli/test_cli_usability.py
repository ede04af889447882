"""The sdkern command reads well and fails well (issue 20 item 5, issue 19 item 10): -v anywhere, defaults in
every --help, the subcommand's usage in its errors, one-line errors with the right exit status, a compact
bench table, third-party warnings filtered, progress per step, a warning on a busy machine."""

from __future__ import annotations

import argparse
import io
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from sdkern.apps.cli import commands as cli
from sdkern.bench import report
from sdkern.cli import build_parser, main

# Every run argument list is small, so that a check that is missing (before the fix) costs a tiny run, not SD1.5.
TINY_GENERATE = ["generate", "--preset", "tiny", "--steps", "1", "--height", "32", "--width", "32"]
TINY_BENCH = ["bench", "--preset", "tiny", "--steps", "1", "--height", "32", "--width", "32", "--engines", "eager"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_verbose_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    for name in _subparsers(parser):
        extra = {"optimize": ["--out", "x"], "serve": ["tiny"]}.get(name, [])  # their required arguments
        assert parser.parse_args([name, *extra]).verbose is False, name
        assert parser.parse_args(["-v", name, *extra]).verbose is True, name
        assert parser.parse_args([name, *extra, "-v"]).verbose is True, name
        assert parser.parse_args([name, "--verbose", *extra]).verbose is True, name


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    names = list(_subparsers(parser))
    assert {"info", "bench", "generate", "optimize", "roofline"} <= set(names)
    for name in names:
        assert name in parser.description, name
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in names:
        assert name in out


def test_every_option_with_a_default_shows_it_in_help() -> None:
    parser = build_parser()
    for name, sp in _subparsers(parser).items():
        formatter = sp._get_formatter()
        for action in sp._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or not action.help:
                continue
            if action.help == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action)
            assert "default" in text.lower(), f"sdkern {name} {action.option_strings[0]}: {text!r}"
            assert str(action.default) in text or "default:" in text.lower(), (name, text)


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        (["generate", "--scheduler", "euler", "--eta", "0.5"], "usage: sdkern generate", "--eta"),
        (["roofline", "--peak-tflops", "100"], "usage: sdkern roofline", "go together"),
        (["bench", "--steps", "0"], "usage: sdkern bench", "positive integer"),
    ],
)
def test_errors_show_the_subcommands_usage(
    argv: list[str], usage: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert usage in err and message in err
    assert "Traceback" not in err


def _one_error_line(err: str, status_prefix: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(status_prefix)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_generate_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "taken.png"
    f.write_bytes(b"not a directory")
    assert main([*TINY_GENERATE, "--out", str(f)]) == 2
    line = _one_error_line(capsys.readouterr().err, "sdkern generate: error:")
    assert "--out" in line and "not a directory" in line
    assert f.read_bytes() == b"not a directory"


def test_generate_out_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main([*TINY_GENERATE, "--out", str(f / "sub" / "dir")]) == 2
    line = _one_error_line(capsys.readouterr().err, "sdkern generate: error:")
    assert "--out" in line and "not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_generate_out_unwritable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        assert main([*TINY_GENERATE, "--out", str(ro / "imgs")]) == 2
    finally:
        ro.chmod(0o700)
    assert "not writable" in _one_error_line(capsys.readouterr().err, "sdkern generate: error:")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*TINY_GENERATE, "--seed", str(2**70)], "--seed"),
        ([*TINY_GENERATE, "--seed", "-1"], "--seed"),
        ([*TINY_GENERATE, "--seed", str(2**63 - 1), "--n-samples", "2"], "--seed"),
        ([*TINY_BENCH, "--seed", str(2**70)], "--seed"),
        ([*TINY_GENERATE, "--guidance", "nan"], "--guidance"),
        ([*TINY_GENERATE, "--guidance", "inf"], "--guidance"),
        ([*TINY_BENCH, "--guidance", "nan"], "--guidance"),
        ([*TINY_GENERATE, "--eta", "nan"], "--eta"),
        (["optimize", "--out", "x", "--lora-scale", "nan"], "--lora-scale"),
        (["optimize", "--out", "x", "--seed", str(2**70)], "--seed"),
    ],
)
def test_out_of_range_numbers_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in _one_error_line(err, f"sdkern {argv[0]}: error:")
    assert "Overflow" not in err


def test_expected_failures_are_one_line_exit_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import sdkern.ort

    def missing(args: argparse.Namespace) -> int:
        raise sdkern.ort.OrtLibraryMissing("libsdkern_ort.so is not in this installation")

    monkeypatch.setattr(cli, "_cmd_info", missing)
    assert main(["info"]) == 1
    line = _one_error_line(capsys.readouterr().err, "sdkern info: error:")
    assert "libsdkern_ort.so" in line

    def no_package(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")

    monkeypatch.setattr(cli, "_cmd_info", no_package)
    assert main(["info"]) == 1
    assert "pip install" in _one_error_line(capsys.readouterr().err, "sdkern info: error:")
    assert main(["info", "-v"]) == 1  # -v: the traceback too
    assert "Traceback" in capsys.readouterr().err


def test_third_party_warnings_are_filtered_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.jit import TracerWarning

    def noisy(args: argparse.Namespace) -> int:
        warnings.warn(
            "Converting a tensor to a Python boolean might cause the trace to be incorrect", TracerWarning, stacklevel=1
        )
        warnings.warn_explicit("torchvision image extension failed", UserWarning, "x.py", 1, module="torchvision.io")
        return 0

    monkeypatch.setattr(cli, "_cmd_info", noisy)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["info"]) == 0
    assert not seen, [str(w.message) for w in seen]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["info", "-v"]) == 0
    assert len(seen) == 2


def test_compact_bench_table() -> None:
    rows = [
        {"engine": "eager", "median_latency": 2.0, "max_abs_diff_vs_eager": 0.0, "status": "ok", "version": "x" * 40},
        {"engine": "sdkern", "median_latency": 1.6, "max_abs_diff_vs_eager": 3e-6, "status": "ok"},
        {"engine": "ort", "status": "skipped: " + "a long reason why this engine cannot run here " * 3},
    ]
    report.add_speedups(rows)
    assert rows[1]["speedup_vs_eager"] == pytest.approx(1.25) and rows[2]["speedup_vs_eager"] is None
    text = report.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["engine", "median_s", "vs_eager", "max_diff", "status"]
    assert max(len(line) for line in lines) <= 100, text
    assert "1.25x" in lines[3] and "1.00x" in lines[2]
    assert "speedup_vs_eager" in report.COLUMNS  # every column still goes to JSON/CSV
    assert set(report.TABLE_COLUMNS) <= set(report.COLUMNS)


def test_busy_machine_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 4.0, 3.0))
    out = io.StringIO()
    msg = cli._warn_if_busy(out)
    assert msg is not None and "5.0" in out.getvalue() and "2 CPU cores" in out.getvalue()
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert cli._warn_if_busy(io.StringIO()) is None


def test_bench_and_generate_show_progress_per_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("tqdm")
    small = ["--preset", "tiny", "--height", "32", "--width", "32", "--steps", "3"]
    with redirect_stdout(io.StringIO()):
        assert main(["bench", *small, "--engines", "eager", "--batch-count", "1", "--no-roofline"]) == 0
    err = capsys.readouterr().err
    assert "sdkern bench" in err and "/6 " in err and "step" in err  # 2 calls x 3 steps
    with redirect_stdout(io.StringIO()):
        assert main(["generate", *small, "--out", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert "sdkern generate" in err and "/3 " in err


def test_library_log_warnings_quiet_while_a_command_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers logs "requires torchvision ... falling back" at warning level when it is imported (it was
    printed by every command in a venv without torchvision); commands set its verbosity switch to error."""
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")
    seen: dict[str, str | None] = {}

    def record(args: argparse.Namespace) -> int:
        seen.update({n: os.environ.get(n) for n in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")})
        return 0

    monkeypatch.setattr(cli, "_cmd_info", record)
    assert main(["info"]) == 0
    assert seen == {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "info"}  # a user's choice stays
    assert "TRANSFORMERS_VERBOSITY" not in os.environ and os.environ["DIFFUSERS_VERBOSITY"] == "info"
    assert main(["info", "-v"]) == 0
    assert seen["TRANSFORMERS_VERBOSITY"] is None
