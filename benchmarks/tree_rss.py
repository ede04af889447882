"""Run a command and report the peak resident memory of its whole process tree (children included).

Samples the summed RSS of the command and all its descendants every ``--interval`` seconds (psutil) and prints
the peak with each process's share at that moment. Used for the memory bound of ``sdkern bench`` with ONNX
Runtime engines (the export runs in a child process). Example::

    python benchmarks/tree_rss.py -- sdkern bench --preset sd15 --height 512 --width 512 --steps 1 \\
        --batch-count 1 --engines eager,sdkern,ort,ort-sdkern --no-progress
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interval", type=float, default=0.25, help="seconds between samples (default 0.25)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command to run after --")
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak, at_peak = 0, {}
    while proc.poll() is None:
        snap = {}
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for q in procs:
            try:
                snap[f"pid {q.pid}: {' '.join(q.cmdline()[:4])[:80]}"] = q.memory_info().rss
            except psutil.Error:
                pass
        total = sum(snap.values())
        if total > peak:
            peak, at_peak = total, snap
        time.sleep(args.interval)
    print(f"peak RSS of the process tree: {peak / 2**30:.2f} GiB", file=sys.stderr)
    for name, rss in sorted(at_peak.items(), key=lambda kv: -kv[1]):
        print(f"  {rss / 2**30:6.2f} GiB  {name}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
