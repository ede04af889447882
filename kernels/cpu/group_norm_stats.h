// GroupNorm on CPU, phase 1: per-(n, group) pivots and the shifted sums of every work unit.
//
// All statistics are taken about a per-(n, group) pivot K (a 16-sample mean estimate), so inputs
// with a large common offset (1000 + randn) lose no accuracy: v - K is exact or nearly so, and the
// mean is only ever held as the small difference mean - K. Per-channel sums run over at most 64
// pixels in fp32 (vectorised); each unit's sums become (count, mean - K, M2) in double
// (from_shifted_sums) for the merge (group_norm_merge.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "group_norm_plan.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace gn {

// Moments of a block from its sum and sum of squares about the pivot (mean is relative to the pivot).
inline Moments64 from_shifted_sums(double n, double sum, double sumsq) {
  const double m = sum / n;
  const double m2 = sumsq - sum * m;
  return {n, m, m2 > 0.0 ? m2 : 0.0};
}

// Serial O(N*C) preparation: bias and broadcast skip in fp32, and the pivot K of each (n, group):
// the mean of up to 16 samples spread over the group's channels and pixels. The closer K is to the
// group mean, the less the fp32 shifted sums of squares cancel (a single element as pivot can be a
// 3-sigma outlier: ~10x more rounding error in M2).
template <typename T>
inline void prepare(const Plan<T>& pl) {
  const int64_t N = pl.N, C = pl.C, cpg = pl.cpg;
  if (pl.has_bias)
    for (int64_t c = 0; c < C; ++c) pl.biasf[c] = load_param(pl.bias, pl.bias_dtype, c);
  if (pl.bcast)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) pl.bsk[n * C + c] = to_f32(pl.skip[n * pl.ksn + c * pl.ksc]);
  const int64_t samples = std::min<int64_t>(16, cpg * pl.P);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < pl.G; ++g) {
      const int64_t c0 = g * cpg;
      double sum = 0.0;
      for (int64_t j = 0; j < samples; ++j) sum += value_at(pl, n, c0 + j % cpg, (j * pl.P) / samples);
      const float k = static_cast<float>(sum / static_cast<double>(samples));
      for (int64_t c = c0; c < c0 + cpg; ++c) pl.pivot[n * C + c] = k;
    }
  }
}

#if defined(SDKERN_SIMD_AVX512)
// Per-channel shifted sums over pixels [p0, p1): acc_s[c] = sum(v - K_c), acc_q[c] = sum((v - K_c)^2),
// one pixel row after another (the accumulators, 2 x C floats, stay in L1). Also writes s (kWriteS).
// Each lane sums at most one chunk of pixels (make_plan caps chunks at 64 pixels when P allows), in
// fp32. Row by row rather than register-blocked tiles: tiles keep the accumulators in registers but
// read x and write s in several interleaved row streams, which measured slower
// (benchmarks/results/cpu_kernel_design_notes.md).
template <typename T, int kMode>
inline void nhwc_stats_rows(const NhwcRows<T, kMode>& r, int64_t C, int64_t p0, int64_t p1, const float* kp,
                            float* acc_s, float* acc_q) {
  for (int64_t c = 0; c < C; ++c) acc_s[c] = 0.0f, acc_q[c] = 0.0f;
  for_each_row_piece(C, p0, p1, [&](int64_t p, int64_t c, __mmask16 m) {
    const __m512 v = r.value(p, c, m);
    if constexpr ((kMode & kWriteS) != 0) store16(r.s + p * r.xsp + c, v, m);
    const __m512 d = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(m, kp + c));
    _mm512_mask_storeu_ps(acc_s + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc_s + c), d));
    _mm512_mask_storeu_ps(acc_q + c, m, _mm512_fmadd_ps(d, d, _mm512_maskz_loadu_ps(m, acc_q + c)));
  });
}

// Shifted sums of a stream of rows about one pivot (the flat NCHW path): 16 fp32 lanes that each add at
// most 64 values before they are moved into double totals. The accumulators are locals of an inlined
// object, so they stay in registers across rows (an array the compiler must keep in memory made each
// vector wait for the previous store).
struct LaneSums {
  __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps();
  int used = 0;
  double ss = 0.0, qq = 0.0;

  inline void flush() {
    const __m512d s2 = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(s)),
                                     _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1))));
    const __m512d q2 = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(q)),
                                     _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(q), 1))));
    ss += _mm512_reduce_add_pd(s2), qq += _mm512_reduce_add_pd(q2);
    s = _mm512_setzero_ps(), q = _mm512_setzero_ps(), used = 0;
  }
  inline void add16(__m512 d) {
    s = _mm512_add_ps(s, d), q = _mm512_fmadd_ps(d, d, q);
    if (++used == 64) flush();
  }
  // v: [n] fp32 values; k: the pivot.
  inline void add(const float* v, int64_t n, float k) {
    const __m512 kk = _mm512_set1_ps(k);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) add16(_mm512_sub_ps(_mm512_loadu_ps(v + i), kk));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
      add16(_mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, v + i), kk));
    }
  }
  inline void totals(double& sum, double& sumsq) {
    flush();
    sum = ss, sumsq = qq;
  }
};
#else
// Portable LaneSums: fp32 SIMD reductions over blocks of 256 values (at most 64 per lane even with
// 4-lane SSE), each added in double.
struct LaneSums {
  double ss = 0.0, qq = 0.0;
  inline void add(const float* v, int64_t n, float k) {
    for (int64_t i0 = 0; i0 < n; i0 += 256) {
      const int64_t i1 = std::min(n, i0 + 256);
      float s1 = 0.0f, q1 = 0.0f;
#pragma omp simd reduction(+ : s1, q1)
      for (int64_t i = i0; i < i1; ++i) {
        const float d = v[i] - k;
        s1 += d;
        q1 += d * d;
      }
      ss += s1, qq += q1;
    }
  }
  inline void totals(double& sum, double& sumsq) { sum = ss, sumsq = qq; }
};
#endif

// NHWC: per-channel shifted sums of chunk ch of image n into acc_s / acc_q ([C] floats each; b0, b1:
// row buffers), writing s on the way; then the chunk's moments per group into part.
template <typename T>
inline void stats_nhwc_chunk(const Plan<T>& pl, int64_t n, int64_t ch, float* b0, float* b1, float* acc_s,
                             float* acc_q) {
  const int64_t C = pl.C, cpg = pl.cpg;
  const int64_t p0 = ch * pl.rows_per_chunk, p1 = std::min(pl.P, p0 + pl.rows_per_chunk);
  const float* kp = pl.pivot + n * C;
#if defined(SDKERN_SIMD_AVX512)
  if (pl.blocked) {
    with_mode(pl.stats_mode, [&](auto mode) {
      nhwc_stats_rows(nhwc_rows<T, decltype(mode)::value>(pl, n, pl.s != nullptr), C, p0, p1, kp, acc_s, acc_q);
    });
  } else
#endif
  {
    for (int64_t c = 0; c < C; ++c) acc_s[c] = 0.0f, acc_q[c] = 0.0f;
    for (int64_t p = p0; p < p1; ++p) {
      const float* v = pixel_values(pl, n, p, b0, b1);
      if (pl.s) put_row(v, pl.s + n * pl.xsn + p * pl.xsp, 1, C);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float d = v[c] - kp[c];
        acc_s[c] += d;
        acc_q[c] += d * d;
      }
    }
  }
  const double cnt = static_cast<double>((p1 - p0) * cpg);
  for (int64_t g = 0; g < pl.G; ++g) {
    double ss = 0.0, qq = 0.0;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) ss += acc_s[c], qq += acc_q[c];
    pl.part[(n * pl.G + g) * pl.units + ch] = from_shifted_sums(cnt, ss, qq);
  }
}

// NHWC: this thread's contiguous share of the (n, chunk) work items, in order (the normalise pass
// walks the same share backwards). b0, b1: the first two rows of the thread's slot of 4.
template <typename T>
inline void stats_nhwc(const Plan<T>& pl, float* b0, float* b1) {
  float* acc_s = b1 + pl.row_len;     // [C] shifted sums
  float* acc_q = acc_s + pl.row_len;  // [C] shifted sums of squares
  int64_t t_begin, t_end;
  thread_range(pl.N * pl.nchunks, t_begin, t_end);
  for (int64_t task = t_begin; task < t_end; ++task)
    stats_nhwc_chunk(pl, task / pl.nchunks, task % pl.nchunks, b0, b1, acc_s, acc_q);
}

// Channel rows: the moments of each (n, c) over all P pixels, shared among the team. b0, b1: the
// thread's row buffers.
template <typename T>
inline void stats_channels(const Plan<T>& pl, float* b0, float* b1) {
  const int64_t C = pl.C, P = pl.P;
  int64_t t_begin, t_end;
  thread_range(pl.N * C, t_begin, t_end);
  for (int64_t nc = t_begin; nc < t_end; ++nc) {
    const int64_t n = nc / C, c = nc % C;
    const float* v = channel_values(pl, n, c, b0, b1);
    if (pl.s) put_row(v, pl.s + n * pl.xsn + c * pl.xsc, pl.xsp, P);
    const float k = pl.pivot[nc];
    float ss = 0.0f, qq = 0.0f;
#pragma omp simd reduction(+ : ss, qq)
    for (int64_t p = 0; p < P; ++p) {
      const float d = v[p] - k;
      ss += d;
      qq += d * d;
    }
    const int64_t g = c / pl.cpg;
    pl.part[(n * pl.G + g) * pl.units + (c - g * pl.cpg)] = from_shifted_sums(static_cast<double>(P), ss, qq);
  }
}

}  // namespace gn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
