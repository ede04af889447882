"""U-Net step on CPU: sdkern against the engines CPU users already have, side by side in one run.

Contenders (pick with ``--contenders``; the ones whose package is missing are skipped with the reason):

* ``eager``     diffusers U-Net in PyTorch;
* ``sdkern``    the same model after ``sdkern.patch`` (fused ops + the CPU engine: prepacked oneDNN
                convolutions/GEMMs with fused epilogues, channels-last end to end);
* ``sdkern-direct`` the same with every convolution on oneDNN's direct primitive (``SDKERN_IM2COL_MAX_PIXELS=0``:
                no im2col GEMM for the convolutions with <= 64 output pixels, the engine before session 10);
* ``sdkern-wino`` the same with ``PatchConfig(winograd=True)`` (fp32 deep 3x3 convolutions as Winograd F(2x2,3x3));
* ``sdkern-wino-torch`` the same with the Winograd transforms as torch ops (``SDKERN_WINOGRAD_TRANSFORMS=torch``,
                the old path) instead of sdkern's fused C++ kernels;
* ``compile``   ``torch.compile`` (inductor) with ``freezing=True`` (weights prepacked by inductor);
* ``openvino``  ``openvino.convert_model`` + ``compile_model("CPU")``, static input shapes,
                ``INFERENCE_PRECISION_HINT`` f32 or bf16;
* ``ort``       ONNX Runtime CPU EP on the export optimised by ORT's own fusions (no sdkern ops);
* ``ort-sdkern`` the same with sdkern's custom-op library (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd),
                its kernels on ORT's intra-op pool;
* ``ort-sdkern-omp`` the same with the kernels on their own OpenMP team (``SDKERN_ORT_THREADS=openmp``, the
                behaviour before session 12).
  ORT runs fp32 only here (its CPU EP has no bf16 convolution).
* ``eager-malloc``, ``sdkern-malloc``: eager / sdkern in a worker whose glibc malloc is tuned first
  (``sdkern.runtime.tune_cpu_allocator``: freed memory kept for the next step), as ``sdkern bench``,
  ``generate`` and ``serve`` run; a library user calling ``sdkern.patch`` gets it only by calling it too.

Every contender lives in its own worker process (so one engine's memory or threads cannot distort
another's, and the exports/compilations of one do not sit in another's RSS); the parent interleaves
rounds over the workers (round r runs one step on every contender before round r+1, starting at
contender r mod n so no engine always runs first), and reports the median step, the ratio to eager and to
OpenVINO as the median over rounds of the same-round ratio (paired: on a VM whose speed drifts by tens of
per cent within minutes — seen on the session-8 machine — a ratio of medians mixes rounds taken at
different speeds; ``vs_eager_of_medians`` keeps that one too) and as the ratio of each contender's best
round (``*_of_mins``: on the session-10 machine the speed jumped ~2x between consecutive steps, so even
same-round ratios scattered 0.65-1.8x; the best rounds are all taken in the fast state),
setup seconds (from the built model to the first
output, net of one steady step and of importing torch and diffusers: patching, conversion, compilation,
first-call primitive creation),
peak RSS of the worker, and the relative L2 error vs a float64 eager run of the same weights and
inputs. ``--load`` adds a background process that keeps one core busy (the "loaded machine" row). Example::

    python benchmarks/cpu_peers.py --sizes 32 64 --dtypes fp32 bf16 --rounds 5 --out benchmarks/results/cpu_peers.json

``--pipeline`` times whole txt2img calls instead of U-Net steps, the same way (one worker per contender,
interleaved rounds, paired ratios): the SD1.5-architecture pipeline with random weights (text encoder,
``--steps`` U-Net steps with classifier-free guidance, so batch 2, VAE decode) at ``8 * size`` pixels, each
contender prepared exactly as ``sdkern bench --engines <name>`` prepares it (names: eager, sdkern, openvino,
compile, ort, ort-sdkern; ``-malloc`` as above). No float64 oracle at this scale: the error column is the
relative L2 distance of the images from eager's in the same dtype. Example (512x512, 20 steps)::

    python benchmarks/cpu_peers.py --pipeline --steps 20 --sizes 64 --dtypes bf16 --rounds 3 \
        --contenders eager,sdkern,openvino --out benchmarks/results/cpu_pipeline.json

Memory: workers of one (dtype, size) configuration are alive together; SD1.5 fp32 needs ~4-5 GB per
torch/OpenVINO/ORT worker, so fp32 with all six contenders needs ~24 GB: run ``--contenders`` in two
groups on a 24 GB machine (the JSON files can be merged: the eager row is in both).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _peers_worker import _inputs, _model, _worker  # benchmarks/ is on sys.path when run as a script

CONTENDERS = (
    "eager", "sdkern", "sdkern-direct", "sdkern-wino", "sdkern-wino-torch", "compile", "openvino", "ort", "ort-sdkern",
    "ort-sdkern-omp", "eager-malloc", "sdkern-malloc",
)  # fmt: skip


# --------------------------------------------------------------------------------------------- parent side
def _available(name: str) -> str | None:
    import importlib.util

    need = "onnxruntime" if name.startswith("ort") else {"openvino": "openvino"}.get(name)
    if need and importlib.util.find_spec(need) is None:
        return f"{need} is not installed"
    return None


def _burn() -> None:  # the loaded-machine row: one core kept busy
    x = 0
    while True:
        x += 1


def _rel_l2(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_config(args: argparse.Namespace, dname: str, size: int, workdir: str) -> list[dict[str, Any]]:
    import torch

    ctx = mp.get_context("spawn")
    ref_path = None
    if not args.no_ref and not args.pipeline:  # float64 eager, the accuracy oracle (alone: twice the fp32 memory)
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(b, "ref64", args.config, size, "fp64", args.threads, workdir))
        p.start()
        msg = a.recv()
        a.send("stop")
        a.recv()
        p.join()
        ref_path = msg.get("out")
    workers: dict[str, tuple[Any, Any]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in args.contenders:
        if name.startswith("ort") and dname != "fp32":
            rows[name] = {"contender": name, "skipped": "ONNX Runtime's CPU EP runs this model in fp32 only"}
            continue
        why = _available(name)
        if why:
            rows[name] = {"contender": name, "skipped": why}
            continue
        a, b = ctx.Pipe()
        steps = args.steps if args.pipeline else 0
        p = ctx.Process(target=_worker, args=(b, name, args.config, size, dname, args.threads, workdir, steps))
        p.start()
        msg = a.recv()  # setups run one after another: each is timed on a quiet machine
        if not msg["ok"]:
            rows[name] = {"contender": name, "skipped": msg["error"]}
            p.join()
            continue
        workers[name] = (a, p)
        rows[name] = {"contender": name, "setup_s": msg["setup_s"], "times": [], "out": msg["out"]}
        print(f"  {dname} {size}x{size} {name}: ready, setup {msg['setup_s']:.1f} s", flush=True)
    order = list(workers)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)] if order else []:
            a = workers[name][0]
            a.send("step")
            rows[name]["times"].append(a.recv())
    ref = torch.load(ref_path) if ref_path else None
    if args.pipeline and "eager" in rows and "out" in rows["eager"]:
        ref = torch.load(rows["eager"]["out"])  # no float64 pipeline: distance from eager's images
    for name, (a, p) in workers.items():
        a.send("rss")
        rows[name]["peak_rss_gb"] = a.recv() / 2**30
        p.join()
        row = rows[name]
        row["median_s"] = statistics.median(row["times"])
        row["min_s"] = min(row["times"])
        if ref is not None:
            key = "rel_l2_vs_eager" if args.pipeline else "rel_l2_vs_fp64"
            row[key] = _rel_l2(torch.load(row["out"]), ref)
    for row in rows.values():
        row.pop("out", None)
    out = []
    for name in args.contenders:
        row = {"dtype": dname, "latent": size, "batch": 2, **rows[name]}
        if args.pipeline:
            row.update(mode="pipeline", image_px=8 * size, steps=args.steps, batch=1)
        if "median_s" in row:
            for key, peer in (("vs_eager", "eager"), ("vs_openvino", "openvino")):
                theirs = rows.get(peer, {}).get("times")
                row[key] = _paired_ratio(theirs, row["times"]) if theirs else None
                row[f"{key}_of_medians"] = rows[peer]["median_s"] / row["median_s"] if theirs else None
                # the fastest rounds: on a VM whose speed jumps ~2x within a round, each contender's best
                # round is its time in the machine's fast state (the other estimator to read beside the paired one)
                row[f"{key}_of_mins"] = rows[peer]["min_s"] / row["min_s"] if theirs else None
        out.append(row)
    return out


def _paired_ratio(theirs: list[float], ours: list[float]) -> float:
    """Median over rounds of ``theirs[r] / ours[r]`` (> 1: ours is faster), both timed in the same round."""
    return statistics.median(t / o for t, o in zip(theirs, ours, strict=True))


def _step_flops(config: str, size: int) -> tuple[float, float]:
    """(dense FLOPs of one batch-2 step, FLOPs Winograd removes from it) on the meta device.

    Dense: every conv / GEMM / attention matmul as PyTorch's FlopCounter counts it. Winograd F(2x2,3x3)
    computes a 3x3 output pixel of a rewritten convolution with 4 multiply-adds per channel pair instead of 9.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdkern.patch import winograd

    model = _model(config, torch.float32, device="meta")
    x, t, ctx = (a.to("meta") for a in _inputs(config, size, torch.float32))
    saved = [0.0]

    def hook(m: Any, inp: Any, out: Any) -> None:
        if winograd.shape_problem(m) is None:  # the convolutions PatchConfig(winograd=True) rewrites
            n, _, h, w = out.shape
            saved[0] += 2.0 * n * h * w * m.in_channels * m.out_channels * (9 - 4)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, t, encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    return float(fc.get_total_flops()), saved[0]


def _gemm_peak(dname: str, threads: int) -> float:
    """Measured matrix peak (FLOP/s): best of repeated 2048^3 matmuls in this dtype with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.float32 if dname == "fp32" else torch.bfloat16
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best, t0 = float("inf"), time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def _add_flops(rows: list[dict[str, Any]], config: str, size: int, peak: float) -> None:
    dense, saved = _step_flops(config, size)
    for row in rows:
        if "median_s" not in row:
            continue
        executed = dense - saved if row["contender"].startswith("sdkern-wino") and row["dtype"] == "fp32" else dense
        row["dense_gflop"] = dense / 1e9
        row["executed_gflop"] = executed / 1e9
        row["gemm_peak_tflops"] = peak / 1e12
        row["dense_tflops"] = dense / row["median_s"] / 1e12  # the work of the step over its time
        row["fraction_of_peak"] = executed / row["median_s"] / peak  # the machine's measured matrix peak used


def _fmt(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"{row['dtype']:5s} {row['latent']:3d}  {row['contender']:17s} skipped: {row['skipped']}"
    ve = f"{row['vs_eager']:.2f}x" if row.get("vs_eager") else "-"
    vo = f"{row['vs_openvino']:.2f}x" if row.get("vs_openvino") else "-"
    vo_min = f"{row['vs_openvino_of_mins']:.2f}x" if row.get("vs_openvino_of_mins") else "-"
    err = next((f"{row[k]:.1e}" for k in ("rel_l2_vs_fp64", "rel_l2_vs_eager") if k in row), "-")
    return (
        f"{row['dtype']:5s} {row['latent']:3d}  {row['contender']:17s} {row['median_s'] * 1e3:6.0f} ms  "
        f"vs eager {ve:>6s}  vs OpenVINO {vo:>6s} (best rounds {vo_min:>6s})  setup {row['setup_s']:6.1f} s  "
        f"RSS {row['peak_rss_gb']:5.1f} GB  rel L2{' vs eager' if 'rel_l2_vs_eager' in row else ''} {err}"
        + (
            f"  {row['dense_tflops']:.2f} dense TFLOP/s, {row['fraction_of_peak']:.0%} of peak"
            if "dense_tflops" in row
            else ""
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--contenders", default="eager,sdkern,compile,openvino", help="comma list from " + ",".join(CONTENDERS)
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (default 32 64)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per engine (default: all cores)")
    p.add_argument("--config", choices=["sd15", "small"], default="sd15", help="U-Net config (small: smoke test)")
    p.add_argument("--load", action="store_true", help="keep one core busy in a background process meanwhile")
    p.add_argument("--no-ref", action="store_true", help="skip the float64 oracle (no rel L2 column)")
    p.add_argument("--pipeline", action="store_true", help="time whole txt2img calls (8 * size px), not U-Net steps")
    p.add_argument("--steps", type=int, default=20, help="--pipeline: denoising steps per call (default 20)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in args.contenders if c not in CONTENDERS]
    if bad:
        p.error(f"unknown contender(s) {bad}; choose from {', '.join(CONTENDERS)}")
    burner = None
    if args.load:
        burner = mp.get_context("spawn").Process(target=_burn, daemon=True)
        burner.start()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sdkern-peers-") as workdir:
            for dname in args.dtypes:
                peak = _gemm_peak(dname, args.threads)
                print(f"{dname}: measured matmul peak {peak / 1e12:.2f} TFLOP/s ({args.threads} threads)", flush=True)
                for size in args.sizes:
                    config_rows = run_config(args, dname, size, workdir)
                    if not args.pipeline:  # the FLOP columns count one U-Net step
                        _add_flops(config_rows, args.config, size, peak)
                    for row in config_rows:
                        rows.append(row)
                        print(_fmt(row), flush=True)
    finally:
        if burner is not None:
            burner.kill()
    import torch

    import sdkern

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "sdkern": sdkern.__version__}
    for mod in ("openvino", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    result = {
        "benchmark": "cpu_peers",
        "command": "python benchmarks/cpu_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": (
            f"SD1.5-architecture txt2img pipeline ({args.config}), random weights, {args.steps} steps, guidance 7.5"
            if args.pipeline
            else f"SD1.5 U-Net architecture ({args.config}), random weights, batch 2"
        ),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
        },
        "loaded": args.load,
        "loadavg_after": os.getloadavg(),
        "versions": versions,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
