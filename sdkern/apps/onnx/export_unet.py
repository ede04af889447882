"""Export and optimise a live U-Net for :meth:`sdkern.apps.onnx.unet.OrtUNet.from_module`, here or in a child.

``python -m sdkern.apps.onnx.export_unet SRC ROOT TARGET FP16 SDKERN_OPS`` is the child: it loads the U-Net
from a safetensors checkpoint, exports and optimises it, and prints the fused-op counts as JSON.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path

import torch


def float32_cpu(unet: torch.nn.Module) -> torch.nn.Module:
    # Export float32 and let the optimiser convert: ORT's GroupNorm fusion on an fp16 export writes
    # fp32 gamma/beta with fp16 raw data ("Raw data size does not match tensor's size", ORT 1.32).
    if unet.dtype == torch.float32 and unet.device.type == "cpu":
        return unet
    return copy.deepcopy(unet).to(device="cpu", dtype=torch.float32)


def _export_raw(unet: torch.nn.Module, root: Path) -> Path:
    """Export ``unet`` (float32, CPU) to root/raw/model.onnx."""
    from sdkern.apps.onnx.export import export_component

    holder = types.SimpleNamespace(unet=unet, text_encoder=None, vae=None, tokenizer=None)
    return export_component(holder, "unet", root / "raw" / "model.onnx")


def _optimize_raw(raw: Path, root: Path, target: str, fp16: bool, sdkern_ops: bool) -> dict[str, int]:
    """Optimise the export ``raw`` into root/opt/model.onnx; fused-op counts."""
    from sdkern.apps.onnx.optimize import optimize_component

    return optimize_component(raw, root / "opt" / "model.onnx", "unet", target, fp16=fp16, sdkern_ops=sdkern_ops)


def export_optimize(unet: torch.nn.Module, root: Path, target: str, fp16: bool, sdkern_ops: bool) -> dict[str, int]:
    """Export ``unet`` (float32, CPU) to root/raw and optimise it into root/opt/model.onnx; fused-op counts."""
    return _optimize_raw(_export_raw(unet, root), root, target, fp16, sdkern_ops)


def export_in_child(
    unet: torch.nn.Module, root: Path, target: str, fp16: bool, sdkern_ops: bool, checkpoint: Path | None = None
) -> dict[str, int]:
    """:func:`export_optimize` in a child process fed a safetensors checkpoint of ``unet``: ``checkpoint`` (a
    ``save_pretrained`` directory of it in any dtype, left in place) or one written to ``root/src`` and removed."""
    import json
    import shutil
    import subprocess
    import sys

    src = root / "src" if checkpoint is None else Path(checkpoint)
    if checkpoint is None:
        float32_cpu(unet).save_pretrained(src, safe_serialization=True)  # type: ignore[operator]
    args = [
        sys.executable,
        "-m",
        "sdkern.apps.onnx.export_unet",
        str(src),
        str(root),
        target,
        str(int(fp16)),
        str(int(sdkern_ops)),
    ]
    proc = subprocess.run(args, capture_output=True, text=True)
    if checkpoint is None:
        shutil.rmtree(src, ignore_errors=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"sdkern OrtUNet: the export child process failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(argv: list[str]) -> int:
    """The child process of :func:`export_in_child` (see the module docstring)."""
    import json

    from diffusers import UNet2DConditionModel

    from sdkern.runtime import release_free_memory

    src, root, target, fp16, sdkern_ops = argv
    unet = UNet2DConditionModel.from_pretrained(src, torch_dtype=torch.float32)
    raw = _export_raw(unet, Path(root))
    # the torch U-Net is done with: free it before the optimiser loads the ONNX model (SD1.5 fp32: the child's
    # peak 9.5+ -> ~7 GB; the optimiser's copies of the graph stack on whatever is still resident)
    del unet
    release_free_memory()
    counts = _optimize_raw(raw, Path(root), target, fp16 == "1", sdkern_ops == "1")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_child_main(sys.argv[1:]))
