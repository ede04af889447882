"""Bench results as a table, JSON, CSV and a latency plot."""

from __future__ import annotations

import csv
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# The columns of ONNX Runtime's diffusion benchmark.py first, then sdkern's own.
ORT_COLUMNS = (
    "engine",
    "version",
    "provider",
    "disable_safety_checker",
    "height",
    "width",
    "steps",
    "batch_size",
    "batch_count",
    "num_prompts",
    "average_latency",
    "median_latency",
    "first_run_memory_MB",
    "second_run_memory_MB",
)
EXTRA_COLUMNS = (
    "model",
    "pipeline",
    "device",
    "dtype",
    "warmup",
    "first_call_s",
    "setup_s",
    "unet_steps_per_s",
    "max_abs_diff_vs_eager",
    "roofline_device",
    "roofline_floor_ms",
    "roofline_fraction",
    "speedup_vs_eager",
    "status",
)
COLUMNS = ORT_COLUMNS + EXTRA_COLUMNS
# Columns printed in the terminal table, with their headers (every column goes to JSON and CSV).
TABLE_COLUMNS = ("engine", "median_latency", "speedup_vs_eager", "max_abs_diff_vs_eager", "status")
TABLE_HEADERS = {
    "engine": "engine",
    "median_latency": "median_s",
    "speedup_vs_eager": "vs_eager",
    "max_abs_diff_vs_eager": "max_diff",
    "status": "status",
}
#: Longest status shown in the table (skip and error reasons are printed in full above it and kept in JSON/CSV).
STATUS_WIDTH = 48


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
    return str(v)


def _cell(column: str, v: Any) -> str:
    if column == "speedup_vs_eager" and isinstance(v, float):
        return f"{v:.2f}x"
    if column == "status" and isinstance(v, str) and len(v) > STATUS_WIDTH:
        return v[: STATUS_WIDTH - 3] + "..."
    return _fmt(v)


def add_speedups(rows: Sequence[dict[str, Any]]) -> None:
    """Set ``speedup_vs_eager`` (eager median / this engine's median) on every row that ran, when eager ran."""
    eager = next((r for r in rows if r.get("engine") == "eager" and r.get("median_latency")), None)
    for r in rows:
        med = r.get("median_latency")
        r["speedup_vs_eager"] = eager["median_latency"] / med if eager is not None and med else None


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Fixed-width text table of ``rows`` (missing values as ``-``; headers from :data:`TABLE_HEADERS`)."""
    heads = [TABLE_HEADERS.get(c, c) for c in columns]
    cells = [[_cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([line, sep, *body])


def environment() -> dict[str, Any]:
    """Machine and versions recorded with every result file."""
    import sdkern

    env: dict[str, Any] = {
        "sdkern": sdkern.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        env["loadavg"] = list(__import__("os").getloadavg())
    except OSError:
        pass
    return env


def write_json(path: str | Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write ``{"environment", "settings", "results": rows}`` (rows keep every column and raw latencies)."""
    doc = {"environment": environment(), **meta, "results": list(rows)}
    Path(path).write_text(json.dumps(doc, indent=2, default=str))


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write one line per engine with :data:`COLUMNS` as header."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in COLUMNS})


def plot(path: str | Path, rows: Sequence[dict[str, Any]], title: str = "") -> None:
    """Bar chart of average latency per engine (median as a marker, raw runs as dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("average_latency") is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(done) + 2), 4))
    xs = list(range(len(done)))
    ax.bar(xs, [r["average_latency"] for r in done], color="#4c72b0", label="average")
    ax.scatter(xs, [r["median_latency"] for r in done], color="black", marker="_", s=400, label="median", zorder=3)
    for x, r in zip(xs, done, strict=True):
        raw = r.get("latencies") or []
        ax.scatter([x] * len(raw), raw, color="#dd8452", s=12, zorder=4)
        ax.annotate(f"{r['average_latency']:.2f}s", (x, r["average_latency"]), ha="center", va="bottom")
    ax.set_xticks(xs, [r["engine"] for r in done])
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title(title or "sdkern bench")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
