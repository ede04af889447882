"""Load test of ``sdkern serve`` on loopback: throughput and p50/p99 latency vs concurrency, batching on/off.

For each model and batching setting it starts a server (``sdkern.serve.deploy``, 127.0.0.1, free port),
sends ``--requests`` requests at each concurrency level (default 1, 4, 16) and records images/s and
latency percentiles. Bounded: a fixed request count per level and a per-request timeout.

    python benchmarks/serve_load.py --models tiny --size 64 --steps 2 --requests 16          # quick check
    python benchmarks/serve_load.py --models tiny,sd15 --size 256 --steps 4 --json results.json
    python benchmarks/serve_load.py --models sd15 --size 256 --steps 4 --requests 8,8,16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from typing import Any


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def _level(url: str, concurrency: int, n: int, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors = 0

    async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:

        async def one(i: int) -> None:
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                r = await c.post("/v1/images/generations", json={**body, "seed": i})
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": n,
        "errors": errors,
        "images_per_s": len(lat) / wall,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p99_s": percentile(lat, 0.99) if lat else float("nan"),
        "wall_s": wall,
    }


def main() -> int:
    from sdkern.serve import deploy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny", help="comma-separated presets (e.g. tiny,sd15)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument(
        "--requests", default="32", help="requests per concurrency level: one number, or one per level (8,8,16)"
    )
    ap.add_argument("--dtype", default=None, help="the server's --dtype (default: the server's, float32)")
    ap.add_argument("--max-batch", type=int, default=8, help="--max-batch of the batching-on server")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    counts = counts * len(levels) if len(counts) == 1 else counts
    if len(counts) != len(levels):
        ap.error(f"--requests: {len(counts)} counts for {len(levels)} concurrency levels")
    rows: list[dict[str, Any]] = []
    body = {"prompt": "a photo of an astronaut riding a horse", "size": f"{args.size}x{args.size}", "steps": args.steps}
    for model in args.models.split(","):
        for batching in (False, True):
            opts = {
                "max_batch": args.max_batch if batching else 1,
                "batch_wait_ms": args.batch_wait_ms if batching else 0,
            }
            max_size = max(args.size, 64)
            with deploy(
                model,
                queue_size=max(levels) * 4,
                timeout_s=args.timeout,
                max_size=max_size,
                log_level="warning",
                dtype=args.dtype,
                **opts,
            ) as h:
                for c, n in zip(levels, counts, strict=True):
                    r = asyncio.run(_level(h.url, c, n, body, args.timeout))
                    r.update(model=model, batching=batching, size=args.size, steps=args.steps, dtype=args.dtype)
                    rows.append(r)
                    print(
                        f"{model:6s} batching={'on ' if batching else 'off'} c={c:3d}: {r['images_per_s']:.2f} img/s, "
                        f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, errors {r['errors']}",
                        flush=True,
                    )
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
