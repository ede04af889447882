"""The CPU engine's alternative forms, per call, through the shipped code (sdkern/patch/cpu_engine_modules.py).

* ``im2col``: a convolution in the im2col-GEMM form (the engine's choice at <= 64 output pixels) vs the same
  convolution on oneDNN's direct primitive, SD1.5 deep-level shapes and the larger ones where the engine keeps
  the direct form;
* ``geglu``: a GEGLU projection as two GEMMs with the GELU and the product in their epilogues vs one GEMM +
  ``sdkern::bias_split_gelu``;
* ``step``: the whole SD1.5 U-Net step (batch 2, ``--sizes`` latents), A/B in one process: two patched copies of
  the model, one with the form turned off on its modules, alternating steps (``--reps`` rounds) — for each form.

Both contenders of a row run interleaved call by call in one process on ``--copies`` weight copies cycled (so
weights come from memory, as in a whole step); the gain is the median of same-pair ratios. Example::

    python benchmarks/cpu_engine_forms.py --dtypes bf16 fp32 --threads 2 --out benchmarks/results/session10/forms.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import paired as _pair
from _common import write_results  # benchmarks/ is on sys.path when run as a script
from torch import nn

import sdkern.ops  # noqa: F401  (registers torch.ops.sdkern)
from sdkern.patch import cpu_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONVS = [  # (Cin, Cout, H=W of the input, stride), batch 2
    (1280, 1280, 4, 1), (2560, 1280, 4, 1), (1280, 1280, 8, 1), (2560, 1280, 8, 1), (1920, 1280, 8, 1),
    (640, 1280, 8, 1), (1280, 1280, 8, 2), (640, 640, 16, 2), (1280, 1280, 16, 1), (640, 640, 16, 1),
    (1280, 1280, 32, 1),
]  # fmt: skip
GEGLUS = [(2048, 320, 1280), (512, 640, 2560), (128, 1280, 5120), (8192, 320, 1280)]  # (tokens, C, F)


def _emit(rows: list[dict[str, Any]], row: dict[str, Any], line: str) -> None:
    rows.append(row)
    print(line, flush=True)


@torch.no_grad()
def im2col_rows(dtype: torch.dtype, reps: int, copies: int) -> list[dict[str, Any]]:
    rows = []
    for cin, cout, hw, stride in CONVS:
        x = torch.randn(2, cin, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
        gemm, direct = [], []
        for _ in range(copies):
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(dtype)
            twin = nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(dtype)
            twin.load_state_dict(conv.state_dict())
            cpu_engine.pack_conv2d(conv, [])
            cpu_engine.pack_conv2d(twin, [])
            conv(torch.zeros(1, cin, 2, 2, dtype=dtype))  # a <= 64-pixel call: re-packed into the GEMM form
            twin.__dict__["_sdkern_im2col"] = False  # stays on the direct primitive
            gemm.append(conv)
            direct.append(twin)
        t_gemm, t_direct, gain = _pair(lambda k, g=gemm, x=x: g[k](x), lambda k, d=direct, x=x: d[k](x), reps, copies)
        row = dict(table="im2col", dtype=str(dtype)[6:], cin=cin, cout=cout, hw=hw, stride=stride, gain=gain)
        row.update(gemm_form=gemm[0].weight.dim() == 2, gemm_ms=t_gemm * 1e3, direct_ms=t_direct * 1e3)
        _emit(
            rows,
            row,
            f"im2col {row['dtype']:8s} {cin:5d}->{cout:5d} {hw:3d}x{hw:<3d} s{stride}  direct "
            f"{t_direct * 1e3:7.2f} ms  im2col-GEMM {t_gemm * 1e3:7.2f} ms  gain {gain:.2f}x",
        )
    return rows


@torch.no_grad()
def geglu_rows(dtype: torch.dtype, reps: int, copies: int) -> list[dict[str, Any]]:
    if dtype != torch.bfloat16:  # the engine's gated form is bf16-only (session 10: fp32 step 0.95-0.99x)
        print(f"geglu  {str(dtype)[6:]}: skipped, the gated form is for bfloat16 weights", flush=True)
        return []
    rows = []
    for tokens, c, f in GEGLUS:
        x = torch.randn(tokens, c).to(dtype)
        gated, plain = [], []
        for _ in range(copies):
            lin = nn.Linear(c, 2 * f).to(dtype)
            twin = nn.Linear(c, 2 * f).to(dtype)
            twin.load_state_dict(lin.state_dict())
            cpu_engine.pack_linear(lin, [], gated=True)
            cpu_engine.pack_linear(twin, [])
            gated.append(lin)
            plain.append(twin)

        def one_gemm(k: int, plain: list[nn.Linear] = plain, x: torch.Tensor = x) -> torch.Tensor:
            h = cpu_engine.linear_add(plain[k], x, None, bias=False)
            return torch.ops.sdkern.bias_split_gelu(h.unsqueeze(0), plain[k].bias)

        def two_gemms(k: int, gated: list[nn.Linear] = gated, x: torch.Tensor = x) -> torch.Tensor:
            return cpu_engine.geglu(gated[k], x)

        t_gated, t_plain, gain = _pair(two_gemms, one_gemm, reps, copies)
        ref = F.linear(x.double(), gated[0].dense_weight().double(), gated[0].bias.double())
        ref = ref[:, :f] * F.gelu(ref[:, f:])
        err = ((cpu_engine.geglu(gated[0], x).double() - ref).norm() / ref.norm()).item()
        row = dict(table="geglu", dtype=str(dtype)[6:], tokens=tokens, c=c, f=f, gain=gain, rel_l2_gated=err)
        row.update(gated_ms=t_gated * 1e3, one_gemm_ms=t_plain * 1e3)
        _emit(
            rows,
            row,
            f"geglu  {row['dtype']:8s} {tokens:5d}x{c:<5d}->{f:5d}  one GEMM + bias_split_gelu "
            f"{t_plain * 1e3:7.2f} ms  two GEMMs {t_gated * 1e3:7.2f} ms  gain {gain:.2f}x  rel L2 {err:.1e}",
        )
    return rows


@torch.no_grad()
def step_rows(dtype: torch.dtype, sizes: list[int], reps: int) -> list[dict[str, Any]]:
    from _peers_worker import _inputs, _model

    import sdkern

    def without_im2col(m: nn.Module) -> None:
        for mod in m.modules():
            if type(mod) is cpu_engine.SdkernConv2d:
                mod.__dict__["_sdkern_im2col"] = False

    def without_gate(m: nn.Module) -> None:  # back to one packed (2F, C) weight + bias_split_gelu
        for mod in m.modules():
            if isinstance(mod, nn.Linear) and "_sdkern_gate" in mod.__dict__:
                w = mod.dense_weight()
                mod.__dict__.pop("_sdkern_gate")
                mod._parameters["weight"] = nn.Parameter(
                    torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None), requires_grad=False
                )

    rows = []
    for size in sizes:
        x, t, ctx = _inputs("sd15", size, dtype)
        forms = [("im2col", without_im2col)] + ([("geglu", without_gate)] if dtype == torch.bfloat16 else [])
        for form, turn_off in forms:
            on, off = _model("sd15", dtype), _model("sd15", dtype)
            sdkern.patch(on)
            sdkern.patch(off)
            turn_off(off)
            args = (x, t, ctx)
            t_on, t_off, gain = _pair(
                lambda k, m=on, a=args: m(a[0], a[1], encoder_hidden_states=a[2]),
                lambda k, m=off, a=args: m(a[0], a[1], encoder_hidden_states=a[2]),
                reps,
                2,
            )
            row = dict(table="step", dtype=str(dtype)[6:], latent=size, form=form, gain=gain)
            row.update(on_ms=t_on * 1e3, off_ms=t_off * 1e3)
            _emit(
                rows,
                row,
                f"step   {row['dtype']:8s} {size}x{size} {form:7s} on {t_on * 1e3:7.0f} ms  off {t_off * 1e3:7.0f} ms  "
                f"gain {gain:.3f}x",
            )
            del on, off
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--tables", nargs="+", default=["im2col", "geglu"], choices=["im2col", "geglu", "step"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32], help="step: latent sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--copies", type=int, default=4, help="weight copies cycled (cold weights)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for d in args.dtypes:
        if "im2col" in args.tables:
            rows += im2col_rows(DTYPES[d], args.reps, args.copies)
        if "geglu" in args.tables:
            rows += geglu_rows(DTYPES[d], args.reps, args.copies)
        if "step" in args.tables:
            rows += step_rows(DTYPES[d], args.sizes, args.reps)
    if args.out:
        write_results(args.out, "cpu_engine_forms", False, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
