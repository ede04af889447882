// SkipLayerNorm on CPU: s = x + skip (+ bias) in fp32; y = (s - mean) * inv_std * gamma (+ beta)
// over rows of C; optional outputs s (x's dtype), mean and inv_std (fp32, per row; ONNX Runtime's
// optional outputs). Rows are split across OpenMP threads. Each row is read from memory once:
// pass 1 forms s (writes it, keeps it in fp32 in a stack buffer for rows up to kRowBuf channels,
// otherwise recomputes it from the cache-resident x and skip later) and sums it, pass 2 sums the
// squared deviations from the mean (two-pass: no cancellation with large means),
// pass 3 writes y. gamma/beta/bias are read in their own storage type (fp32 or x's dtype).
#include <cmath>

#include "sdkern/skip_layer_norm.h"
#include "vec_convert.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

// Row statistics. The sum of s accumulates in double (s may carry a large common offset, whose
// fp32 partial sums would round away the mean's low digits); the squared deviations from the mean
// (small, centred values) in fp32 SIMD partial sums over chunks of kChunk channels, chunks added
// in double. Both keep the per-row scale error (shared by every element of a row) at the level of a
// few fp32 roundings.
constexpr int64_t kChunk = 256;

template <typename Src>
static inline double row_sum(Src src, int64_t C) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(src(c));
  return sum;
}

// Rows up to this many channels keep their fp32 sum in a stack buffer between the passes.
constexpr int64_t kRowBuf = 4096;

// Passes 2 and 3 of one row, given its fp32 sums src(c) and their total: variance about the mean,
// optional mean / inv_std outputs, then y.
template <typename T, typename P, bool kBeta, typename Src>
static inline void finish_row(Src src, double sum, int64_t C, float eps, const P* __restrict gr,
                              const P* __restrict er, T* __restrict yr, float* mean_out, float* inv_std_out) {
  const double inv_c = 1.0 / static_cast<double>(C);
  const double mean_d = sum * inv_c;
  // The mean as an unevaluated float sum hi + lo: s - hi is exact for s near the mean, so large
  // row means do not leak their fp32 rounding into every normalised element.
  const float mean = static_cast<float>(mean_d);
  const float mean_lo = static_cast<float>(mean_d - static_cast<double>(mean));
  double sq = 0.0;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < C ? c0 + kChunk : C;
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t c = c0; c < c1; ++c) {
      const float d = (src(c) - mean) - mean_lo;
      part += d * d;
    }
    sq += part;
  }
  const float inv_std = static_cast<float>(1.0 / std::sqrt(sq * inv_c + static_cast<double>(eps)));
  if (mean_out) *mean_out = mean;
  if (inv_std_out) *inv_std_out = inv_std;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float v = ((src(c) - mean) - mean_lo) * inv_std * vc::ld(gr[c]);
    if (kBeta) v += vc::ld(er[c]);
    yr[c] = vc::st<T>(v);
  }
}

template <typename T, typename P, bool kBias, bool kBeta, bool kWriteS>
static void skip_layer_norm_rows(const SkipLayerNormArgs& a) {
  const T* x = static_cast<const T*>(a.x);         // (M, C), rows x_row_stride apart
  const T* skip = static_cast<const T*>(a.skip);   // (M, C), rows skip_row_stride apart
  const P* gamma = static_cast<const P*>(a.gamma);  // [C]
  const P* beta = static_cast<const P*>(a.beta);    // [C] (read only when kBeta)
  const P* bias = static_cast<const P*>(a.bias);    // [C] (read only when kBias)
  T* y = static_cast<T*>(a.y);                      // (M, C) contiguous
  T* s_out = static_cast<T*>(a.s);                  // (M, C) contiguous (written only when kWriteS)
  const int64_t M = a.M, C = a.C;

#pragma omp parallel for schedule(static) if (M * C >= 16384)
  for (int64_t m = 0; m < M; ++m) {
    const T* __restrict xr = x + m * a.x_row_stride;
    const T* __restrict kr = skip + m * a.skip_row_stride;
    const P* __restrict br = bias;
    T* __restrict sr = kWriteS ? s_out + m * C : nullptr;
    // Captured by value: the pointers are loop-invariant locals, so every loop below vectorises.
    auto sum_at = [=](int64_t c) {
      float v = vc::ld(xr[c]) + vc::ld(kr[c]);
      if (kBias) v += vc::ld(br[c]);
      return v;
    };
    float* mo = a.mean ? a.mean + m : nullptr;
    float* io = a.inv_std ? a.inv_std + m : nullptr;
    if (C <= kRowBuf) {
      alignas(64) float buf[kRowBuf];  // fp32 s of this row
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) {
        const float v = sum_at(c);
        buf[c] = v;
        if (kWriteS) sr[c] = vc::st<T>(v);
        sum += static_cast<double>(v);
      }
      const float* bp = buf;
      finish_row<T, P, kBeta>([bp](int64_t c) { return bp[c]; }, sum, C, a.eps, gamma, beta, y + m * C, mo, io);
    } else {
      // Long rows: recompute s from x and skip (still cache-resident) in every pass.
      if (kWriteS) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sr[c] = vc::st<T>(sum_at(c));
      }
      finish_row<T, P, kBeta>(sum_at, row_sum(sum_at, C), C, a.eps, gamma, beta, y + m * C, mo, io);
    }
  }
}

// Expand the runtime flags (bias, beta, s present) into template instances.
template <typename T, typename P>
static void skip_layer_norm_typed(const SkipLayerNormArgs& a) {
  const int key = (a.bias ? 4 : 0) | (a.beta ? 2 : 0) | (a.s ? 1 : 0);
  switch (key) {
    case 0: return skip_layer_norm_rows<T, P, false, false, false>(a);
    case 1: return skip_layer_norm_rows<T, P, false, false, true>(a);
    case 2: return skip_layer_norm_rows<T, P, false, true, false>(a);
    case 3: return skip_layer_norm_rows<T, P, false, true, true>(a);
    case 4: return skip_layer_norm_rows<T, P, true, false, false>(a);
    case 5: return skip_layer_norm_rows<T, P, true, false, true>(a);
    case 6: return skip_layer_norm_rows<T, P, true, true, false>(a);
    default: return skip_layer_norm_rows<T, P, true, true, true>(a);
  }
}

Status skip_layer_norm(const SkipLayerNormArgs& a) {
  if (a.M == 0) return Status::Ok();
  return with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.param_dtype == DType::kFloat32) {
      skip_layer_norm_typed<T, float>(a);
    } else if (a.param_dtype == a.dtype) {
      skip_layer_norm_typed<T, T>(a);
    } else {
      return Status::Invalid("skip_layer_norm: gamma/beta/bias must be float32 or the dtype of x");
    }
    return Status::Ok();
  });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
