"""Memory safety of libsdkern_ort under valgrind (slow: minutes).

Runs tests/ort/valgrind_driver.py (every op, float and float16, good and bad inputs, repeated library
registration) under memcheck with ``PYTHONMALLOC=malloc`` and fails on any invalid access, use of
uninitialised memory or definite leak whose stack passes through libsdkern_ort. Reports from python,
numpy or onnxruntime themselves are not ours and are ignored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

import sdkern.ort

LIB = "libsdkern_ort"


def _ours(error: ET.Element) -> bool:
    return any(LIB in (f.findtext("obj") or "") for f in error.iter("frame"))


def _describe(error: ET.Element) -> str:
    frames = [f"{f.findtext('fn') or '?'} ({Path(f.findtext('obj') or '?').name})" for f in error.iter("frame")]
    what = error.findtext("kind"), error.findtext("what") or error.findtext("xwhat/text")
    return f"{what[0]}: {what[1]}\n    " + "\n    ".join(frames[:12])


@pytest.mark.slow
def test_valgrind_clean(tmp_path):
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    xml = tmp_path / "memcheck.xml"
    driver = Path(__file__).with_name("valgrind_driver.py")
    env = dict(os.environ, PYTHONMALLOC="malloc", OMP_NUM_THREADS="1")
    cmd = [
        "valgrind",
        "--tool=memcheck",
        "--leak-check=full",
        "--show-leak-kinds=definite",
        "--errors-for-leak-kinds=definite",
        "--xml=yes",
        f"--xml-file={xml}",
        sys.executable,
        str(driver),
        str(sdkern.ort.library_path()),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"driver failed under valgrind:\n{proc.stderr[-4000:]}"
    root = ET.parse(xml).getroot()
    errors = root.findall("error")
    ours = [e for e in errors if _ours(e)]
    print(f"\nvalgrind: {len(errors)} reports in total, {len(ours)} through {LIB}")
    assert not ours, "valgrind reports in libsdkern_ort:\n" + "\n".join(_describe(e) for e in ours[:10])
