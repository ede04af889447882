"""`import sdkern` with none of the optional packages: no triton, onnxruntime, onnx, diffusers,
transformers, safetensors, peft, torch_directml or habana_frameworks (and no GPU).

The packages are installed in the test environment, so a subprocess makes them unimportable with a
meta-path finder that raises ImportError for them, then imports sdkern, runs every op on CPU through
torch.ops.sdkern, and produces the info report.
"""

from __future__ import annotations

import json
import subprocess
import sys

BLOCKED = (
    "triton", "onnxruntime", "onnx", "onnxscript", "diffusers", "transformers", "safetensors", "peft",
    "accelerate", "torch_directml", "habana_frameworks",
)  # fmt: skip

_PROBE = r"""
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} blocked by the test")
        return None

sys.meta_path.insert(0, Block())
import torch
import sdkern

x = torch.randn(2, 64, 5, 7).contiguous(memory_format=torch.channels_last)
g, b = torch.randn(64), torch.randn(64)
ops = torch.ops.sdkern
outs = [
    ops.group_norm(x, g, b, 8, 1e-5, True),
    ops.skip_group_norm(x, torch.randn(2, 64), b, g, b, 8, 1e-5, False)[0],
    ops.bias_split_gelu(torch.randn(3, 128), torch.randn(128)),
    ops.skip_layer_norm(torch.randn(3, 64), torch.randn(3, 64), g, b, None, 1e-5)[0],
    ops.bias_add(torch.randn(3, 64), b, torch.randn(3, 64)),
    ops.attention(torch.randn(1, 9, 2, 40), torch.randn(1, 7, 2, 40), torch.randn(1, 7, 2, 40), None),
]
report = sdkern.info(as_dict=True)
print(json.dumps({
    "finite": all(bool(torch.isfinite(o).all()) for o in outs),
    "imported": sorted({m.split(".")[0] for m in sys.modules} & BLOCKED),
    "packages": report["packages"],
    "cpu_ops": report["ops"]["cpu"],
}))
"""


def test_import_and_cpu_ops_without_optional_packages():
    out = subprocess.run([sys.executable, "-c", _PROBE, ",".join(BLOCKED)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["finite"]
    assert r["imported"] == []  # nothing blocked got half-imported either
    for name in ("triton", "onnxruntime", "onnx", "diffusers", "transformers", "safetensors"):
        assert r["packages"][name] is None, (name, r["packages"][name])
    assert r["packages"]["torch_directml"] is None and r["packages"]["habana_frameworks"] is None
    # The CPU kernels do not depend on any of them.
    assert all(impl.startswith("cpp") for impl in r["cpu_ops"].values()), r["cpu_ops"]
