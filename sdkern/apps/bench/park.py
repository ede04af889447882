"""Park a module's weights on disk while another engine runs it (``sdkern bench``'s memory bound).

While ONNX Runtime runs the U-Net, the bench's torch U-Net is not called, yet its weights (3.4 GB for SD1.5 in
float32) stayed resident beside the ORT session and beside the export child's peak. :class:`ParkedWeights` writes
the module's checkpoint once (``save_pretrained``, safetensors, in the module's own dtype), frees the parameters'
storage in place (the Parameter objects stay, so references held elsewhere stay valid) and puts the exact values
back on :meth:`ParkedWeights.restore`. The checkpoint doubles as the export child's input (it loads it as float32).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("sdkern")

__all__ = ["ParkedWeights"]


class ParkedWeights:
    """The parameters of ``module`` saved under ``path`` and freed; :meth:`restore` reloads them bit-exactly.

    Parameters
    ----------
    module : nn.Module
        A diffusers model (it needs ``save_pretrained``) on the CPU.
    path : Path
        A directory to create for the checkpoint (removed by :meth:`restore`).
    """

    def __init__(self, module: nn.Module, path: Path) -> None:
        if any(p.device.type != "cpu" for p in module.parameters()):
            raise ValueError("ParkedWeights parks CPU modules only")
        self.path = Path(path)
        module.save_pretrained(self.path, safe_serialization=True)  # type: ignore[operator]
        self._params = dict(module.named_parameters())
        with torch.no_grad():
            for p in self._params.values():
                p.data = torch.empty(0, dtype=p.dtype)
        self.parked = True
        logger.info("sdkern bench: %d parameters of %s parked in %s", len(self._params), type(module).__name__, path)

    def restore(self) -> None:
        """Put every parameter's saved value back (same Parameter objects, original dtype) and remove the files."""
        if not self.parked:
            return
        from safetensors.torch import load_file

        seen: set[str] = set()
        with torch.no_grad():
            for f in sorted(self.path.glob("*.safetensors")):
                for name, value in load_file(f).items():
                    p = self._params.get(name)
                    if p is not None:
                        p.data = value.to(p.dtype)
                        seen.add(name)
        missing = sorted(set(self._params) - seen)
        if missing:  # never expected: save_pretrained writes every parameter
            raise RuntimeError(f"ParkedWeights: the checkpoint in {self.path} lacks {missing[:5]}")
        self.parked = False
        shutil.rmtree(self.path, ignore_errors=True)
