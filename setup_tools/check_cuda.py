#!/usr/bin/env python3
"""Resource check of the CUDA C++ kernels (kernels/cuda/*.cu) for every target architecture.

Compiles each translation unit with ``nvcc -Xptxas -v`` (same flags as the CMake build, no GPU
needed), reads the ptxas report of every kernel and fails (exit 1) when a kernel

* uses local memory: a stack frame or register spills (unless listed in ``ALLOWED_LOCAL`` with a reason),
* uses more static shared memory than 48 KiB, or more static + dynamic shared memory than 48 KiB
  (a launch that does not opt in) or the architecture's per-block opt-in limit (kernels whose
  launcher sets cudaFuncAttributeMaxDynamicSharedMemorySize; the dynamic amounts come from the kernels' own constants:
  ``attention_tc_config.h`` is compiled on the host and run; the norm kernels' caps are read from source).

Prints a Markdown table; ``--write`` also stores it in benchmarks/results/cuda_resources.md.
When nvcc is missing the check fails, unless ``SDKERN_CUDA=OFF`` says the CUDA kernels are not wanted.

Usage: python setup_tools/check_cuda.py [--archs 80,90] [--write] [--jobs 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "kernels" / "cuda"
INCLUDE = ROOT / "kernels" / "include"
RESULT = ROOT / "benchmarks" / "results" / "cuda_resources.md"
FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo", f"-I{INCLUDE}"]

STATIC_SMEM_LIMIT = 48 * 1024
# Static + dynamic shared memory of a launch that does not opt in with cudaFuncAttributeMaxDynamicSharedMemorySize.
DEFAULT_SMEM_LIMIT = 48 * 1024
# Kernels whose launcher opts in (cudaFuncSetAttribute): they may use up to the arch's OPTIN_SMEM_LIMIT.
OPTIN_KERNELS = ("flash_attn_tc_kernel",)
# Max shared memory per block with cudaFuncAttributeMaxDynamicSharedMemorySize (CUDA programming guide).
OPTIN_SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# Kernels allowed to use local memory, with the reason. Empty: none may.
ALLOWED_LOCAL: dict[str, str] = {}


@dataclass
class Kernel:
    arch: int
    name: str  # demangled
    regs: int = 0
    smem: int = 0  # static shared memory (bytes)
    lmem: int = 0
    stack: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    dyn_smem: int = 0  # largest dynamic shared memory the launcher requests
    problems: list[str] = field(default_factory=list)


def find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return dict(zip(names, lines, strict=True)) if len(lines) == len(names) else {n: n for n in names}


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_LMEM = re.compile(r"(\d+) bytes lmem")


def parse_ptxas(log: str) -> list[tuple[int, str, dict[str, int]]]:
    """(arch, mangled name, resources) for every entry function in a ptxas -v log."""
    entries: dict[tuple[int, str], dict[str, int]] = {}
    order: list[tuple[int, str]] = []
    cur: tuple[int, str] | None = None
    props_name: str | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            cur = (int(m.group(2)), m.group(1))
            if cur not in entries:
                entries[cur] = {}
                order.append(cur)
            continue
        if m := _PROPS.search(line):
            props_name = m.group(1)
            continue
        if m := _STACK.search(line):
            key = cur if cur and (props_name is None or props_name == cur[1]) else None
            if key:
                entries[key].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        if cur and (m := _USED.search(line)):
            res = entries[cur]
            res["regs"] = int(m.group(1))
            if s := _SMEM.search(line):
                res["smem"] = int(s.group(1))
            if s := _LMEM.search(line):
                res["lmem"] = int(s.group(1))
    return [(arch, name, entries[(arch, name)]) for arch, name in order]


def compile_unit(nvcc: str, src: Path, archs: list[int], workdir: Path) -> str:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [nvcc, *FLAGS, *gencode, "-Xptxas=-v", "-c", str(src), "-o", str(workdir / (src.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src.name}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def attention_dynamic_smem(workdir: Path) -> dict[int, int]:
    """{padded head dim: dynamic shared bytes} from attention_tc_config.h, compiled on the host."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no host C++ compiler to evaluate attention_tc_config.h")
    prog = workdir / "attn_cfg.cpp"
    prog.write_text(
        '#include <cstdio>\n#include "attention_tc_config.h"\n'
        "using namespace sdkern::cuda::attn;\n"
        'template <int DP> void p() { std::printf("%d %d\\n", DP, TcConfig<DP>::kSmemBytes); }\n'
        "int main() { " + " ".join(f"p<{d}>();" for d in _tc_head_dims()) + " return 0; }\n"
    )
    exe = workdir / "attn_cfg"
    subprocess.run([cxx, "-std=c++17", f"-I{CUDA_DIR}", str(prog), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {int(a): int(b) for a, b in (line.split() for line in out.splitlines())}


def _tc_head_dims() -> list[int]:
    text = (CUDA_DIR / "attention_tc_config.h").read_text()
    m = re.search(r"kTcHeadDims\[\]\s*=\s*\{([^}]*)\}", text)
    if not m:
        raise RuntimeError("kTcHeadDims not found in attention_tc_config.h")
    return [int(x) for x in m.group(1).replace(" ", "").split(",") if x]


def _source_constant(file: str, name: str) -> int:
    """Value of ``constexpr ... name = <expr>;`` in a kernel source: integers, ``* + - /``, ``sizeof`` of
    float/int types and other constants of the same file (resolved the same way)."""
    text = (CUDA_DIR / file).read_text()
    m = re.search(rf"\b{name}\s*=\s*([^;]+);", text)
    if not m:
        raise RuntimeError(f"{name} not found in {file}")
    expr = re.sub(r"sizeof\((?:float|int|int32_t|uint32_t)\)", "4", m.group(1))
    expr = re.sub(r"\b(k[A-Za-z0-9_]+)\b", lambda k: str(_source_constant(file, k.group(1))), expr)
    if not re.fullmatch(r"[0-9\s*+/()-]+", expr):
        raise RuntimeError(f"{name} in {file}: cannot evaluate {m.group(1)!r}")
    return int(eval(expr.replace("/", "//"), {"__builtins__": {}}))  # digits and operators only (checked above)


def dynamic_smem(name: str, attn: dict[int, int]) -> int:
    """Largest dynamic shared memory the launchers request for this kernel (0 if none)."""
    if "flash_attn_tc_kernel" in name:
        m = re.search(r"flash_attn_tc_kernel<[^,]+, (\d+)>", name)
        if not m:
            raise RuntimeError(f"cannot read the head dim of {name}")
        return attn[int(m.group(1))]
    if "skip_layer_norm_kernel" in name:
        # template <T, kVector, kCache, kSkip>: the kCache instantiations take the row cache
        m = re.search(r"skip_layer_norm_kernel<[^,]+, (?:true|false), (true|false)(?:, (?:true|false))?>", short(name))
        if not m:
            raise RuntimeError(f"cannot read the template arguments of {name}")
        return _source_constant("skip_layer_norm.cu", "kMaxCacheBytes") if m.group(1) == "true" else 0
    if "stats_vec_kernel" in name:
        return _source_constant("group_norm_impl.cuh", "kStatsSmemMax")
    return 0


def check(kernels: list[Kernel]) -> None:
    for k in kernels:
        local = k.lmem + k.stack + k.spill_st + k.spill_ld
        base = short(k.name)
        if local and not any(pat in base for pat in ALLOWED_LOCAL):
            k.problems.append(f"local memory (stack {k.stack}, lmem {k.lmem}, spills {k.spill_st}/{k.spill_ld})")
        if k.smem > STATIC_SMEM_LIMIT:
            k.problems.append(f"static smem {k.smem} > {STATIC_SMEM_LIMIT}")
        if any(pat in k.name for pat in OPTIN_KERNELS):
            limit, what = OPTIN_SMEM_LIMIT.get(k.arch, DEFAULT_SMEM_LIMIT), f"sm_{k.arch} opt-in limit"
        else:
            limit, what = DEFAULT_SMEM_LIMIT, "48 KiB limit without opt-in"
        if k.smem + k.dyn_smem > limit:
            k.problems.append(f"smem {k.smem}+{k.dyn_smem} > {what} {limit}")


def short(name: str) -> str:
    name = name.replace("(anonymous namespace)::", "").split("(")[0].replace("sdkern::cuda::", "")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")


def table(kernels: list[Kernel]) -> str:
    rows = [
        "| arch | kernel | regs | static smem | dynamic smem (max) | stack | spill st/ld | status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for k in sorted(kernels, key=lambda k: (k.arch, short(k.name))):
        status = "ok" if not k.problems else "FAIL: " + "; ".join(k.problems)
        rows.append(
            f"| sm_{k.arch} | `{short(k.name)}` | {k.regs} | {k.smem} | {k.dyn_smem} | {k.stack} | "
            f"{k.spill_st}/{k.spill_ld} | {status} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=os.environ.get("SDKERN_CHECK_ARCHS", "80,90"), help="SM numbers, e.g. 80,90")
    ap.add_argument("--write", action="store_true", help=f"write the table to {RESULT.relative_to(ROOT)}")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.replace(";", ",").split(",") if a.strip()]

    nvcc = find_nvcc()
    if nvcc is None:
        if os.environ.get("SDKERN_CUDA", "").upper() == "OFF":
            print("check_cuda: nvcc not found; SDKERN_CUDA=OFF, CUDA kernels not wanted: skipped")
            return 0
        print("check_cuda: FAIL: nvcc not found (set SDKERN_CUDA=OFF if CUDA kernels are not wanted)")
        return 1
    sources = sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        print(f"check_cuda: FAIL: no CUDA sources in {CUDA_DIR}")
        return 1
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]

    with tempfile.TemporaryDirectory(prefix="sdkern_check_cuda_") as tmp:
        work = Path(tmp)
        try:
            attn = attention_dynamic_smem(work)
            with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                logs = list(pool.map(lambda s: compile_unit(nvcc, s, archs, work), sources))
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"check_cuda: FAIL: {e}")
            return 1

    parsed = [entry for log in logs for entry in parse_ptxas(log)]
    names = demangle(sorted({name for _, name, _ in parsed}))
    kernels = []
    for arch, mangled, res in parsed:
        k = Kernel(arch=arch, name=names[mangled], **res)
        k.dyn_smem = dynamic_smem(k.name, attn)
        kernels.append(k)
    found_archs = {k.arch for k in kernels}
    check(kernels)
    text = table(kernels)
    print(text)
    failures = [k for k in kernels if k.problems]
    missing = [a for a in archs if a not in found_archs]
    if missing:
        print(f"check_cuda: FAIL: no kernels reported for sm_{missing}")
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(
            "# CUDA kernel resource usage\n\n"
            f"Generated by `python setup_tools/check_cuda.py --write` on "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
            f"{version}; flags `{' '.join(f for f in FLAGS if not f.startswith('-I'))}`; "
            f"{len(sources)} translation units, {len(kernels)} kernel builds.\n\n"
            "Static smem and registers from `ptxas -v`; dynamic smem is the largest amount the launcher "
            "requests (attention: `attention_tc_config.h`; norms: the caps in their sources). "
            f"Limits: static <= {STATIC_SMEM_LIMIT} B, static + dynamic <= per-arch opt-in maximum "
            f"({', '.join(f'sm_{a}: {OPTIN_SMEM_LIMIT.get(a, 49152)} B' for a in archs)}); no local memory.\n\n"
            + text
            + "\n"
        )
        print(f"check_cuda: wrote {RESULT.relative_to(ROOT)}")
    if failures or missing:
        print(f"check_cuda: FAIL: {len(failures)} kernel build(s) over limits")
        return 1
    print(f"check_cuda: ok: {len(kernels)} kernel builds for sm_{archs}, no local memory, shared memory within limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
