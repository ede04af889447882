"""benchmarks/gpu_check.sh stays runnable: its --dry-run starts every step on a CPU machine and each exits cleanly.

The GPU checks (build with CUDA, tests, compute-sanitizer, benchmarks) only run for real on a GPU
machine, so a broken step would otherwise be found there, on scarce GPU time. The dry run skips the
rebuild, collects the "cuda or triton" tests (imports and parametrisation of every GPU test), runs
tests/cuda (which skip without a GPU), asks compute-sanitizer for its version when it exists, and
starts every benchmarks/*_cuda.py with --help (imports and argument parsing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs gpu_check.sh for real")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python3 = this interpreter
    env.pop("TRITON_INTERPRET", None)  # the script's pytest sets it itself (tests/conftest.py)
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    log = r.stdout + r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["dry_run"] is True
    benches = {p.stem for p in (ROOT / "benchmarks").glob("*_cuda.py")}
    expected = {"build", "info", "tests", "tests_cuda"} | benches
    assert expected <= set(steps), f"steps missing: {expected - set(steps)}"
    failed = {k: v for k, v in steps.items() if v["rc"] != 0 and k != "sanitizer"}
    assert not failed, f"steps failed: {failed}\n{log[-6000:]}"
    assert r.returncode == 0, log[-6000:]
    cuda_tests = log.split("=== tests_cuda")[1].split("=== tests_cuda: rc")[0]
    assert " skipped" in cuda_tests and "failed" not in cuda_tests and "error" not in cuda_tests.lower()
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
