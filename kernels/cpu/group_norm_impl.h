// Shared CPU implementation of GroupNorm(+SiLU) and SkipGroupNorm (group_norm.cpp, skip_group_norm.cpp).
//
// Tensors are (N, C, P) strided views (sdkern/group_norm.h). Two traversals:
//  * NHWC (x_sc == 1): a "row" is the C contiguous channels of one pixel. Work items are
//    (n, chunk of pixels); per-channel shifted sums are accumulated across whole rows (vectorised
//    over C), reduced to per-group (count, mean, M2) at the end of the chunk, and the chunks of a
//    (n, group) are merged with the Chan/Welford combine. Splitting P keeps both cores busy even at
//    batch 2 with 32 groups.
//  * otherwise (NCHW, sp == 1, or any other strides): a "row" is one channel's P pixels; work
//    items are (n, c) rows, merged per group the same way.
// Then one pass writes y = (v - K) * a_c + b_c (+SiLU), with a_c = gamma_c * rstd and
// b_c = beta_c - (mean - K) * a_c.
//
// Numerics: all statistics are taken about a per-(n, group) pivot K (the group's first element), so
// inputs with a large common offset (1000 + randn) lose no accuracy: v - K is exact or nearly so,
// and the mean is only ever held as the small difference mean - K. Per-channel sums run over at most
// 64 pixels in fp32 (vectorised); the partials are turned into (count, mean - K, M2) and merged per
// group with the Chan combine in double, which also gives rstd, a and b before they are rounded to fp32.
//
// Skip variant: v = (x + skip) + bias in fp32 (the order of the reference); s is written in x's dtype;
// y normalises the fp32 v (never the rounded s). The second pass recomputes v from x (+ skip) unless
// s holds it exactly (fp32 with a full skip: then reading s is one stream instead of two).
//
// Everything lives in the ISA namespace: this header is compiled once per instruction-set level.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "convert.h"
#include "sdkern/group_norm.h"
#include "vec_math.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace gn {

// ---------------------------------------------------------------------------------------------
// Row conversion between storage types and fp32 (contiguous fast paths, strided fallbacks).

inline void load_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void load_row(const bf16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);  // [n] bf16 bits
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);              // [n] fp32 bits
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline void load_row(const f16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

inline void store_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void store_row(const float* src, bf16_t* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);  // [n] fp32 bits
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);              // [n] bf16 bits
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    const uint32_t quiet = (u >> 16) | 0x40u;                           // NaN stays a (quiet) NaN
    d[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
  }
}

inline void store_row(const float* src, f16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = from_f32<f16_t>(src[i]);
}

// fp32 values of n elements at src[i * stride]: src itself when it already is contiguous fp32,
// otherwise converted into buf ([n] floats).
template <typename T>
inline const float* row_f32(const T* src, int64_t stride, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return src;
  }
  if (stride == 1) {
    load_row(src, buf, n);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = to_f32(src[i * stride]);
  }
  return buf;
}

// Write n fp32 values to dst[i * stride] in the storage type.
template <typename T>
inline void put_row(const float* v, T* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    store_row(v, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = from_f32<T>(v[i]);
  }
}

// y[i] = (v[i] - k[i]) * a[i] + b[i] (+SiLU) over one row, in place into out ([n] floats).
inline void normalise_row(const float* v, const float* k, const float* a, const float* b, float* out, int64_t n,
                          bool silu) {
  if (silu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::silu(vm::fmadd(v[i] - k[i], a[i], b[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::fmadd(v[i] - k[i], a[i], b[i]);
  }
}

inline void normalise_row_scalar(const float* v, float k, float a, float b, float* out, int64_t n, bool silu) {
  if (silu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::silu(vm::fmadd(v[i] - k, a, b));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::fmadd(v[i] - k, a, b);
  }
}

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Scratch owned by the calling thread, reused across calls (grows, never shrinks): no allocation
// on the steady-state path. Shared with the OpenMP team through the pointer.
inline float* scratch(size_t floats) {
  static thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}
inline double* scratch_f64(size_t doubles) {
  static thread_local std::vector<double> buf;
  if (buf.size() < doubles) buf.resize(doubles);
  return buf.data();
}

// Chan/Welford merge of (count, mean, M2) partials in double (per (n, group): negligible cost, and it
// keeps the merge of many chunks from adding rounding error of its own).
struct Moments64 {
  double n, mean, m2;
};
inline Moments64 combine(Moments64 a, Moments64 b) {
  const double n = a.n + b.n;
  if (n == 0.0) return {0.0, 0.0, 0.0};
  const double delta = b.mean - a.mean, wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}
// Moments of a block from its sum and sum of squares about the pivot (mean is relative to the pivot).
inline Moments64 from_shifted_sums(double n, double sum, double sumsq) {
  const double m = sum / n;
  const double m2 = sumsq - sum * m;
  return {n, m, m2 > 0.0 ? m2 : 0.0};
}

// ---------------------------------------------------------------------------------------------

template <typename T>
Status run(const GroupNormArgs& a, bool with_skip) {
  const int64_t N = a.N, C = a.C, P = a.P, G = a.groups, cpg = C / G;
  if (N == 0 || P == 0) return Status::Ok();

  const T* x = static_cast<const T*>(a.x);                       // (N, C, P) strides x_sn/x_sc/x_sp
  const T* skip = with_skip ? static_cast<const T*>(a.skip) : nullptr;  // (N, C, P) or (N, C) (skip_sp = 0)
  T* y = static_cast<T*>(a.y);                                   // (N, C, P) strides of x
  T* s = with_skip ? static_cast<T*>(a.s) : nullptr;             // optional (N, C, P) strides of x
  const bool has_bias = with_skip && a.bias != nullptr;          // bias [C], dtype bias_dtype
  const bool bcast = skip != nullptr && a.skip_sp == 0;          // skip is one value per (n, c)
  const bool full_skip = skip != nullptr && !bcast;
  const int64_t xsn = a.x_sn, xsc = a.x_sc, xsp = a.x_sp;
  const int64_t ksn = a.skip_sn, ksc = a.skip_sc, ksp = a.skip_sp;

  // NHWC traversal when channels are contiguous (rows of C); channel rows otherwise (also for C == 1).
  const bool nhwc = xsc == 1 && (xsp != 1 || P == 1);

  int nt = max_threads();
  if (N * C * P < 32768) nt = 1;  // tiny problems: the fork costs more than the work

  // Work decomposition.
  int64_t rows_per_chunk = 1, nchunks = 1;  // NHWC: pixels per work item, chunks per image
  if (nhwc) {
    const int64_t want = std::max<int64_t>((P + 63) / 64, (4 * nt + N - 1) / N);
    nchunks = std::min<int64_t>(P, want);
    rows_per_chunk = (P + nchunks - 1) / nchunks;
    nchunks = (P + rows_per_chunk - 1) / rows_per_chunk;
  }
  const int64_t units = nhwc ? nchunks : cpg;  // partial moments per (n, group)

  // Scratch layout (floats).
  const int64_t row_len = nhwc ? pad16(C) : pad16(P);
  const int64_t per_thread = nhwc ? 4 * row_len : 2 * row_len;
  float* base = scratch(static_cast<size_t>(pad16(N * C) * 4 + pad16(C) + per_thread * nt));
  float* pivot = base;                     // [N, C]: K of the channel's group
  float* bsk = pivot + pad16(N * C);       // [N, C]: broadcast skip values (bcast only)
  float* scale = bsk + pad16(N * C);       // [N, C]: a = gamma * rstd
  float* shift = scale + pad16(N * C);     // [N, C]: b = beta - (mean - K) * a
  float* biasf = shift + pad16(N * C);     // [C]: bias in fp32 (has_bias only)
  float* tbuf = biasf + pad16(C);          // per thread: row buffers and accumulators
  Moments64* part = reinterpret_cast<Moments64*>(scratch_f64(static_cast<size_t>(N * G * units * 3)));
  // part [N, G, units]: (count, mean - K, M2) of each chunk (NHWC) or channel (NCHW)

  // Per-channel parameters, pivots, broadcast skip (O(N*C): serial).
  if (has_bias)
    for (int64_t c = 0; c < C; ++c) biasf[c] = load_param(a.bias, a.bias_dtype, c);
  if (bcast)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) bsk[n * C + c] = to_f32(skip[n * ksn + c * ksc]);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * cpg;
      float k = to_f32(x[n * xsn + c0 * xsc]);
      if (full_skip) k = k + to_f32(skip[n * ksn + c0 * ksc]);
      if (bcast) k = k + bsk[n * C + c0];
      if (has_bias) k = k + biasf[c0];
      for (int64_t c = c0; c < c0 + cpg; ++c) pivot[n * C + c] = k;
    }
  }

  // s holds v exactly (fp32 storage) and reading it is cheaper than re-reading x and a full skip.
  const bool reread_s = std::is_same_v<T, float> && s != nullptr && full_skip;
  const bool silu = a.silu;
  const float eps = a.eps;

#pragma omp parallel num_threads(nt)
  {
    float* b0 = tbuf + per_thread * thread_id();
    float* b1 = b0 + row_len;

    if (nhwc) {
      float* acc_s = b1 + row_len;  // [C] shifted sums
      float* acc_q = acc_s + row_len;  // [C] shifted sums of squares
      // v for pixel p of image n: (x + skip) + bias in fp32 ([C] floats, b0/b1 as buffers).
      auto values = [&](int64_t n, int64_t p) -> const float* {
        const float* v = row_f32(x + n * xsn + p * xsp, 1, b0, C);
        if (!skip && !has_bias) return v;
        if (full_skip) {
          const float* k = row_f32(skip + n * ksn + p * ksp, ksc, b1, C);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) b0[c] = v[c] + k[c];
        } else if (bcast) {
          const float* k = bsk + n * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) b0[c] = v[c] + k[c];
        } else if (v != b0) {
          std::memcpy(b0, v, C * sizeof(float));
        }
        if (has_bias) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) b0[c] += biasf[c];
        }
        return b0;
      };

      // Phase 1: statistics (and s).
#pragma omp for schedule(static)
      for (int64_t task = 0; task < N * nchunks; ++task) {
        const int64_t n = task / nchunks, ch = task % nchunks;
        const int64_t p0 = ch * rows_per_chunk, p1 = std::min(P, p0 + rows_per_chunk);
        const float* kp = pivot + n * C;
        for (int64_t c = 0; c < C; ++c) acc_s[c] = 0.0f, acc_q[c] = 0.0f;
        for (int64_t p = p0; p < p1; ++p) {
          const float* v = values(n, p);
          if (s) put_row(v, s + n * xsn + p * xsp, 1, C);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float d = v[c] - kp[c];
            acc_s[c] += d;
            acc_q[c] += d * d;
          }
        }
        const double cnt = static_cast<double>((p1 - p0) * cpg);
        for (int64_t g = 0; g < G; ++g) {
          double ss = 0.0, qq = 0.0;
          for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) ss += acc_s[c], qq += acc_q[c];
          part[(n * G + g) * units + ch] = from_shifted_sums(cnt, ss, qq);
        }
      }
    } else {
      // Phase 1, channel rows: v for (n, c) over all P pixels.
#pragma omp for schedule(static)
      for (int64_t nc = 0; nc < N * C; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const float* v = row_f32(x + n * xsn + c * xsc, xsp, b0, P);
        if (skip || has_bias) {
          if (full_skip) {
            const float* k = row_f32(skip + n * ksn + c * ksc, ksp, b1, P);
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) b0[p] = v[p] + k[p];
          } else {
            const float k = bcast ? bsk[nc] : 0.0f;
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) b0[p] = v[p] + k;
          }
          if (has_bias) {
            const float bb = biasf[c];
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) b0[p] += bb;
          }
          v = b0;
        }
        if (s) put_row(v, s + n * xsn + c * xsc, xsp, P);
        const float k = pivot[nc];
        float ss = 0.0f, qq = 0.0f;
#pragma omp simd reduction(+ : ss, qq)
        for (int64_t p = 0; p < P; ++p) {
          const float d = v[p] - k;
          ss += d;
          qq += d * d;
        }
        const int64_t g = c / cpg;
        part[(n * G + g) * units + (c - g * cpg)] = from_shifted_sums(static_cast<double>(P), ss, qq);
      }
    }

    // Phase 2: merge the partials of each (n, group); per-channel scale and shift.
#pragma omp for schedule(static)
    for (int64_t ng = 0; ng < N * G; ++ng) {
      const Moments64* pr = part + ng * units;
      Moments64 acc{0.0, 0.0, 0.0};
      for (int64_t u = 0; u < units; ++u) acc = combine(acc, pr[u]);
      const double rstd = 1.0 / std::sqrt(acc.m2 / acc.n + static_cast<double>(eps));
      const int64_t n = ng / G, c0 = (ng % G) * cpg;
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        const double ac = static_cast<double>(load_param(a.gamma, a.param_dtype, c)) * rstd;
        scale[n * C + c] = static_cast<float>(ac);
        shift[n * C + c] = static_cast<float>(static_cast<double>(load_param(a.beta, a.param_dtype, c)) - acc.mean * ac);
      }
    }

    // Phase 3: normalise (+SiLU) and write y.
    if (nhwc) {
      float* b2 = b1 + row_len;  // output row
#pragma omp for schedule(static)
      for (int64_t task = 0; task < N * nchunks; ++task) {
        const int64_t n = task / nchunks, ch = task % nchunks;
        const int64_t p0 = ch * rows_per_chunk, p1 = std::min(P, p0 + rows_per_chunk);
        const float *kp = pivot + n * C, *ap = scale + n * C, *bp = shift + n * C;
        for (int64_t p = p0; p < p1; ++p) {
          const float* v;
          if (reread_s) {
            v = reinterpret_cast<const float*>(s) + n * xsn + p * xsp;
          } else {
            v = row_f32(x + n * xsn + p * xsp, 1, b0, C);
            if (full_skip) {
              const float* k = row_f32(skip + n * ksn + p * ksp, ksc, b1, C);
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) b0[c] = v[c] + k[c];
              v = b0;
            } else if (bcast) {
              const float* k = bsk + n * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) b0[c] = v[c] + k[c];
              v = b0;
            }
            if (has_bias) {
              if (v != b0) std::memcpy(b0, v, C * sizeof(float));
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) b0[c] += biasf[c];
              v = b0;
            }
          }
          if constexpr (std::is_same_v<T, float>) {
            normalise_row(v, kp, ap, bp, y + n * xsn + p * xsp, C, silu);
          } else {
            normalise_row(v, kp, ap, bp, b2, C, silu);
            store_row(b2, y + n * xsn + p * xsp, C);
          }
        }
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t nc = 0; nc < N * C; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const float* v;
        if (reread_s && xsp == 1) {
          v = reinterpret_cast<const float*>(s) + n * xsn + c * xsc;
        } else {
          v = row_f32(x + n * xsn + c * xsc, xsp, b0, P);
          if (skip || has_bias) {
            if (full_skip) {
              const float* k = row_f32(skip + n * ksn + c * ksc, ksp, b1, P);
#pragma omp simd
              for (int64_t p = 0; p < P; ++p) b0[p] = v[p] + k[p];
            } else {
              const float k = bcast ? bsk[nc] : 0.0f;
#pragma omp simd
              for (int64_t p = 0; p < P; ++p) b0[p] = v[p] + k;
            }
            if (has_bias) {
              const float bb = biasf[c];
#pragma omp simd
              for (int64_t p = 0; p < P; ++p) b0[p] += bb;
            }
            v = b0;
          }
        }
        T* yr = y + n * xsn + c * xsc;
        if (std::is_same_v<T, float> && xsp == 1) {
          normalise_row_scalar(v, pivot[nc], scale[nc], shift[nc], reinterpret_cast<float*>(yr), P, silu);
        } else {
          normalise_row_scalar(v, pivot[nc], scale[nc], shift[nc], b1, P, silu);
          put_row(b1, yr, xsp, P);
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace gn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
