"""U-Net step roofline: FLOPs and minimum bytes by op class, floor time on A100/H100 (and any device).

Same as ``sdkern roofline``; examples::

    python benchmarks/roofline.py --preset sd15 --height 512 --width 512
    python benchmarks/roofline.py --preset sdxl --height 1024 --width 1024 --json sdxl.json
    python benchmarks/roofline.py --preset sd15 --peak-tflops 165 --bandwidth-gbs 1008   # an RTX 4090-like device
"""

from __future__ import annotations

import sys

from sdkern.cli import main

if __name__ == "__main__":
    sys.exit(main(["roofline", *sys.argv[1:]]))
