// SkipLayerNorm on CPU: s = x (+ skip) (+ bias) in fp32; y = (s - mean) * inv_std * gamma (+ beta)
// over rows of C; optional outputs s (x's dtype), mean and inv_std (fp32, per row; ONNX Runtime's
// optional outputs). Rows are split across threads (parallel.h). Each row is read from memory once and
// swept twice: pass 1 forms s, writes it, keeps its fp32 values for pass 2 (in the s output itself
// when that is fp32, else in a stack buffer for rows up to kRowBuf channels, else recomputed from the
// cache-resident x and skip) and accumulates the row statistics; pass 2 writes y. gamma/beta/bias are
// read in their own storage type (fp32 or x's dtype). Without skip (null) it is a plain LayerNorm.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "parallel.h"
#include "sdkern/skip_layer_norm.h"
#include "simd.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

// Row statistics in one pass, shifted by a pivot k = the mean of the row's first (up to) 16 sums:
// d = s - k, sum(d) and sum(d^2) in fp32 SIMD partial sums over chunks of kChunk channels, chunks
// added in double. The shift removes the row's common offset before anything is squared, so
// var = E[d^2] - E[d]^2 does not cancel catastrophically even for rows whose mean is far larger than
// their spread (test_large_mean). The pivot's distance from the row mean still scales the rounding
// error of sum(d^2) by about 1 + ((k - mean) / std)^2: a single element as pivot can be 3 sigma off
// (and then misses the 2x-torch error bound on a noticeable share of random inputs), a 16-sample mean
// is within ~1/4 sigma (measurements: benchmarks/results/cpu_kernel_design_notes.md).
constexpr int64_t kChunk = 256;

// Rows up to this many channels keep their fp32 sum in a stack buffer between the passes.
constexpr int64_t kRowBuf = 4096;

struct RowMoments {
  double sum = 0.0;  // sum of (s - pivot)
  double sq = 0.0;   // sum of (s - pivot)^2
};

// Pass 1 over one row: v(c) = the fp32 sum at channel c, handed to keep(c, v) (stores s / the
// buffer), and the shifted moments.
template <typename Src, typename Keep>
static inline RowMoments row_moments(Src v_at, Keep keep, float pivot, int64_t C) {
  RowMoments mo;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < C ? c0 + kChunk : C;
    float ps = 0.0f, pq = 0.0f;
#pragma omp simd reduction(+ : ps, pq)
    for (int64_t c = c0; c < c1; ++c) {
      const float v = v_at(c);
      keep(c, v);
      const float d = v - pivot;
      ps += d;
      pq += d * d;
    }
    mo.sum += ps;
    mo.sq += pq;
  }
  return mo;
}

// Pass 2 of one row: mean and inv_std from the moments, optional mean / inv_std outputs, then y.
template <typename T, typename P, bool kBeta, typename Src>
static inline void finish_row(Src src, const RowMoments& mo, float pivot, int64_t C, float eps,
                              const P* __restrict gr, const P* __restrict er, T* __restrict yr,
                              float* mean_out, float* inv_std_out) {
  const double inv_c = 1.0 / static_cast<double>(C);
  const double dmean = mo.sum * inv_c;  // mean - pivot
  const double var = std::max(mo.sq * inv_c - dmean * dmean, 0.0);
  const double mean_d = static_cast<double>(pivot) + dmean;
  // The mean as an unevaluated float sum hi + lo: s - hi is exact for s near the mean, so large
  // row means do not leak their fp32 rounding into every normalised element.
  const float mean = static_cast<float>(mean_d);
  const float mean_lo = static_cast<float>(mean_d - static_cast<double>(mean));
  const float inv_std = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
  if (mean_out) *mean_out = mean;
  if (inv_std_out) *inv_std_out = inv_std;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float v = ((src(c) - mean) - mean_lo) * inv_std * to_f32(gr[c]);
    if (kBeta) v += to_f32(er[c]);
    yr[c] = from_f32<T>(v);
  }
}

template <typename T, typename P, bool kSkip, bool kBias, bool kBeta, bool kWriteS>
static void skip_layer_norm_rows(const SkipLayerNormArgs& a) {
  const T* x = static_cast<const T*>(a.x);         // (M, C), rows x_row_stride apart
  const T* skip = static_cast<const T*>(a.skip);   // (M, C), rows skip_row_stride apart (read only when kSkip)
  const P* gamma = static_cast<const P*>(a.gamma);  // [C]
  const P* beta = static_cast<const P*>(a.beta);    // [C] (read only when kBeta)
  const P* bias = static_cast<const P*>(a.bias);    // [C] (read only when kBias)
  T* y = static_cast<T*>(a.y);                      // (M, C) contiguous
  T* s_out = static_cast<T*>(a.s);                  // (M, C) contiguous (written only when kWriteS)
  const int64_t M = a.M, C = a.C;
  // fp32 s output: it holds exactly the fp32 sums, so pass 2 reads them back from there (L1/L2).
  constexpr bool kSIsBuf = kWriteS && std::is_same_v<T, float>;

  parallel_for(M, M * C >= 16384, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* __restrict xr = x + m * a.x_row_stride;
      const T* __restrict kr = kSkip ? skip + m * a.skip_row_stride : nullptr;
      const P* __restrict br = bias;
      T* __restrict sr = kWriteS ? s_out + m * C : nullptr;
      // Captured by value: the pointers are loop-invariant locals, so every loop below vectorises.
      auto sum_at = [=](int64_t c) {
        float v = to_f32(xr[c]);
        if (kSkip) v += to_f32(kr[c]);
        if (kBias) v += to_f32(br[c]);
        return v;
      };
      const int64_t npiv = C < 16 ? C : 16;
      float pivot = 0.0f;
      for (int64_t c = 0; c < npiv; ++c) pivot += sum_at(c);
      pivot /= static_cast<float>(npiv);
      float* mo = a.mean ? a.mean + m : nullptr;
      float* io = a.inv_std ? a.inv_std + m : nullptr;
      T* yr = y + m * C;
      if constexpr (kSIsBuf) {
        float* sf = reinterpret_cast<float*>(sr);
        const RowMoments st = row_moments(sum_at, [sf](int64_t c, float v) { sf[c] = v; }, pivot, C);
        const float* sp = sf;
        finish_row<T, P, kBeta>([sp](int64_t c) { return sp[c]; }, st, pivot, C, a.eps, gamma, beta, yr, mo, io);
      } else if (C <= kRowBuf) {
        alignas(64) float buf[kRowBuf];  // fp32 s of this row
        float* bw = buf;
        const RowMoments st = row_moments(
            sum_at,
            [bw, sr](int64_t c, float v) {
              bw[c] = v;
              if (kWriteS) sr[c] = from_f32<T>(v);
            },
            pivot, C);
        const float* bp = buf;
        finish_row<T, P, kBeta>([bp](int64_t c) { return bp[c]; }, st, pivot, C, a.eps, gamma, beta, yr, mo, io);
      } else {
        // Long rows: recompute s from x (and skip; still cache-resident) in pass 2.
        const RowMoments st = row_moments(
            sum_at,
            [sr](int64_t c, float v) {
              if (kWriteS) sr[c] = from_f32<T>(v);
            },
            pivot, C);
        finish_row<T, P, kBeta>(sum_at, st, pivot, C, a.eps, gamma, beta, yr, mo, io);
      }
    }
  });
}

// Expand the runtime flags (skip, bias, beta, s present) into template instances.
template <typename T, typename P, bool kSkip>
static void skip_layer_norm_flags(const SkipLayerNormArgs& a) {
  const int key = (a.bias ? 4 : 0) | (a.beta ? 2 : 0) | (a.s ? 1 : 0);
  switch (key) {
    case 0: return skip_layer_norm_rows<T, P, kSkip, false, false, false>(a);
    case 1: return skip_layer_norm_rows<T, P, kSkip, false, false, true>(a);
    case 2: return skip_layer_norm_rows<T, P, kSkip, false, true, false>(a);
    case 3: return skip_layer_norm_rows<T, P, kSkip, false, true, true>(a);
    case 4: return skip_layer_norm_rows<T, P, kSkip, true, false, false>(a);
    case 5: return skip_layer_norm_rows<T, P, kSkip, true, false, true>(a);
    case 6: return skip_layer_norm_rows<T, P, kSkip, true, true, false>(a);
    default: return skip_layer_norm_rows<T, P, kSkip, true, true, true>(a);
  }
}

template <typename T, typename P>
static void skip_layer_norm_typed(const SkipLayerNormArgs& a) {
  if (a.skip)
    skip_layer_norm_flags<T, P, true>(a);
  else
    skip_layer_norm_flags<T, P, false>(a);
}

Status skip_layer_norm(const SkipLayerNormArgs& a) {
  if (a.M == 0) return Status::Ok();
  return with_dtype_and_param(
      a.dtype, a.param_dtype, "skip_layer_norm: gamma/beta/bias must be float32 or the dtype of x",
      [&](auto t, auto p) { skip_layer_norm_typed<decltype(t), decltype(p)>(a); });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
