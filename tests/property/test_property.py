"""Crash-safe runner of the Hypothesis property tests (cases_ops.py, cases_ort.py).

Each case file runs in a pytest subprocess: a segfault or abort there is a failure here that shows
the example being run when the process died (cases write it to $SDKERN_PROPERTY_LOG
before each call), instead of a dead test session. Example counts: $SDKERN_PROPERTY_EXAMPLES
(default 40 per case function; the sanitizer CI step uses fewer).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _run_cases(file: str, tmp_path: Path) -> None:
    """All case functions of ``file`` in one pytest subprocess (startup dominates small example counts)."""
    log = tmp_path / "last_example.txt"
    env = dict(os.environ, SDKERN_PROPERTY_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 0:
        return
    last = log.read_text() if log.exists() else "(none recorded)"
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        pytest.fail(f"{file} crashed the process ({sig}); example being run:\n{last}\n{proc.stderr[-4000:]}")
    pytest.fail(f"{file} failed (rc {proc.returncode}); last example recorded:\n{last}\n{proc.stdout[-8000:]}")


def test_ops_property(tmp_path):
    _run_cases("cases_ops.py", tmp_path)


def test_ort_property(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _run_cases("cases_ort.py", tmp_path)
