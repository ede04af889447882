// SkipLayerNorm on CPU: s = x + skip (+ bias) in fp32; y = (s - mean) * inv_std * gamma (+ beta)
// over rows of C; optional outputs s (x's dtype), mean and inv_std (fp32, per row; ONNX Runtime's
// optional outputs). Rows are split across OpenMP threads. Each row (x, skip: <= a few KiB) is
// read from memory once and then stays in L1/L2: pass 1 sums s (and writes it), pass 2 sums the
// squared deviations from the mean (two-pass: no cancellation with large means; sums in double), pass 3
// writes y. s is recomputed from x and skip in every pass (identical fp32 values), so no scratch
// buffer is needed. gamma/beta/bias are read in their own storage type (fp32 or x's dtype).
#include <cmath>

#include "sdkern/skip_layer_norm.h"
#include "vec_convert.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

template <typename T, typename P, bool kBias, bool kBeta, bool kWriteS>
static void skip_layer_norm_rows(const SkipLayerNormArgs& a) {
  const T* x = static_cast<const T*>(a.x);         // (M, C), rows x_row_stride apart
  const T* skip = static_cast<const T*>(a.skip);   // (M, C), rows skip_row_stride apart
  const P* gamma = static_cast<const P*>(a.gamma);  // [C]
  const P* beta = static_cast<const P*>(a.beta);    // [C] (read only when kBeta)
  const P* bias = static_cast<const P*>(a.bias);    // [C] (read only when kBias)
  T* y = static_cast<T*>(a.y);                      // (M, C) contiguous
  T* s_out = static_cast<T*>(a.s);                  // (M, C) contiguous (written only when kWriteS)
  float* mean_out = a.mean;                         // [M] or null
  float* inv_std_out = a.inv_std;                   // [M] or null
  const int64_t M = a.M, C = a.C;
  const double inv_c = 1.0 / static_cast<double>(C);
  const float eps = a.eps;

#pragma omp parallel for schedule(static) if (M * C >= 16384)
  for (int64_t m = 0; m < M; ++m) {
    const T* __restrict xr = x + m * a.x_row_stride;
    const T* __restrict kr = skip + m * a.skip_row_stride;
    auto sum_at = [&](int64_t c) {
      float v = vc::ld(xr[c]) + vc::ld(kr[c]);
      if (kBias) v += vc::ld(bias[c]);
      return v;
    };
    // Row statistics accumulate in double: cheap here (the row is in L1) and it keeps the per-row
    // scale error (which every element of the row shares) at the level of one fp32 rounding.
    double sum = 0.0;
    if (kWriteS) {
      T* __restrict sr = s_out + m * C;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) {
        const float v = sum_at(c);
        sr[c] = vc::st<T>(v);
        sum += v;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += sum_at(c);
    }
    const double mean_d = sum * inv_c;
    // The mean as an unevaluated float sum hi + lo: s - hi is exact for s near the mean, so large
    // row means do not leak their fp32 rounding into every normalised element.
    const float mean = static_cast<float>(mean_d);
    const float mean_lo = static_cast<float>(mean_d - static_cast<double>(mean));
    double sq = 0.0;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(sum_at(c)) - mean_d;
      sq += d * d;
    }
    const float inv_std = static_cast<float>(1.0 / std::sqrt(sq * inv_c + static_cast<double>(eps)));
    if (mean_out) mean_out[m] = mean;
    if (inv_std_out) inv_std_out[m] = inv_std;
    T* __restrict yr = y + m * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float v = ((sum_at(c) - mean) - mean_lo) * inv_std * vc::ld(gamma[c]);
      if (kBeta) v += vc::ld(beta[c]);
      yr[c] = vc::st<T>(v);
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
