// Shared CPU implementation of GroupNorm(+SiLU) and SkipGroupNorm (group_norm.cpp, skip_group_norm.cpp).
//
// Tensors are (N, C, P) strided views (sdkern/group_norm.h). Two traversals (make_plan decides):
//  * NHWC (x_sc == 1): a "row" is the C contiguous channels of one pixel. Work items are
//    (n, chunk of pixels); per-channel shifted sums are accumulated across whole rows (vectorised
//    over C), reduced to per-group (count, mean, M2) at the end of the chunk, and the chunks of a
//    (n, group) are merged with the Chan/Welford combine. Splitting P keeps both cores busy even at
//    batch 2 with 32 groups.
//  * otherwise (NCHW, sp == 1, or any other strides): a "row" is one channel's P pixels; work
//    items are (n, c) rows, merged per group the same way. NCHW with contiguous rows and enough
//    groups for every thread takes the fused per-group pass (flat_groups).
// Phases, one file each: statistics (group_norm_stats.h), merge (group_norm_merge.h), normalise
// (group_norm_normalise.h); the plan and what they share in group_norm_plan.h.
//
// Work split: make_plan (group_norm_plan.h) chunks an image by P and the thread budget only, never by
// N, so batched results equal solo results bit for bit.
//
// Skip variant: v = (x + skip) + bias in fp32 (the order of the reference); s is written in x's dtype;
// y normalises the fp32 v (never the rounded s).
//
// Everything lives in the ISA namespace: this header is compiled once per instruction-set level.
#pragma once

#include <cstdint>

#include "group_norm_merge.h"
#include "group_norm_normalise.h"
#include "group_norm_plan.h"
#include "group_norm_stats.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace gn {

// NCHW with contiguous channel rows: one pass per (n, group), statistics and then the normalised rows
// while the group (cpg * P values) is still in cache. No per-row moments to merge: all rows of a
// group share the pivot, so their shifted sums just add. b0, b1: the thread's row buffers.
template <typename T>
inline void flat_groups(const Plan<T>& pl, float* b0, float* b1) {
  const int64_t P = pl.P, cpg = pl.cpg;
  int64_t t_begin, t_end;
  thread_range(pl.N * pl.G, t_begin, t_end);
  for (int64_t ng = t_begin; ng < t_end; ++ng) {
    const int64_t n = ng / pl.G, g = ng % pl.G, c0 = g * cpg;
    const float k = pl.pivot[n * pl.C + c0];
    LaneSums sums;
    for (int64_t c = c0; c < c0 + cpg; ++c) {
      const float* v = channel_values(pl, n, c, b0, b1);
      if (pl.s) put_row(v, pl.s + n * pl.xsn + c * pl.xsc, 1, P);
      sums.add(v, P, k);
    }
    double ss, qq;
    sums.totals(ss, qq);
    finalize(pl, n, g, from_shifted_sums(static_cast<double>(cpg * P), ss, qq));
    for (int64_t c = c0; c < c0 + cpg; ++c) {
      const float* v = pl.reread_s ? reinterpret_cast<const float*>(pl.s) + n * pl.xsn + c * pl.xsc
                                   : channel_values(pl, n, c, b0, b1);
      normalise_channel(pl, n, c, v, b1);
    }
  }
}

template <typename T>
Status run(const GroupNormArgs& a, bool with_skip) {
  if (a.N == 0 || a.P == 0) return Status::Ok();
  const Plan<T> pl = make_plan<T>(a, with_skip);
  prepare(pl);  // bias, broadcast skip, pivots (serial)

  // Each phase is a function of this thread's team member: its row buffers (slot of 2 or 4 rows)
  // and its static share of the phase's work items.
  auto b0 = [&pl] { return pl.tbuf + pl.per_thread * thread_id(); };
  auto flat = [&] { flat_groups(pl, b0(), b0() + pl.row_len); };
  // Phase 1: statistics (and s).
  auto stats = [&] {
    if (pl.nhwc) {
      stats_nhwc(pl, b0(), b0() + pl.row_len);
    } else {
      stats_channels(pl, b0(), b0() + pl.row_len);
    }
  };
  // Phase 2: merge per (n, group); per-channel scale and shift.
  auto merge = [&] { merge_groups(pl); };
  // Phase 3: normalise (+SiLU) and write y.
  auto normalise = [&] {
    if (pl.nhwc) {
      normalise_nhwc(pl, b0(), b0() + pl.row_len);
    } else {
      normalise_channels(pl, b0(), b0() + pl.row_len);
    }
  };
  if (pl.flat) {
    parallel(pl.nt, flat);
  } else if (on_host_pool() || pl.nt <= 1) {
    // No barriers on a host pool: one team per phase (the return of each is the barrier).
    parallel(pl.nt, stats);
    parallel(pl.nt, merge);
    parallel(pl.nt, normalise);
  } else {
#if defined(_OPENMP)
    // One OpenMP team for the three phases: a barrier is cheaper than waking a new team.
#pragma omp parallel num_threads(pl.nt)
    {
      stats();
#pragma omp barrier  // every partial is written
      merge();
#pragma omp barrier  // every group's scale and shift is written
      normalise();
    }
#else
    stats(), merge(), normalise();
#endif
  }
  return Status::Ok();
}

}  // namespace gn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
