"""Smoke test of an installed sdkern wheel (run by .ci/wheel.sh in a fresh venv, outside the repository).

Imports sdkern, checks the compiled CPU kernels and the ORT library are in the package, and runs one CPU op
of each kind against float64 PyTorch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import sdkern
import sdkern._C  # the compiled CPU kernels must be in the wheel
import sdkern.ort
from sdkern.ops import reference


def main() -> int:
    here = Path(sdkern.__file__).resolve().parent
    assert "site-packages" in str(here), f"sdkern imported from {here}, not from the installed wheel"
    lib = sdkern.ort.library_path()
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    gamma, beta = torch.randn(64), torch.randn(64)
    got = torch.ops.sdkern.group_norm(x, gamma, beta, 32, 1e-5, True)
    want = reference.group_norm(x.double(), gamma.double(), beta.double(), 32, 1e-5, True)
    err = float((got.double() - want).abs().max())
    assert err < 1e-4, f"group_norm error {err}"
    q, k, v = (torch.randn(1, 2, 77, 40) for _ in range(3))
    att = torch.ops.sdkern.attention(q, k, v, None)
    ref = reference.attention(q.double(), k.double(), v.double(), None)
    err_att = float((att.double() - ref).abs().max())
    assert err_att < 1e-4, f"attention error {err_att}"
    print(f"wheel smoke test ok: sdkern {sdkern.__version__} from {here}; ORT library {lib.name}; "
          f"group_norm err {err:.1e}, attention err {err_att:.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
