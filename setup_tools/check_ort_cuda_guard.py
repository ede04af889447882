"""Build check: the CUDA execution-provider code of libsdkern_ort (compiled only with SDKERN_ORT_WITH_CUDA,
i.e. when the CUDA kernels are built) still compiles on machines without it.

Compiles every csrc/ort/*.cpp with -fsyntax-only, with and without -DSDKERN_ORT_WITH_CUDA=1, against the
ORT headers (SDKERN_ORT_INCLUDE_DIR, else the vendored third_party/onnxruntime-1.21/include/onnxruntime).
Exits non-zero on a compile error; prints "skipped" and exits 0 when no headers or no C++ compiler exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ort_include() -> Path | None:
    candidates = [os.environ.get("SDKERN_ORT_INCLUDE_DIR", "")]
    candidates.append(str(ROOT / "third_party/onnxruntime-1.21/include/onnxruntime"))
    for c in candidates:
        if c and (Path(c) / "onnxruntime_c_api.h").is_file():
            return Path(c)
    return None


def main() -> int:
    inc = ort_include()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if inc is None or cxx is None:
        print("check_ort_cuda_guard: skipped (no ONNX Runtime headers or no C++ compiler)")
        return 0
    sources = sorted((ROOT / "csrc/ort").glob("*.cpp"))
    failed = 0
    for defines in ([], ["-DSDKERN_ORT_WITH_CUDA=1"]):
        for src in sources:
            cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", *defines, f"-I{inc}",
                   f"-I{ROOT / 'kernels/include'}", str(src)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                failed += 1
                print(f"FAIL {src.name} {' '.join(defines)}\n{proc.stderr[-3000:]}")
    n = 2 * len(sources)
    print(f"check_ort_cuda_guard: {n - failed}/{n} compiles OK (CPU-only and SDKERN_ORT_WITH_CUDA variants)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
