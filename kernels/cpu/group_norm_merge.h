// GroupNorm on CPU, phase 2: merge the partial moments of each (n, group) (Chan/Welford combine in
// double: negligible cost per group, and it keeps the merge of many chunks from adding rounding error
// of its own), then the per-channel constants of the normalise pass: y = (v - K2) * a_c + b_c with
// K2 = the group mean rounded to fp32, a_c = gamma_c * rstd, b_c = beta_c - (mean - K2) * a_c.
#pragma once

#include <cmath>
#include <cstdint>

#include "group_norm_plan.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace gn {

inline Moments64 combine(Moments64 a, Moments64 b) {
  const double n = a.n + b.n;
  if (n == 0.0) return {0.0, 0.0, 0.0};
  const double delta = b.mean - a.mean, wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// Moments of group g of image n -> per-channel a = gamma * rstd, b and the pivot of the normalise pass.
// Re-centred on the mean rounded to fp32 (K2): v - K2 is then as exact as v - K was (Sterbenz for
// large offsets) and the output needs no cancellation between (v - K) * a and b when the pivot K
// happened to be an outlier of its group. The remainder mean - K2 is tiny and exact enough in double.
// Writes only the group's channels (pivot included: phase 1 is done reading them).
template <typename T>
inline void finalize(const Plan<T>& pl, int64_t n, int64_t g, const Moments64& acc) {
  const double rstd = 1.0 / std::sqrt(acc.m2 / acc.n + static_cast<double>(pl.eps));
  const int64_t c0 = g * pl.cpg;
  const double mean = static_cast<double>(pl.pivot[n * pl.C + c0]) + acc.mean;
  const float k2 = static_cast<float>(mean);
  const double rest = mean - static_cast<double>(k2);
  for (int64_t c = c0; c < c0 + pl.cpg; ++c) {
    const double ac = static_cast<double>(load_param(pl.gamma, pl.param_dtype, c)) * rstd;
    pl.scale[n * pl.C + c] = static_cast<float>(ac);
    const double bc = static_cast<double>(load_param(pl.beta, pl.param_dtype, c)) - rest * ac;
    pl.shift[n * pl.C + c] = static_cast<float>(bc);
    pl.pivot[n * pl.C + c] = k2;
  }
}

// Every (n, group), shared among the team (after a barrier: all partials are written).
template <typename T>
inline void merge_groups(const Plan<T>& pl) {
  int64_t t_begin, t_end;
  thread_range(pl.N * pl.G, t_begin, t_end);
  for (int64_t ng = t_begin; ng < t_end; ++ng) {
    const Moments64* pr = pl.part + ng * pl.units;
    Moments64 acc{0.0, 0.0, 0.0};
    for (int64_t u = 0; u < pl.units; ++u) acc = combine(acc, pr[u]);
    finalize(pl, ng / pl.G, ng % pl.G, acc);
  }
}

}  // namespace gn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
