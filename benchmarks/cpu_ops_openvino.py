"""The U-Net's heavy operations one at a time: sdkern's CPU engine vs OpenVINO's CPU plugin, SD1.5 shapes, batch 2.

Where a whole step is close (``benchmarks/cpu_peers.py``), this says which operation wins: each row runs sdkern's
call (the shipped engine code: a prepacked oneDNN inner product / convolution, ``sdkern::attention`` or PyTorch's
SDPA for bf16 attention as the patcher picks on AMX CPUs) and the same operation as its own OpenVINO model
(``convert_model`` of a one-module torch graph, static shape, ``INFERENCE_PRECISION_HINT`` f32 / bf16, latency
hint), interleaved call by call in one process, median of ``--reps``; ``ov/sdkern`` > 1 means sdkern is faster.
OpenVINO's time includes handing it the NumPy input (a copy of the activation; small next to these operations).
Example::

    python benchmarks/cpu_ops_openvino.py --dtypes fp32 bf16 --tables linear attention conv --out ops_ov.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import paired, write_results  # benchmarks/ is on sys.path when run as a script
from torch import nn

import sdkern.ops  # noqa: F401  (registers torch.ops.sdkern)
from sdkern.patch import cpu_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LINEARS = [  # (tokens, in, out): SD1.5 at 64x64 latents (512 px), batch 2 folded into tokens
    (8192, 320, 2560), (8192, 1280, 320), (8192, 320, 320), (8192, 320, 960), (2048, 640, 5120),
    (2048, 2560, 640), (2048, 640, 640), (512, 1280, 10240), (512, 5120, 1280), (8192, 768, 320),
]  # fmt: skip
ATTENTIONS = [(4096, 8, 40, 4096), (1024, 8, 80, 1024), (4096, 8, 40, 77)]  # (S, heads, head dim, S of keys)
CONVS = [(320, 320, 64), (640, 320, 64), (960, 320, 64), (640, 640, 32), (1280, 640, 32), (1280, 1280, 16)]


def _pair(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[float, float, float]:
    """Median ms of ``a`` and ``b`` and the median of their same-round ratios b/a (:func:`_common.paired`)."""
    ta, tb, ratio = paired(lambda _k: a(), lambda _k: b(), reps)
    return ta * 1e3, tb * 1e3, ratio


def _openvino(module: nn.Module, example: tuple[torch.Tensor, ...], dname: str, threads: int) -> Callable[[], Any]:
    import openvino as ov

    with torch.no_grad():
        om = ov.convert_model(module, example_input=example, input=[e.shape for e in example])
    cfg = {"INFERENCE_PRECISION_HINT": "bf16" if dname == "bf16" else "f32", "INFERENCE_NUM_THREADS": threads}
    req = ov.Core().compile_model(om, "CPU", {**cfg, "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    feeds = [e.float().numpy() for e in example]
    return lambda: req.infer(feeds)


class _Sdpa(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, S, H, D) in and out, as sdkern's attention takes them
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _row(table: str, shape: str, flop: float, sdkern_ms: float, ov_ms: float, ratio: float) -> dict[str, Any]:
    return dict(
        table=table, shape=shape, gflop=flop / 1e9, sdkern_ms=sdkern_ms, openvino_ms=ov_ms, ov_over_sdkern=ratio
    )


@torch.inference_mode()
def rows_for(table: str, dname: str, threads: int, reps: int) -> list[dict[str, Any]]:
    dtype = DTYPES[dname]
    rows: list[dict[str, Any]] = []
    if table == "linear":
        for tok, cin, cout in LINEARS:
            lin = nn.Linear(cin, cout).to(dtype)
            x = torch.randn(2, tok // 2, cin).to(dtype)
            ov_call = _openvino(nn.Linear(cin, cout), (x.float(),), dname, threads)
            cpu_engine.pack_linear(lin, [])
            s, o, r = _pair(lambda lin=lin, x=x: cpu_engine.linear_add(lin, x, None), ov_call, reps)
            rows.append(_row(table, f"{tok}x{cin}->{cout}", 2 * tok * cin * cout, s, o, r))
    elif table == "attention":
        for seq, heads, d, skv in ATTENTIONS:
            q = torch.randn(2, seq, heads, d).to(dtype)
            k, v = (torch.randn(2, skv, heads, d).to(dtype) for _ in range(2))
            ov_call = _openvino(_Sdpa(), (q.float(), k.float(), v.float()), dname, threads)
            if dtype == torch.bfloat16:  # the patcher's bf16 choice on AMX CPUs (sdkern/patch/attention.py)
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

                def ours(qt: Any = qt, kt: Any = kt, vt: Any = vt) -> Any:
                    return F.scaled_dot_product_attention(qt, kt, vt)
            else:

                def ours(q: Any = q, k: Any = k, v: Any = v) -> Any:
                    return torch.ops.sdkern.attention(q, k, v, None, None)

            s, o, r = _pair(ours, ov_call, reps)
            rows.append(_row(table, f"S{seq} H{heads} D{d} Skv{skv}", 4 * 2 * heads * seq * skv * d, s, o, r))
    elif table == "conv":
        for cin, cout, hw in CONVS:
            conv = nn.Conv2d(cin, cout, 3, padding=1).to(dtype)
            x = torch.randn(2, cin, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
            ov_call = _openvino(nn.Conv2d(cin, cout, 3, padding=1), (x.float().contiguous(),), dname, threads)
            cpu_engine.pack_conv2d(conv, [])
            s, o, r = _pair(lambda conv=conv, x=x: conv(x), ov_call, max(4, reps // 2))
            rows.append(_row(table, f"{cin}->{cout} 3x3 @{hw}x{hw}", 2 * 2 * hw * hw * cin * cout * 9, s, o, r))
    else:
        raise ValueError(table)
    for row in rows:
        row["dtype"] = dname
        print(
            f"{dname:5s} {table:9s} {row['shape']:24s} sdkern {row['sdkern_ms']:8.2f} ms "
            f"({row['gflop'] / row['sdkern_ms']:6.3f} TFLOP/s)  OpenVINO {row['openvino_ms']:8.2f} ms  "
            f"ov/sdkern {row['ov_over_sdkern']:.2f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument(
        "--tables", nargs="+", default=["linear", "attention", "conv"], choices=["linear", "attention", "conv"]
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for d in args.dtypes for t in args.tables for row in rows_for(t, d, args.threads, args.reps)]
    if args.out:
        write_results(args.out, "cpu_ops_openvino", False, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
