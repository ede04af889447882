#!/usr/bin/env python3
"""Compile every sdkern Triton kernel and launch config for sm_80 and sm_90 (no GPU needed) and check resources.

For each kernel variant the configs that the launchers pick for Stable Diffusion shapes are enumerated
(the same ``*_config`` functions the launchers call), compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and then assembled again with
``ptxas -v`` (Triton's bundled ptxas for that arch) to read registers, spill stores/loads and static
shared memory; Triton's dynamic shared memory comes from the compiled metadata.

Then an integer-argument sweep (sm_80, fp16, one config per kernel and code path): every run-time integer
argument of every kernel set to 1 -- which Triton's launcher specialises into a constant -- and, in turn,
to a value >= 2**31 -- which it types i64 --, one at a time, plus all i64 at once. The SD configs alone
never see batch 1 or a 2**31 stride, and code such as ``N.to(tl.int64)`` only fails to compile then.

Fails (exit 1) when any variant does not compile, spills, or needs more shared memory than the arch
allows (sm_80: 163 KB, sm_90: 227 KB); sweep variants fail on compile errors and shared memory only
(their spills are listed: a >= 2**31 stride is not a shape the launch configs are tuned for).
``--write`` also writes benchmarks/results/triton_resources.md.

Usage: python setup_tools/check_triton.py [--arch 80 90] [--write] [--jobs N] [--no-sweep]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCH_KEY = {80: "sm80", 90: "sm90"}
TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
TORCH_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class Variant:
    """One compilation: kernel name, dtype, constexprs and launch options."""

    kernel: str
    dtype: str
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int = 3
    ones: tuple[str, ...] = ()  # integer args specialised to 1 at run time (unit strides, batch 1, ...)
    wide: tuple[str, ...] = ()  # integer args >= 2**31 at run time (Triton types them i64)
    fp32_args: tuple[str, ...] = field(default=())  # pointer args that are always fp32 (workspaces)
    aligned: tuple[str, ...] = ()  # extra integer args that are multiples of 16 for this variant

    def label(self) -> str:
        cs = ",".join(f"{k}={v}" for k, v in self.constexprs)
        one = f" {'/'.join(self.ones)}=1" if self.ones else ""
        one += f" {'/'.join(self.aligned)}%16=0" if self.aligned else ""
        one += f" {'/'.join(self.wide)}:i64" if self.wide else ""
        return f"{self.kernel} {self.dtype} [{cs}]{one} w{self.num_warps}s{self.num_stages}"


def _kernels() -> dict:
    import importlib

    mod = lambda name: importlib.import_module(f"sdkern.triton.{name}")  # the package re-exports launchers
    return {
        "bias_add_kernel": mod("bias_add").bias_add_kernel,
        "bias_split_gelu_kernel": mod("bias_split_gelu").bias_split_gelu_kernel,
        "skip_layer_norm_kernel": mod("skip_layer_norm").skip_layer_norm_kernel,
        "gn_stats_kernel": mod("group_norm").gn_stats_kernel,
        "gn_combine_kernel": mod("group_norm").gn_combine_kernel,
        "gn_apply_kernel": mod("group_norm").gn_apply_kernel,
        "attention_kernel": mod("attention").attention_kernel,
    }


def variants(cc: int, dtypes: tuple[str, ...]) -> list[Variant]:
    """Every (kernel, config) the launchers choose on this arch for SD shapes and the tested odd shapes."""
    import torch

    from sdkern.triton.attention import attention_config
    from sdkern.triton.bias_add import bias_add_config
    from sdkern.triton.group_norm import group_norm_config
    from sdkern.triton.skip_layer_norm import skip_layer_norm_config

    arch = ARCH_KEY[cc]
    sms = 132 if cc >= 90 else 108
    out: set[Variant] = set()
    for dt in dtypes:
        for c in (320, 640, 768, 1024, 1280, 96):
            cfg = bias_add_config(8192, c, arch)
            ce = (("BLOCK_M", cfg["BLOCK_M"]), ("BLOCK_C", cfg["BLOCK_C"]))
            out.add(Variant("bias_add_kernel", dt, ce, cfg["num_warps"]))
        for d in (1280, 2560, 5120, 96):
            cfg = bias_add_config(8192, d, arch)
            ce = (("BLOCK_M", cfg["BLOCK_M"]), ("BLOCK_C", cfg["BLOCK_C"]))
            out.add(Variant("bias_split_gelu_kernel", dt, ce, cfg["num_warps"]))
        for c in (320, 640, 768, 1024, 1280, 100, 16384):
            cfg = skip_layer_norm_config(c, arch)
            for beta, bias in ((True, True), (False, False)):
                ce = (
                    ("HAS_BETA", beta),
                    ("HAS_BIAS", bias),
                    ("BLOCK_C", cfg["BLOCK_C"]),
                    ("WHOLE_ROW", cfg["WHOLE_ROW"]),
                    ("HAS_SKIP", True),
                )
                out.add(Variant("skip_layer_norm_kernel", dt, ce, cfg["num_warps"]))
            if c in (768, 16384):  # skip=None: plain LayerNorm (whole-row and chunked paths)
                ce = (
                    ("HAS_BETA", True),
                    ("HAS_BIAS", False),
                    ("BLOCK_C", cfg["BLOCK_C"]),
                    ("WHOLE_ROW", cfg["WHOLE_ROW"]),
                    ("HAS_SKIP", False),
                )
                out.add(Variant("skip_layer_norm_kernel", dt, ce, cfg["num_warps"]))
        for n, c, hw, g in ((2, 320, 64, 32), (2, 640, 32, 32), (2, 1280, 16, 32), (2, 1280, 8, 32), (1, 12, 5, 4)):
            for nhwc in (True, False):
                cfg = group_norm_config(n, c, hw * hw, g, nhwc, arch, sms)
                ones = ("sc",) if nhwc else ("sp",)
                tiles = (("BLOCK_P", cfg["BLOCK_P"]), ("BLOCK_C", cfg["BLOCK_C"]))
                for skip in (False, True):
                    flags = (("HAS_SKIP", skip), ("HAS_BIAS", skip), ("WIDE", False))
                    st = (("BLOCK_P", cfg["STATS_BLOCK_P"]), ("BLOCK_C", cfg["BLOCK_C"]))
                    v = Variant(
                        "gn_stats_kernel",
                        dt,
                        flags + st,
                        cfg["stats_warps"],
                        ones=ones,
                        fp32_args=("mean_ptr", "m2_ptr", "cnt_ptr"),
                    )
                    out.add(v)
                    for silu in (False, True):
                        ce = (*flags, ("SILU", silu), *tiles)
                        out.add(
                            Variant(
                                "gn_apply_kernel", dt, ce, cfg["num_warps"], ones=ones, fp32_args=("mu_ptr", "rstd_ptr")
                            )
                        )
                out.add(
                    Variant(
                        "gn_combine_kernel", "fp32", (("BLOCK", cfg["COMBINE_BLOCK"]),), cfg["combine_warps"],
                        fp32_args=("mean_ptr", "m2_ptr", "cnt_ptr", "mu_ptr", "rstd_ptr"),
                    )
                )  # fmt: skip
        tdt = getattr(torch, TORCH_DTYPE_NAMES[dt])
        for d in (40, 64, 80, 128, 160):
            # causal: CLIP text self-attention (77 tokens, head dim 64)
            shapes = ((4096, 4096, False), (4096, 77, False), (64, 64, False)) + (((77, 77, True),) if d == 64 else ())
            for sq, sk, causal in shapes:
                cfg = attention_config(sq, sk, d, d, tdt, arch, causal)
                ce = (
                    ("BLOCK_M", cfg["BLOCK_M"]), ("BLOCK_N", cfg["BLOCK_N"]), ("BLOCK_D", cfg["BLOCK_D"]),
                    ("BLOCK_DV", cfg["BLOCK_DV"]), ("DOT_F32", False), ("IEEE", dt == "fp32"), ("CAUSAL", causal),
                )  # fmt: skip
                al = ("D", "DV") if d % 16 == 0 else ()
                out.add(Variant("attention_kernel", dt, ce, cfg["num_warps"], cfg["num_stages"], aligned=al))
    return sorted(out, key=lambda v: v.label())


def int_args(fn, v: Variant) -> list[str]:
    """The kernel's run-time integer arguments (not constexpr, pointer or float) for this variant."""
    consts = dict(v.constexprs)
    return [n for n in fn.arg_names if n not in consts and not n.endswith("_ptr") and n not in ("eps", "qk_scale")]


# Which launch configs of each kernel the integer sweep starts from: every feature flag on (all
# integer arguments are used), and both code paths of skip_layer_norm.
_SWEEP_FLAGS = ("HAS_SKIP", "HAS_BIAS", "HAS_BETA", "SILU")
# The >= 2**31 variants of kernels that have a 64-bit-offset switch turn it on, as the launcher does.
_WIDE_FLAG = "WIDE"


def sweep_variants(cc: int) -> list[Variant]:
    """Each integer argument of each kernel set to 1 (Triton specialises it to a constant) and, in turn, to a
    value >= 2**31 (Triton types it i64), one argument at a time, plus all of them i64 at once; fp16, one
    config per kernel and code path. Catches code that only compiles for the values the SD shapes give
    (``N.to(tl.int64)`` with N = 1 is a constant without ``.to``)."""
    bases: dict[tuple, Variant] = {}
    for v in variants(cc, ("fp16",)):
        c = dict(v.constexprs)
        if all(c.get(f, True) is True for f in _SWEEP_FLAGS):
            bases.setdefault((v.kernel, c.get("WHOLE_ROW")), v)
    fns = _kernels()
    out: set[Variant] = set()
    for base in bases.values():
        names = int_args(fns[base.kernel], base)
        for name in names:
            rest = tuple(o for o in base.ones if o != name)
            out.add(replace(base, ones=(*rest, name)))
            out.add(replace(base, ones=rest, wide=(name,)))
        all_wide = replace(base, ones=(), wide=tuple(names))
        if _WIDE_FLAG in dict(base.constexprs):
            all_wide = replace(
                all_wide, constexprs=tuple((k, True if k == _WIDE_FLAG else v) for k, v in base.constexprs)
            )
            out.add(replace(base, constexprs=all_wide.constexprs))  # the wide variant at SD-like sizes
        out.add(all_wide)
    return sorted(out, key=lambda v: v.label())


def _signature(fn, v: Variant) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and divisibility attrs for a variant (pointers and sizes 16-aligned)."""
    consts = dict(v.constexprs)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in v.ones:
            sig[name] = "constexpr"
            consts[name] = 1
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in v.fp32_args else TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("eps", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in v.wide else "i32"
            if name in ALIGNED_INTS or name in v.aligned:  # strides and channel counts of SD shapes are multiples of 16
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


# Integer arguments that Triton's launcher specialises as multiples of 16 for SD shapes (strides, C, CHUNK).
ALIGNED_INTS = frozenset("sx ss sk C sn sc sp kn kc kp CHUNK sqb sqs sqh skb sks skh svb svs svh".split())

_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def compile_one(args: tuple[int, Variant]) -> dict:
    """Compile one variant for one arch; returns its resource row (or the error)."""
    cc, v, sweep = args if len(args) == 3 else (*args, False)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = _kernels()[v.kernel]
    row = {"cc": cc, "label": v.label(), "kernel": v.kernel, "dtype": v.dtype, "sweep": sweep}
    t0 = time.time()
    try:
        sig, consts, attrs = _signature(fn, v)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        ck = triton.compile(
            src, target=GPUTarget("cuda", cc, 32), options={"num_warps": v.num_warps, "num_stages": v.num_stages}
        )
        ptx = ck.asm["ptx"]
        gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "k.ptx"
            p.write_text(ptx)
            res = subprocess.run(
                [get_ptxas(cc).path, "-v", f"--gpu-name={gpu}", str(p), "-o", str(Path(tmp) / "k.cubin")],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
        log = res.stdout + res.stderr
        spill = _SPILL.search(log)
        row.update(
            regs=int(_PTXAS.search(log).group(1)),
            spill_st=int(spill.group(1)) if spill else 0,
            spill_ld=int(spill.group(2)) if spill else 0,
            smem_static=int(_SMEM.search(log).group(1)) if _SMEM.search(log) else 0,
            smem_dyn=int(ck.metadata.shared),
            warps=v.num_warps,
            gpu=gpu,
        )
    except Exception as e:  # noqa: BLE001 -- report every failure in the table; the exit code carries it
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    row["seconds"] = round(time.time() - t0, 2)
    return row


def problems(row: dict) -> list[str]:
    if "error" in row:
        return [row["error"]]
    bad = []
    if (row["spill_st"] or row["spill_ld"]) and not row.get("sweep"):
        bad.append(f"spills {row['spill_st']}B st / {row['spill_ld']}B ld")
    smem = row["smem_dyn"] + row["smem_static"]
    if smem > SMEM_LIMIT[row["cc"]]:
        bad.append(f"shared memory {smem} B > {SMEM_LIMIT[row['cc']]} B")
    return bad


def table(rows: list[dict]) -> str:
    import triton

    lines = [
        f"# Triton kernel resources (triton {triton.__version__}, ptxas -v, no GPU needed)",
        "",
        "Generated by `python setup_tools/check_triton.py --write`. smem = Triton dynamic shared memory"
        " (compiled metadata) + static; limits sm_80 163 KB, sm_90 227 KB.",
        "",
        "| arch | variant | regs | spill st/ld (B) | smem (B) | status |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        bad = problems(r)
        status = "ok" if not bad else "FAIL: " + "; ".join(bad)
        if not bad and r.get("sweep") and (r.get("spill_st") or r.get("spill_ld")):
            status = f"ok (sweep; spills {r['spill_st']}/{r['spill_ld']} B)"
        if "error" in r:
            lines.append(f"| sm_{r['cc']} | `{r['label']}` | - | - | - | {status} |")
        else:
            smem = r["smem_dyn"] + r["smem_static"]
            lines.append(
                f"| {r['gpu']} | `{r['label']}` | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | {smem} | {status} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=sorted(TYPES))
    ap.add_argument("--only", nargs="+", default=None, help="compile only these kernels (names as in the table)")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/triton_resources.md")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--sweep-arch",
        type=int,
        default=80,
        choices=sorted(SMEM_LIMIT),
        help="arch of the integer-argument sweep (each int argument = 1, then >= 2**31, in turn)",
    )
    ap.add_argument("--no-sweep", action="store_true", help="skip the integer-argument sweep")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        print(f"check_triton: triton is not importable ({e})", file=sys.stderr)
        return 1
    work = [
        (cc, v) for cc in args.arch for v in variants(cc, tuple(args.dtypes)) if not args.only or v.kernel in args.only
    ]
    if not args.no_sweep:
        sweep = [v for v in sweep_variants(args.sweep_arch) if not args.only or v.kernel in args.only]
        seen = set(work)
        work += [(args.sweep_arch, v, True) for v in sweep if (args.sweep_arch, v) not in seen]
    t0 = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            rows = list(ex.map(compile_one, work))
    else:
        rows = [compile_one(w) for w in work]
    text = table(rows)
    print(text)
    nbad = sum(1 for r in rows if problems(r))
    print(f"check_triton: {len(rows)} variants compiled in {time.time() - t0:.0f} s, {nbad} problem(s)")
    if args.write:
        out = ROOT / "benchmarks" / "results" / "triton_resources.md"
        out.write_text(text)
        print(f"wrote {out.relative_to(ROOT)}")
    return 1 if nbad else 0


if __name__ == "__main__":
    sys.exit(main())
