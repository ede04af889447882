"""CPU op benchmark: every sdkern op against the unfused PyTorch sequence it replaces, side by side.

For each op and Stable Diffusion shape, in float32 and bfloat16, the script times (median of
several repeats after warm-up; each repeat times a burst of back-to-back calls lasting about
``--burst-ms`` (default 20 ms), and the contenders' bursts are interleaved in the same loop; each burst
starts with ``--settle`` untimed calls, see below):

- the sdkern op (``sdkern.ops.<op>``: whatever implementation runs on CPU now; the one that ran
  is recorded: ``cpp`` or ``reference`` with the reason),
- the unfused torch sequence (group_norm+silu; add+add+group_norm+silu; add-bias + chunk + gelu +
  mul; add+add+layer_norm; add+add; scaled_dot_product_attention for attention),
- a plain copy (``Tensor.copy_``) moving the same number of bytes as the op's minimum traffic.

It prints a table with the speedup over torch, the achieved GB/s (minimum bytes read + written /
time) next to the copy's GB/s, and the geometric-mean speedup per dtype over the memory-bound ops.
``--out FILE.json`` writes device, versions, CPU model, threads and the raw timings.

Why bursts settle: torch's CPU allocator is glibc's ``posix_memalign``. When the contenders take
turns, the first call of a burst often cannot reuse the blocks the previous contender freed (the
aligned request is a little larger than the freed hole), so glibc grows the heap and the new pages
fault in (and later trims them again). Which contender pays that depends only on the order of the
bursts: measured on the dev VM, bias_add 2x1024x640 fp32 interleaved without settling took 38 minor
faults per sdkern call and 4 per torch sequence. One untimed call per burst (``--settle 1``, the
default) lets each contender reach its own steady heap state before it is timed, the state a
repeating U-Net step runs in. ``--settle 0`` gives the unsettled method. The minor page faults per
timed call are recorded for every contender (``faults`` columns and JSON fields) either way.

Why 20 ms bursts: the contenders take turns, and the copy moves as many bytes as the op, so every
burst starts with caches that hold the other contender's data. With 2 ms bursts (the default until
session 4) the slow cases ran only 2-5 calls per burst, so their times mixed a cold first call (data
from DRAM) with warm ones, in a proportion set by the op's duration: the same bias_add 2x4096x320
fp32 case took 0.78 ms per call in 2-call bursts and 0.25-0.29 ms in 10-23-call bursts. Long bursts
time every case in the same steady state (inputs and outputs cache-resident as far as they fit),
which is how a repeating U-Net step meets them. ``--burst-ms 2`` gives the earlier method.

Usage::

    python benchmarks/ops_cpu.py [--quick] [--ops bias_add,skip_layer_norm] [--tune-malloc] [--out FILE.json]
    OMP_NUM_THREADS=1 python benchmarks/ops_cpu.py ...   # both sides on one thread
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

try:
    import resource
except ImportError:  # not on Windows: fault counts are then recorded as 0
    resource = None  # type: ignore[assignment]

import torch
import torch.nn.functional as F

import sdkern
from sdkern.ops import _launch, _library
from sdkern.ops import _native as nat

MEMORY_BOUND = ("group_norm", "skip_group_norm", "bias_split_gelu", "skip_layer_norm", "bias_add")


@dataclass
class Case:
    """One (op, shape) benchmark case; ``make(dtype)`` returns the op's positional arguments."""

    op: str
    label: str
    make: Callable[[torch.dtype], tuple[Any, ...]]
    unfused: Callable[..., Any]
    nbytes: Callable[[tuple[Any, ...]], int]
    quick: bool = False


@dataclass
class Result:
    op: str
    shape: str
    dtype: str
    impl: str
    sdkern_s: list[float] = field(default_factory=list)
    torch_s: list[float] = field(default_factory=list)
    calls_per_sample: int = 1
    copy_s: list[float] = field(default_factory=list)
    nbytes: int = 0
    # minor page faults per timed call (whole process, all threads), summed over the repeats
    sdkern_faults: float = 0.0
    torch_faults: float = 0.0

    @property
    def speedup(self) -> float:
        return statistics.median(self.torch_s) / statistics.median(self.sdkern_s)

    @property
    def speedup_min(self) -> float:
        """Ratio of the fastest runs: less sensitive to other load on the machine than the medians."""
        return min(self.torch_s) / min(self.sdkern_s)


def _nb(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


# ---- unfused torch sequences (what a diffusers model runs without sdkern) --------------------
def _t_group_norm(x, gamma, beta, groups, eps, silu):
    y = F.group_norm(x, groups, gamma, beta, eps)
    return F.silu(y) if silu else y


def _t_skip_group_norm(x, skip, bias, gamma, beta, groups, eps, silu):
    s = x + skip[:, :, None, None] if skip.dim() == 2 else x + skip
    s = s + bias[:, None, None]
    y = F.group_norm(s, groups, gamma, beta, eps)
    return (F.silu(y) if silu else y), s


def _t_bias_split_gelu(x, bias):
    a, g = (x + bias).chunk(2, dim=-1)
    return a * F.gelu(g)


def _t_skip_layer_norm(x, skip, gamma, beta, bias, eps):
    s = x + skip + bias
    return F.layer_norm(s, (s.shape[-1],), gamma, beta, eps), s


def _t_bias_add(x, bias, skip):
    return x + bias + skip


def _t_attention(q, k, v, scale):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


# ---- cases ---------------------------------------------------------------------------------------
def _cases() -> list[Case]:
    cases: list[Case] = []
    for i, (n, c, hw) in enumerate([(2, 320, 64), (2, 640, 32), (2, 1280, 16)]):

        def gn(dt, n=n, c=c, hw=hw):
            x = _rand(n, c, hw, hw, dtype=dt).contiguous(memory_format=torch.channels_last)
            return x, _rand(c, dtype=dt), _rand(c, dtype=dt), 32, 1e-5, True

        def sgn(dt, n=n, c=c, hw=hw):
            x = _rand(n, c, hw, hw, dtype=dt).contiguous(memory_format=torch.channels_last)
            return x, _rand(n, c, dtype=dt), _rand(c, dtype=dt), _rand(c, dtype=dt), _rand(c, dtype=dt), 32, 1e-5, True

        label = f"N{n} C{c} {hw}x{hw} NHWC"
        cases.append(Case("group_norm", label, gn, _t_group_norm, lambda a: 2 * _nb(a[0]), quick=i == 0))
        cases.append(
            Case("skip_group_norm", label, sgn, _t_skip_group_norm, lambda a: 3 * _nb(a[0]) + _nb(a[1]), quick=i == 0)
        )
    for i, (m, two_d) in enumerate([(2 * 4096, 2560), (2 * 1024, 5120), (2 * 256, 10240)]):

        def bsg(dt, m=m, two_d=two_d):
            return _rand(m, two_d, dtype=dt), _rand(two_d, dtype=dt)

        cases.append(
            Case("bias_split_gelu", f"M{m} 2D{two_d}", bsg, _t_bias_split_gelu, lambda a: 3 * _nb(a[0]) // 2, i == 0)
        )
    for i, (b, s, c) in enumerate([(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 77, 768), (2, 77, 1024)]):

        def sln(dt, b=b, s=s, c=c):
            x, k = _rand(b, s, c, dtype=dt), _rand(b, s, c, dtype=dt)
            return x, k, _rand(c, dtype=dt), _rand(c, dtype=dt), _rand(c, dtype=dt), 1e-5

        def ba(dt, b=b, s=s, c=c):
            return _rand(b, s, c, dtype=dt), _rand(c, dtype=dt), _rand(b, s, c, dtype=dt)

        label = f"{b}x{s}x{c}"
        cases.append(Case("skip_layer_norm", label, sln, _t_skip_layer_norm, lambda a: 4 * _nb(a[0]), quick=i == 0))
        cases.append(Case("bias_add", label, ba, _t_bias_add, lambda a: 3 * _nb(a[0]), quick=i == 0))
    for sq, sk in [(1024, 1024), (1024, 77)]:

        def att(dt, sq=sq, sk=sk):
            return _rand(2, sq, 8, 40, dtype=dt), _rand(2, sk, 8, 40, dtype=dt), _rand(2, sk, 8, 40, dtype=dt), None

        label = f"B2 H8 Sq{sq} Sk{sk} D40"
        cases.append(Case("attention", label, att, _t_attention, lambda a: 2 * _nb(a[0]) + _nb(*a[1:3]), quick=True))
    return cases


# ---- timing ----------------------------------------------------------------------------------------
def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _time(fn: Callable[[], Any], inner: int, settle: int = 0) -> tuple[float, float]:
    """(seconds, minor page faults) per call of ``fn`` over ``inner`` back-to-back calls, after
    ``settle`` untimed calls."""
    for _ in range(settle):
        fn()
    f0 = _minor_faults()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    t = time.perf_counter() - t0
    return t / inner, (_minor_faults() - f0) / inner


def _calls_per_sample(fn: Callable[[], Any], target_s: float = 20e-3) -> int:
    """Calls per timed sample so that one sample lasts about ``target_s`` (timer and scheduler noise
    of a single short call would otherwise dominate the small ops). The per-call time is the median
    of three bursts of three calls (one cold call alone overestimates it several times over)."""
    one = statistics.median(_time(fn, 3)[0] for _ in range(3))
    return max(1, min(1000, round(target_s / max(one, 1e-7))))


def implementation(op: str, args: tuple[Any, ...]) -> str:
    """Which CPU implementation sdkern.ops.<op> runs for these arguments (tries the native one directly)."""
    name, reasons = _library.selected(op, "cpu")
    if name != "cpp":
        return f"{name} ({'; '.join(reasons)})"
    try:
        getattr(_launch, op)(nat.load("_C"), *args)
    except NotImplementedError as e:
        return f"reference (cpp: {e})"
    return "cpp"


def run_case(
    case: Case, dtype: torch.dtype, repeats: int, warmup: int, settle: int = 1, burst_s: float = 20e-3
) -> Result:
    args = case.make(dtype)
    nbytes = case.nbytes(args)
    src = torch.empty(nbytes // 2, dtype=torch.uint8)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    op = getattr(sdkern.ops, case.op)
    res = Result(case.op, case.label, str(dtype).replace("torch.", ""), implementation(case.op, args), nbytes=nbytes)
    contenders = [
        ("sdkern", res.sdkern_s, lambda: op(*args)),
        ("torch", res.torch_s, lambda: case.unfused(*args)),
        ("copy", res.copy_s, lambda: dst.copy_(src)),
    ]
    faults = {"sdkern": 0.0, "torch": 0.0, "copy": 0.0}
    for _ in range(warmup):
        for _, _, fn in contenders:
            fn()
    # One call count for all three contenders (set by the slowest), so they run in equal-length
    # bursts; the bursts are interleaved and every repeat records one per-call time per contender.
    res.calls_per_sample = min(_calls_per_sample(fn, burst_s) for _, _, fn in contenders)
    for _ in range(repeats):
        for name, store, fn in contenders:
            t, f = _time(fn, res.calls_per_sample, settle)
            store.append(t)
            faults[name] += f / repeats
    res.sdkern_faults, res.torch_faults = faults["sdkern"], faults["torch"]
    return res


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gbs(nbytes: int, times: list[float]) -> float:
    return nbytes / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape per op, fewer repeats")
    ap.add_argument("--ops", default="", help="comma-separated subset of ops")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats (default 15, 5 with --quick)")
    ap.add_argument(
        "--burst-ms", type=float, default=20.0, help="target length of one timed burst of calls (default 20 ms)"
    )
    ap.add_argument("--settle", type=int, default=1, help="untimed calls at the start of every burst (default 1)")
    ap.add_argument(
        "--tune-malloc",
        action="store_true",
        help="keep freed memory in the process (sdkern.runtime.tune_cpu_allocator): no page faults on either side",
    )
    ap.add_argument("--out", default="", help="write the raw results as JSON here")
    args = ap.parse_args(argv)

    # All the cores by default; OMP_NUM_THREADS (read by the OpenMP runtime of sdkern's kernels at
    # start-up) also sets torch's thread count, so both sides always use the same number.
    malloc = None
    if args.tune_malloc:
        from sdkern.runtime.allocator import tune_cpu_allocator

        malloc = tune_cpu_allocator()
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    repeats = args.repeats or (5 if args.quick else 15)
    warmup = 2
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    wanted = set(args.ops.split(",")) if args.ops else None
    cases = [c for c in _cases() if (wanted is None or c.op in wanted) and (c.quick or not args.quick)]

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: list[Result] = []
    hdr = f"{'op':16s} {'shape':26s} {'dtype':8s} {'impl':5s} {'sdkern ms':>9s} {'torch ms':>9s} {'speedup':>7s}"
    print(hdr + f" {'(min)':>7s} {'GB/s':>6s} {'copy GB/s':>9s} {'faults s/t':>11s}")
    for dtype in dtypes:
        for case in cases:
            r = run_case(case, dtype, repeats, warmup, args.settle, args.burst_ms * 1e-3)
            results.append(r)
            impl = r.impl if len(r.impl) <= 5 else r.impl.split(" ")[0][:5]
            print(
                f"{r.op:16s} {r.shape:26s} {r.dtype:8s} {impl:5s} {statistics.median(r.sdkern_s) * 1e3:9.3f} "
                f"{statistics.median(r.torch_s) * 1e3:9.3f} {r.speedup:6.2f}x {r.speedup_min:6.2f}x "
                f"{_gbs(r.nbytes, r.sdkern_s):6.1f} {_gbs(r.nbytes, r.copy_s):9.1f} "
                f"{r.sdkern_faults:5.0f}/{r.torch_faults:<5.0f}",
                flush=True,
            )

    summary: dict[str, dict[str, float]] = {}
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        mem = [r.speedup for r in results if r.dtype == name and r.op in MEMORY_BOUND]
        mem_min = [r.speedup_min for r in results if r.dtype == name and r.op in MEMORY_BOUND]
        per_op = {}
        for op in sorted({r.op for r in results if r.dtype == name}):
            sp = [r.speedup for r in results if r.dtype == name and r.op == op]
            per_op[op] = math.exp(sum(map(math.log, sp)) / len(sp))
        gm = math.exp(sum(map(math.log, mem)) / len(mem)) if mem else float("nan")
        gm_min = math.exp(sum(map(math.log, mem_min)) / len(mem_min)) if mem_min else float("nan")
        summary[name] = {
            "geomean_memory_bound": gm,
            "geomean_memory_bound_min": gm_min,
            **{f"geomean_{k}": v for k, v in per_op.items()},
        }
        ops_txt = ", ".join(f"{k} {v:.2f}x" for k, v in per_op.items())
        print(f"{name}: geometric-mean speedup over the memory-bound ops {gm:.2f}x (ratio of minima {gm_min:.2f}x)")
        print(f"  per op: {ops_txt}")
    not_native = sorted({(r.op, r.impl) for r in results if r.impl != "cpp"})
    for op, impl in not_native:
        print(f"note: {op} ran {impl}")

    if args.out:
        info = sdkern._C.build_info() if nat.load("_C") is not None else {}
        doc = {
            "device": "cpu",
            "cpu_model": _cpu_model(),
            "threads": threads,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_isa": sdkern._C.cpu_isa() if info else None,
            "torch_version": torch.__version__,
            "sdkern_version": getattr(sdkern, "__version__", None),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "loadavg_before_after": [load_before, os.getloadavg() if hasattr(os, "getloadavg") else None],
            "repeats": repeats,
            "warmup": warmup,
            "settle": args.settle,
            "burst_ms": args.burst_ms,
            "malloc_tuning": None if malloc is None else {"applied": malloc.applied, "settings": malloc.settings},
            "quick": args.quick,
            "summary": summary,
            "results": [asdict(r) | {"speedup": r.speedup, "speedup_min": r.speedup_min} for r in results],
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
