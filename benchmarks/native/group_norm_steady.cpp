// Steady-state timing of the CPU GroupNorm / SkipGroupNorm kernels without Python, torch or a fresh
// output allocation per call (the same buffers every call: no page faults, warm caches). It isolates
// the kernel from what benchmarks/ops_cpu.py measures around it (dispatch, allocation, first touch).
//
// Build and run (from the repository root; AVX-512-BF16 level, as the dispatcher picks on Zen 4):
//   K=kernels; g++ -O3 -std=c++17 -fopenmp -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c \
//     -mavx512bf16 -DSDKERN_ISA_NS=avx512bf16 -I$K/include -I$K/cpu benchmarks/native/group_norm_steady.cpp \
//     $K/cpu/group_norm.cpp $K/cpu/skip_group_norm.cpp -o /tmp/gn_steady
//   OMP_NUM_THREADS=2 /tmp/gn_steady C HW SILU [SKIP [COLD]]     # e.g. 640 32 1 1
// SKIP=1: SkipGroupNorm with a broadcast (N, C) skip, a bias and the s output (SD's ResNet case).
// COLD=1: before every timed call, 64 MiB are written (untimed) so x starts in DRAM, not in the caches.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "sdkern/group_norm.h"

namespace sdkern {
namespace cpu {
namespace avx512bf16 {
Status group_norm(const GroupNormArgs& a);
Status skip_group_norm(const GroupNormArgs& a);
}  // namespace avx512bf16
}  // namespace cpu
}  // namespace sdkern

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s C HW SILU [SKIP]\n", argv[0]);
    return 2;
  }
  const int64_t N = 2, C = std::atoi(argv[1]), HW = std::atoi(argv[2]), P = HW * HW;
  const bool silu = std::atoi(argv[3]) != 0, skip = argc > 4 && std::atoi(argv[4]) != 0;
  const bool cold = argc > 5 && std::atoi(argv[5]) != 0;
  std::vector<float> evict(cold ? (64 << 20) / sizeof(float) : 0);
  std::vector<float> x(N * P * C), y(x.size()), s(x.size()), gamma(C, 1.1f), beta(C, 0.1f), sk(N * C, 0.3f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
  sdkern::GroupNormArgs a;
  a.x = x.data(), a.gamma = gamma.data(), a.beta = beta.data(), a.y = y.data();  // (N, P, C) NHWC
  a.N = N, a.C = C, a.P = P, a.groups = 32, a.silu = silu;
  a.x_sn = P * C, a.x_sc = 1, a.x_sp = C;
  if (skip) {
    a.skip = sk.data(), a.bias = beta.data(), a.s = s.data();  // skip (N, C) broadcast, bias [C]
    a.skip_sn = C, a.skip_sc = 1, a.skip_sp = 0;
  }
  std::vector<double> ms;
  for (int r = 0; r < 300; ++r) {
    for (size_t i = 0; i < evict.size(); i += 16) evict[i] = static_cast<float>(r);  // one store per line
    const auto t0 = std::chrono::steady_clock::now();
    const sdkern::Status st = skip ? sdkern::cpu::avx512bf16::skip_group_norm(a) : sdkern::cpu::avx512bf16::group_norm(a);
    const auto t1 = std::chrono::steady_clock::now();
    if (!st.ok()) {
      std::fprintf(stderr, "kernel error: %s\n", st.message.c_str());
      return 1;
    }
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  std::printf("%s%s N2 C%ld %ldx%ld NHWC fp32 silu=%d: min %.3f ms, median %.3f ms\n", skip ? "skip_group_norm" : "group_norm",
              cold ? " (cold)" : "", static_cast<long>(C), static_cast<long>(HW), static_cast<long>(HW), silu ? 1 : 0, ms.front(), ms[ms.size() / 2]);
  return 0;
}
