"""The tools' old import paths (``sdkern.<tool>``) are the ``sdkern.apps.<tool>`` modules themselves
(sdkern/_aliases.py): one module object per file, real file locations, ``python -m`` on the old path."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

from sdkern import _aliases


@pytest.mark.parametrize(
    "old", ["sdkern.serve", "sdkern.serve.deploy", "sdkern.models.build", "sdkern.onnx.export", "sdkern.cli"]
)
def test_old_path_is_the_same_module(old: str) -> None:
    new = _aliases.target_of(old)
    assert new is not None and new.startswith("sdkern.apps.")
    assert importlib.import_module(old) is importlib.import_module(new)
    spec = importlib.util.find_spec(old)
    assert spec is not None and spec.origin == importlib.util.find_spec(new).origin  # the real file


def test_library_names_are_not_aliases() -> None:
    for name in ("sdkern.ops", "sdkern.patch", "sdkern.runtime", "sdkern.lora", "sdkern.deepcache", "sdkern.apps"):
        assert _aliases.target_of(name) is None, name


def test_python_m_on_the_old_path_has_a_real_argv0() -> None:
    """``python -m sdkern.cli``: runpy sets sys.argv[0] from the alias's origin (Ray's driver realpath()s it)."""
    code = (  # what `python -m` runs (runpy's private entry point), then what it left in sys.argv[0]
        "import runpy, sys; sys.argv = ['?', '--version']\n"
        "try:\n    runpy._run_module_as_main('sdkern.cli')\n"
        "except SystemExit:\n    pass\nprint(repr(sys.argv[0]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sdkern/apps/cli/__main__.py" in out.stdout.strip().splitlines()[-1], out.stdout
