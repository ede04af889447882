"""The JSON record the CPU micro-benchmarks write (``--out``): machine, threads, clock, torch version, rows."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def write_results(out: Path, benchmark: str, cpu_time: bool, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` with the run's context to ``out`` (parent folders created)."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": benchmark,
        "machine": {"cpu": platform.processor(), "cores": os.cpu_count()},
        "threads": torch.get_num_threads(),
        "clock": "thread CPU time" if cpu_time else "wall",
        "loadavg_after": os.getloadavg(),
        "torch": torch.__version__,
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2))
