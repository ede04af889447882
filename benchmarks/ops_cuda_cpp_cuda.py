"""Benchmark the CUDA C++ kernels (sdkern._C_cuda) against the Triton kernels and plain torch at SD shapes.

Run on a CUDA machine (benchmarks/gpu_check.sh runs every benchmarks/*_cuda.py):

    python benchmarks/ops_cuda_cpp_cuda.py --out results.json [--dtype float16] [--iters 50]

For each op and shape, every implementation runs side by side in the same process: ``torch`` (eager
PyTorch in the same dtype), ``cuda`` (sdkern.ops with set_cuda_impl("cuda")) and ``triton``
(set_cuda_impl("triton"), when sdkern.triton provides the op). Times are medians of CUDA-event timings
after warm-up; ratios are torch time / implementation time. Each implementation's output is also
compared with the float64 reference (relative L2) so a fast wrong result is visible. Writes JSON with
device, versions and raw numbers. Without a GPU it writes nothing and exits 0 with a message.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _time(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # microseconds
    return statistics.median(times)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double().cpu(), ref.double().cpu()
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item()


def _cases(dtype: torch.dtype):
    """(op, shape label, make_inputs() -> args, torch_fn(*args), sdkern_fn(*args), reference_fn(*args64))."""
    import sdkern
    from sdkern.ops import reference

    dev = "cuda"

    def r(*shape, **kw):
        return torch.randn(*shape, device=dev, dtype=kw.get("dt", dtype))

    for n, c, hw in [(2, 320, 64), (2, 640, 32), (2, 1280, 16), (2, 1280, 8)]:

        def mk(n=n, c=c, hw=hw):
            return (r(n, c, hw, hw).contiguous(memory_format=torch.channels_last), r(c, dt=torch.float32),
                    r(c, dt=torch.float32))  # fmt: skip

        yield (
            "group_norm_silu", f"{n}x{c}x{hw}x{hw} nhwc", mk,
            lambda x, g, b: F.silu(F.group_norm(x, 32, g.to(x.dtype), b.to(x.dtype), 1e-5)),
            lambda x, g, b: sdkern.ops.group_norm(x, g, b, 32, 1e-5, True),
            lambda x, g, b: reference.group_norm(x, g, b, 32, 1e-5, True),
        )  # fmt: skip

        def mks(n=n, c=c, hw=hw):
            x = r(n, c, hw, hw).contiguous(memory_format=torch.channels_last)
            return x, r(n, c), r(c), r(c, dt=torch.float32), r(c, dt=torch.float32)

        yield (
            "skip_group_norm", f"{n}x{c}x{hw}x{hw} nhwc, skip (N,C)", mks,
            lambda x, k, bi, g, b: F.group_norm(x + k[:, :, None, None] + bi[None, :, None, None], 32,
                                                g.to(x.dtype), b.to(x.dtype), 1e-5),
            lambda x, k, bi, g, b: sdkern.ops.skip_group_norm(x, k, g, b, bias=bi, groups=32)[0],
            lambda x, k, bi, g, b: reference.skip_group_norm(x, k, bi, g, b, 32, 1e-5, False)[0],
        )  # fmt: skip

    for m, d in [(2 * 4096, 1280), (2 * 1024, 2560), (2 * 256, 5120)]:
        yield (
            "bias_split_gelu", f"{m}x{2 * d}", lambda m=m, d=d: (r(m, 2 * d), r(2 * d)),
            lambda x, b: (lambda a, g: a * F.gelu(g))(*(x + b).chunk(2, -1)),
            lambda x, b: sdkern.ops.bias_split_gelu(x, b),
            reference.bias_split_gelu,
        )  # fmt: skip
    for m, c in [(2 * 4096, 320), (2 * 1024, 640), (2 * 256, 1280), (2 * 77, 768)]:
        yield (
            "skip_layer_norm", f"{m}x{c}", lambda m=m, c=c: (r(m, c), r(m, c), r(c), r(c), r(c)),
            lambda x, k, g, b, bi: F.layer_norm(x + k + bi, (x.shape[-1],), g, b, 1e-5),
            lambda x, k, g, b, bi: sdkern.ops.skip_layer_norm(x, k, g, beta=b, bias=bi)[0],
            lambda x, k, g, b, bi: reference.skip_layer_norm(x, k, g, b, bi, 1e-5)[0],
        )  # fmt: skip
        yield (
            "bias_add", f"{m}x{c}", lambda m=m, c=c: (r(m, c), r(c), r(m, c)),
            lambda x, b, k: x + b + k, lambda x, b, k: sdkern.ops.bias_add(x, b, k), reference.bias_add,
        )  # fmt: skip
    for b, sq, sk, h, d in [(2, 4096, 4096, 8, 40), (2, 4096, 77, 8, 40), (2, 1024, 1024, 8, 80),
                            (2, 256, 256, 8, 160), (2, 1024, 1024, 10, 64), (2, 4096, 4096, 10, 64)]:  # fmt: skip
        yield (
            "attention", f"B{b} Sq{sq} Sk{sk} H{h} D{d}",
            lambda b=b, sq=sq, sk=sk, h=h, d=d: (r(b, sq, h, d), r(b, sk, h, d), r(b, sk, h, d)),
            lambda q, k, v: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2),
            lambda q, k, v: sdkern.ops.attention(q, k, v),
            lambda q, k, v: reference.attention(q, k, v, 1 / math.sqrt(q.shape[-1])),
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ops_cuda_cpp_cuda: no CUDA GPU; nothing measured")
        return 0
    import sdkern.ops
    from sdkern.ops import _native

    dtype = getattr(torch, args.dtype)
    if _native.load("_C_cuda") is None:
        print(f"ops_cuda_cpp_cuda: {_native.load_error('_C_cuda')}")
        return 1
    try:
        import sdkern.triton as sk_triton
    except ImportError:
        sk_triton = None
    results = []
    previous = sdkern.ops.cuda_impl_order()[0]
    try:
        for op, label, make, torch_fn, sdk_fn, ref_fn in _cases(dtype):
            inputs = make()
            ref = ref_fn(*[t.double().cpu() for t in inputs])
            row = {"op": op, "shape": label, "dtype": args.dtype, "us": {}, "rel_err": {}}
            names = ["torch", "cuda"]
            if sk_triton is not None and hasattr(sk_triton, op.replace("_silu", "")):
                names.append("triton")
            for name in names:
                if name == "torch":
                    fn = functools.partial(torch_fn, *inputs)
                else:
                    sdkern.ops.set_cuda_impl(name)  # fixed for the whole measurement
                    fn = functools.partial(sdk_fn, *inputs)
                row["rel_err"][name] = _rel(fn(), ref)
                row["us"][name] = _time(fn, args.iters)
            row["speedup_vs_torch"] = {n: row["us"]["torch"] / t for n, t in row["us"].items() if n != "torch"}
            print(json.dumps(row))
            results.append(row)
    finally:
        sdkern.ops.set_cuda_impl(previous)
    meta = {
        "device": torch.cuda.get_device_name(0),
        "capability": torch.cuda.get_device_capability(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "iters": args.iters,
        "note": "sdkern timings go through torch.ops.sdkern (op dispatch and argument checks included)",
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
