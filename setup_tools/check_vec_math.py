"""Build check: accuracy of kernels/cpu/vec_math.h (vectorised exp, erf, GELU, SiLU) on this host.

Compiles a small C++ program against the header once per ISA flag set the CPU kernels use, runs
it over a dense sweep of float inputs under ``#pragma omp simd`` (so the vectorised code is what
is measured), and compares every result with std::exp / std::erf evaluated in double precision.
Exits non-zero when a maximum relative error exceeds its bound or the program cannot be built.

Usage: ``python setup_tools/check_vec_math.py [--cxx g++]``
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Maximum relative error allowed (vs the double-precision value) for each function.
BOUNDS = {"exp": 2e-7, "erf": 4e-7, "gelu": 6e-7, "silu": 3e-7, "gelu_tail": 1e-6}

PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include <vector>
#include "vec_math.h"
namespace vm = sdkern::cpu::vm;

template <typename F, typename R>
static double sweep(const char* name, float lo, float hi, long n, F f, R ref, double floor_abs) {
  std::vector<float> x(n), y(n);
  for (long i = 0; i < n; ++i) x[i] = lo + (hi - lo) * (float)((double)i / (double)(n - 1));
#pragma omp simd
  for (long i = 0; i < n; ++i) y[i] = f(x[i]);
  double worst = 0.0; float at = 0.0f;
  for (long i = 0; i < n; ++i) {
    const double r = ref((double)x[i]);
    const double err = std::fabs((double)y[i] - r) / std::fmax(std::fabs(r), floor_abs);
    if (!(err <= worst)) { worst = err; at = x[i]; }
  }
  std::printf("%s %.3e %.9g\n", name, worst, at);
  return worst;
}

int main() {
  const long n = 2000003;
  const double tiny = 1e-37;  // below this, compare absolutely (fp32 normals end at 1.2e-38)
  sweep("exp", -103.0f, 88.7f, n, [](float v) { return vm::exp(v); }, [](double v) { return std::exp(v); }, tiny);
  sweep("erf", -6.0f, 6.0f, n, [](float v) { return vm::erf(v); }, [](double v) { return std::erf(v); }, tiny);
  sweep("erf", -1e-3f, 1e-3f, n, [](float v) { return vm::erf(v); }, [](double v) { return std::erf(v); }, tiny);
  auto gelu = [](double v) { return 0.5 * v * std::erfc(-v / std::sqrt(2.0)); };
  sweep("gelu", -5.0f, 12.0f, n, [](float v) { return vm::gelu_erf(v); }, gelu, tiny);
  sweep("gelu_tail", -12.0f, -5.0f, n, [](float v) { return vm::gelu_erf(v); }, gelu, tiny);
  sweep("silu", -80.0f, 80.0f, n, [](float v) { return vm::silu(v); },
        [](double v) { return v / (1.0 + std::exp(-v)); }, tiny);
  // Special values must not be silently wrong.
  const float inf = INFINITY;
  int bad = 0;
  bad += !(vm::exp(inf) == inf) + !(vm::exp(-inf) == 0.0f) + !std::isnan(vm::exp(NAN)) + !(vm::exp(0.0f) == 1.0f);
  bad += !(vm::erf(inf) == 1.0f) + !(vm::erf(-inf) == -1.0f) + !std::isnan(vm::erf(NAN)) + !(vm::erf(0.0f) == 0.0f);
  bad += !(vm::gelu_erf(inf) == inf) + !std::isnan(vm::gelu_erf(NAN)) + !(vm::gelu_erf(-30.0f) == 0.0f);
  std::printf("special %d 0\n", bad);
  return 0;
}
"""

ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cxx", default=os.environ.get("CXX", "c++"))
    args = ap.parse_args()
    if shutil.which(args.cxx) is None:
        print(f"check_vec_math: FAILED: no C++ compiler '{args.cxx}'")
        return 1
    isas = ISA_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else {"baseline": []}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "vm.cpp"
        src.write_text(PROGRAM)
        for isa, flags in isas.items():
            exe = Path(tmp) / f"vm_{isa}"
            cmd = [args.cxx, "-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", *flags,
                   f"-I{ROOT / 'kernels' / 'cpu'}", f"-I{ROOT / 'kernels' / 'include'}",
                   str(src), "-o", str(exe)]  # fmt: skip
            build = subprocess.run(cmd, capture_output=True, text=True)
            if build.returncode != 0:
                print(f"check_vec_math: FAILED to compile for {isa}:\n{build.stderr[-2000:]}")
                return 1
            run = subprocess.run([str(exe)], capture_output=True, text=True)
            if run.returncode != 0:
                if run.returncode < 0 and isa != "baseline":  # illegal instruction: CPU lacks the ISA
                    print(f"  {isa}: not runnable on this CPU, skipped")
                    continue
                print(f"check_vec_math: FAILED: {isa} program exited {run.returncode}")
                return 1
            for line in run.stdout.splitlines():
                name, err, at = line.split()
                if name == "special":
                    ok = int(err) == 0
                    print(f"  {isa:9s} special values: {'ok' if ok else f'{err} wrong'}")
                else:
                    ok = float(err) <= BOUNDS[name]
                    print(f"  {isa:9s} {name:10s} max rel err {float(err):.2e} (at {at}), bound {BOUNDS[name]:.0e}")
                if not ok:
                    failures.append(f"{isa} {name}")
    if failures:
        print("check_vec_math: FAILED: " + ", ".join(failures))
        return 1
    print("check_vec_math: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
