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
// Then one pass writes y = (v - K2) * a_c + b_c (+SiLU), with K2 = the group mean rounded to fp32,
// a_c = gamma_c * rstd and b_c = beta_c - (mean - K2) * a_c.
//
// With AVX-512 the NHWC passes (channels contiguous in x, skip, s, y) run dedicated kernels that
// stream pixel rows in address order, with compile-time input combinations, hardware fp16
// conversion, and a vectorised SiLU (silu16: rel. error ~1e-7; for bf16 outputs the cheaper
// silu16_bf16, rel. error < 1.2e-4, far below bf16 rounding). Other ISA levels and layouts use
// compiler-vectorised row loops staged through fp32 row buffers.
//
// Numerics: all statistics are taken about a per-(n, group) pivot K (a 16-sample mean estimate), so
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

#if defined(__AVX512F__)
// SiLU of 16 lanes: y / (1 + exp(-y)), with y clamped to [-80, 87] inside exp (for y < -80 the result
// is y * sigmoid(-80): |error| < 1e-32, far below any tolerance; NaN propagates through the final
// division). exp(-y) = 2^n exp(r): n = round(-y / ln2) and rn = -r = y + n ln2 from one FMA with ln2 in
// fp32 (its representation error, 2e-9 per unit of n, stays below 3e-8 wherever exp(-y) still moves
// the result, |y| < 15), exp(-rn) by Horner in rn (degree 6), 2^n by vscalefps, then a correctly
// rounded division (an rcp14 + Newton quotient was slower here). 8 FMA-pipe and 5 add-pipe
// instructions plus the division; relative L2 error 4.3e-8 over y in [-30, 10], max 2.1e-7 (the
// earlier two-constant form with 1 + r + r^2 P(r): the same L2 error, 25% more instructions: 2.4 vs
// 1.95 ns per 16 values on the Zen 4 dev VM).
inline __m512 silu16(__m512 y) {
  const __m512 yc = _mm512_max_ps(_mm512_min_ps(y, _mm512_set1_ps(87.0f)), _mm512_set1_ps(-80.0f));
  const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(yc, _mm512_set1_ps(-1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 rn = _mm512_fmadd_ps(nf, _mm512_set1_ps(0.693147180559945309f), yc);  // -r, |r| <= ln2/2
  // exp(r) = exp(-rn): the vec_math.h coefficients with the odd ones negated.
  __m512 p = _mm512_set1_ps(1.390126883e-03f);
  p = _mm512_fmadd_ps(p, rn, _mm512_set1_ps(-8.363140747e-03f));
  p = _mm512_fmadd_ps(p, rn, _mm512_set1_ps(4.166685417e-02f));
  p = _mm512_fmadd_ps(p, rn, _mm512_set1_ps(-1.666657776e-01f));
  p = _mm512_fmadd_ps(p, rn, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, rn, _mm512_set1_ps(-1.0f));
  p = _mm512_fmadd_ps(p, rn, _mm512_set1_ps(1.0f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, nf), _mm512_set1_ps(1.0f));
  return _mm512_div_ps(y, d);
}

// SiLU for results that are rounded to bfloat16 (relative precision 2^-9): degree-4 Taylor exp(r) on
// |r| <= ln2/2 (rel. error < 5e-5), single-constant reduction, and rcp14 without refinement
// (rel. error < 2^-14 = 6e-5). Total relative error < 1.2e-4, 30x below half a bf16 ulp (2e-3), at
// about half the instructions of silu16.
inline __m512 silu16_bf16(__m512 y) {
  __m512 t = _mm512_sub_ps(_mm512_setzero_ps(), y);
  t = _mm512_min_ps(t, _mm512_set1_ps(80.0f));  // scalef underflows gracefully; only overflow needs a clamp
  const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693147180559945309f), t);
  __m512 p = _mm512_set1_ps(1.0f / 24.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, nf), _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(y, _mm512_rcp14_ps(d));
}

template <typename T>
inline __m512 silu16_for(__m512 y) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return silu16_bf16(y);
  } else {
    return silu16(y);
  }
}

// out[i] = (v[i] - k[i]) * a[i] + b[i] (+SiLU) over one row (k, a, b per element or broadcast).
template <bool kSilu, bool kPerElem>
inline void normalise_row16(const float* v, const float* k, const float* a, const float* b, float* out, int64_t n) {
  auto op = [&](__mmask16 m, int64_t i) {
    const __m512 vv = _mm512_maskz_loadu_ps(m, v + i);
    const __m512 kk = kPerElem ? _mm512_maskz_loadu_ps(m, k + i) : _mm512_set1_ps(*k);
    const __m512 aa = kPerElem ? _mm512_maskz_loadu_ps(m, a + i) : _mm512_set1_ps(*a);
    const __m512 bb = kPerElem ? _mm512_maskz_loadu_ps(m, b + i) : _mm512_set1_ps(*b);
    __m512 y = _mm512_fmadd_ps(_mm512_sub_ps(vv, kk), aa, bb);
    if (kSilu) y = silu16(y);
    _mm512_mask_storeu_ps(out + i, m, y);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) op(static_cast<__mmask16>(0xffff), i);
  if (i < n) op(static_cast<__mmask16>((1u << (n - i)) - 1u), i);
}
#endif

// y[i] = (v[i] - k[i]) * a[i] + b[i] (+SiLU) over one row, into out ([n] floats).
inline void normalise_row(const float* v, const float* k, const float* a, const float* b, float* out, int64_t n,
                          bool silu) {
#if defined(__AVX512F__)
  if (silu) {
    normalise_row16<true, true>(v, k, a, b, out, n);
  } else {
    normalise_row16<false, true>(v, k, a, b, out, n);
  }
#else
  if (silu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::silu(vm::fmadd(v[i] - k[i], a[i], b[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::fmadd(v[i] - k[i], a[i], b[i]);
  }
#endif
}

inline void normalise_row_scalar(const float* v, float k, float a, float b, float* out, int64_t n, bool silu) {
#if defined(__AVX512F__)
  if (silu) {
    normalise_row16<true, false>(v, &k, &a, &b, out, n);
  } else {
    normalise_row16<false, false>(v, &k, &a, &b, out, n);
  }
#else
  if (silu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::silu(vm::fmadd(v[i] - k, a, b));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::fmadd(v[i] - k, a, b);
  }
#endif
}

// Which inputs a blocked NHWC kernel combines, as compile-time bits: a runtime test of a
// loop-invariant pointer in the innermost loop costs a third of the GroupNorm time (measured: phase 1
// of C=640 32x32 fp32 at 177 us with the tests, 97 us without), so each combination that occurs is
// its own instantiation (with_mode() below lists them).
enum NhwcMode : int {
  kFullSkip = 1,   // + skip (N, C, P) (channels contiguous)
  kBcastSkip = 2,  // + skip (N, C) broadcast over the pixels (fp32 copy in bsk)
  kBias = 4,       // + bias [C] (fp32 copy)
  kWriteS = 8,     // statistics pass also writes s = (x + skip) + bias
  kFromS = 16,     // normalise pass reads v from s (fp32 with a full skip: one stream instead of two)
};

#if defined(__AVX512F__)
// ---- NHWC row kernels (AVX-512): one pixel row of C channels after another. ----

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16_t* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const f16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(bf16_t* p, __m512 v, __mmask16 m) {
  // Round to nearest even on the bits (as math::f32_to_bf16); NaN stays a quiet NaN.
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
inline void store16(f16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __mmask16 lane_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << remaining) - 1u);
}

// Inputs of one (n, pixel-chunk) work item in the NHWC layout.
template <typename T, int kMode>
struct NhwcRows {
  const T* x;      // x + n*x_sn: row p at x + p*x_sp, channels contiguous
  const T* skip;   // full skip (channels contiguous), row p at skip + p*skip_sp (kFullSkip)
  int64_t xsp, ksp;
  const float* bsk;   // [C] broadcast skip of this n (kBcastSkip)
  const float* bias;  // [C] (kBias)
  T* s;               // output rows, strides of x (kWriteS); input rows (kFromS)

  // v = (x + skip) + bias for the 16 channels at c (lanes in m), or v read back from s.
  inline __m512 value(int64_t p, int64_t c, __mmask16 m) const {
    if constexpr ((kMode & kFromS) != 0) return load16(s + p * xsp + c, m);
    __m512 v = load16(x + p * xsp + c, m);
    if constexpr ((kMode & kFullSkip) != 0) v = _mm512_add_ps(v, load16(skip + p * ksp + c, m));
    if constexpr ((kMode & kBcastSkip) != 0) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bsk + c));
    if constexpr ((kMode & kBias) != 0) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + c));
    return v;
  }
};

// f(p, c, lane mask) for every 16-channel piece of the pixel rows [p0, p1), in address order.
template <typename F>
inline void for_each_row_piece(int64_t C, int64_t p0, int64_t p1, F&& f) {
  const int64_t cfull = C / 16 * 16;
  const __mmask16 tail = lane_mask(C - cfull);
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t c = 0; c < cfull; c += 16) f(p, c, static_cast<__mmask16>(0xffff));
    if (cfull < C) f(p, cfull, tail);
  }
}

// Per-channel shifted sums over pixels [p0, p1): acc_s[c] = sum(v - K_c), acc_q[c] = sum((v - K_c)^2),
// one pixel row after another (the accumulators, 2 x C floats, stay in L1). Also writes s (kWriteS).
// Each lane sums at most one chunk of pixels (run() caps chunks at 64 pixels when P allows), in fp32.
// (Register-blocked tiles of 8 pixels x 64 channels kept the accumulators in registers but wrote s and
// read x in 8 interleaved row streams: SkipGroupNorm+SiLU fp32 in a torch process, 2 threads, C320
// 64x64 1.57-1.89 -> 1.19-1.29 ms row by row, C640 32x32 0.56-0.74 -> 0.34-0.47 ms.)
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

// y = (v - K_c) * a_c + b_c (+SiLU) over pixels [p0, p1); v recomputed from the inputs or read from s
// (kFromS). One pixel row after another (all C channels of pixel p, then p + 1), so every stream is
// read and written in address order and the per-channel constants come from L1. (A register-blocked
// form, 8 pixels x 64 channels with the constants in registers, was slower in every measured case in
// a torch process: GN+SiLU fp32 N2 C320 64x64, 2 threads, 0.86-0.91 ms blocked vs 0.42-0.53 ms row by
// row; C640 32x32 0.25-0.40 vs 0.19-0.25 ms.)
template <typename T, bool kSilu, int kMode>
inline void nhwc_norm_rows(const NhwcRows<T, kMode>& r, T* y, int64_t C, int64_t p0, int64_t p1,
                           const float* kp, const float* ap, const float* bp) {
  for_each_row_piece(C, p0, p1, [&](int64_t p, int64_t c, __mmask16 m) {
    const __m512 v = r.value(p, c, m);
    __m512 o = _mm512_fmadd_ps(_mm512_sub_ps(v, _mm512_maskz_loadu_ps(m, kp + c)), _mm512_maskz_loadu_ps(m, ap + c),
                               _mm512_maskz_loadu_ps(m, bp + c));
    if (kSilu) o = silu16_for<T>(o);
    store16(y + p * r.xsp + c, o, m);
  });
}

// Shifted sums of a stream of rows about one pivot (the flat NCHW path): 16 fp32 lanes that each add at
// most 64 values before they are moved into double totals. The accumulators are locals of an inlined
// object, so they stay in registers across rows (an array the compiler must keep in memory made each
// vector wait for the previous store: ~10 cycles per 16 values).
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
#endif

#if !defined(__AVX512F__)
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

#if defined(__AVX512F__)
// The mode combinations that are instantiated (those the two ops produce). run() takes the
// blocked kernels only when has_mode() holds for both passes, so with_mode() never sees another one.
#define SDKERN_GN_MODES(X)                                                                                   \
  X(0)                                                                                                      \
  X(kFullSkip) X(kFullSkip | kBias) X(kFullSkip | kWriteS) X(kFullSkip | kBias | kWriteS) X(kBcastSkip)     \
  X(kBcastSkip | kBias) X(kBcastSkip | kWriteS) X(kBcastSkip | kBias | kWriteS) X(kFullSkip | kFromS)      \
  X(kFullSkip | kBias | kFromS)

inline bool has_mode(int mode) {
  switch (mode) {
#define SDKERN_GN_CASE(M) case (M):
    SDKERN_GN_MODES(SDKERN_GN_CASE)
#undef SDKERN_GN_CASE
    return true;
    default:
      return false;
  }
}

// Call f(std::integral_constant<int, mode>{}) for the runtime mode bits.
template <typename F>
inline void with_mode(int mode, F&& f) {
  switch (mode) {
#define SDKERN_GN_CASE(M) \
  case (M):               \
    return f(std::integral_constant<int, (M)>{});
    SDKERN_GN_MODES(SDKERN_GN_CASE)
#undef SDKERN_GN_CASE
    default:
      return;  // excluded by has_mode() in run()
  }
}
#endif

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

// This thread's contiguous share [begin, end) of `total` work items (an even static split).
inline void thread_range(int64_t total, int64_t& begin, int64_t& end) {
#if defined(_OPENMP)
  const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
  const int64_t nt = 1, t = 0;
#endif
  const int64_t q = total / nt, r = total % nt;
  begin = t * q + std::min(t, r);
  end = begin + q + (t < r ? 1 : 0);
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

  const int max_nt = max_threads();
  int nt = max_nt;
  if (N * C * P < 32768) nt = 1;  // tiny problems: the fork costs more than the work

  // Work decomposition. The chunks of one image depend on P and the thread budget only, never on N or
  // on nt (which does): an image's statistics are then summed in the same order whatever batch it is
  // in, so batched results equal solo results bit for bit (sdkern serve batches requests on that).
  int64_t rows_per_chunk = 1, nchunks = 1;  // NHWC: pixels per work item, chunks per image
  if (nhwc) {
    const int64_t want = std::max<int64_t>((P + 63) / 64, 4 * static_cast<int64_t>(max_nt));
    nchunks = std::min<int64_t>(P, want);
    rows_per_chunk = (P + nchunks - 1) / nchunks;
    nchunks = (P + rows_per_chunk - 1) / rows_per_chunk;
  }
  const int64_t units = nhwc ? nchunks : cpg;  // partial moments per (n, group)

  // Scratch layout (floats).
  const int64_t row_len = nhwc ? pad16(C) : pad16(P);
  const int64_t per_thread = nhwc ? 4 * row_len : 2 * row_len;
  float* base = scratch(static_cast<size_t>(pad16(N * C) * 4 + pad16(C) + per_thread * nt));
  float* pivot = base;                     // [N, C]: K of the channel's group (phase 2 on: K2, its mean in fp32)
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
  // Pivot K of each (n, group): the mean of up to 16 samples spread over the group's channels and
  // pixels. The closer K is to the group mean, the less the fp32 shifted sums of squares cancel
  // (a single element as pivot can be a 3-sigma outlier: ~10x more rounding error in M2).
  auto value_at = [&](int64_t n, int64_t c, int64_t p) {
    float v = to_f32(x[n * xsn + c * xsc + p * xsp]);
    if (full_skip) v = v + to_f32(skip[n * ksn + c * ksc + p * ksp]);
    if (bcast) v = v + bsk[n * C + c];
    if (has_bias) v = v + biasf[c];
    return v;
  };
  const int64_t samples = std::min<int64_t>(16, cpg * P);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * cpg;
      double sum = 0.0;
      for (int64_t j = 0; j < samples; ++j) sum += value_at(n, c0 + j % cpg, (j * P) / samples);
      const float k = static_cast<float>(sum / static_cast<double>(samples));
      for (int64_t c = c0; c < c0 + cpg; ++c) pivot[n * C + c] = k;
    }
  }

  // s holds v exactly (fp32 storage) and reading it is cheaper than re-reading x and a full skip.
  const bool reread_s = std::is_same_v<T, float> && s != nullptr && full_skip;
  const bool silu = a.silu;
  // NHWC rows with contiguous channels everywhere: the AVX-512 row kernels ("blocked" for their
  // compile-time input combinations, NhwcMode).
  const int in_mode = (full_skip ? kFullSkip : 0) | (bcast ? kBcastSkip : 0) | (has_bias ? kBias : 0);
  const int stats_mode = in_mode | (s != nullptr ? kWriteS : 0);
  const int norm_mode = reread_s ? (in_mode | kFromS) : in_mode;
#if defined(__AVX512F__)
  const bool blocked = nhwc && (!full_skip || ksc == 1) && has_mode(stats_mode) && has_mode(norm_mode);
#else
  (void)stats_mode, (void)norm_mode;
#endif
  const float eps = a.eps;

  // Moments of group g of image n -> per-channel a = gamma * rstd, b and the pivot of the normalise pass.
  // Re-centred on the mean rounded to fp32 (K2): v - K2 is then as exact as v - K was (Sterbenz for
  // large offsets) and the output needs no cancellation between (v - K) * a and b when the pivot K
  // happened to be an outlier of its group. The remainder mean - K2 is tiny and exact enough in double.
  // Writes only the group's channels (pivot included: the caller is done reading them).
  auto finalize = [&](int64_t n, int64_t g, const Moments64& acc) {
    const double rstd = 1.0 / std::sqrt(acc.m2 / acc.n + static_cast<double>(eps));
    const int64_t c0 = g * cpg;
    const double mean = static_cast<double>(pivot[n * C + c0]) + acc.mean;
    const float k2 = static_cast<float>(mean);
    const double rest = mean - static_cast<double>(k2);
    for (int64_t c = c0; c < c0 + cpg; ++c) {
      const double ac = static_cast<double>(load_param(a.gamma, a.param_dtype, c)) * rstd;
      scale[n * C + c] = static_cast<float>(ac);
      shift[n * C + c] = static_cast<float>(static_cast<double>(load_param(a.beta, a.param_dtype, c)) - rest * ac);
      pivot[n * C + c] = k2;
    }
  };

  // y of one channel row (n, c) from its values v ([P] floats); obuf: [P] floats for non-fp32 or strided y.
  auto normalise_channel = [&](int64_t n, int64_t c, const float* v, float* obuf) {
    const int64_t nc = n * C + c;
    T* yr = y + n * xsn + c * xsc;
    if (std::is_same_v<T, float> && xsp == 1) {
      normalise_row_scalar(v, pivot[nc], scale[nc], shift[nc], reinterpret_cast<float*>(yr), P, silu);
    } else {
      normalise_row_scalar(v, pivot[nc], scale[nc], shift[nc], obuf, P, silu);
      put_row(obuf, yr, xsp, P);
    }
  };

  // NCHW with contiguous channel rows and groups that give every thread work: one pass per (n, group),
  // statistics and then the normalised rows while the group (cpg * P values) is still in cache. No
  // per-row moments to merge: all rows of a group share the pivot, so their shifted sums just add.
  const bool flat = !nhwc && xsp == 1 && xsc == P && (!full_skip || (ksp == 1 && ksc == P)) && N * G >= 2 * nt;

  // v of one channel row (n, c): P values, into b0 (b1: second input buffer; both [P] floats); the
  // input itself for contiguous fp32 with nothing added.
  auto channel_values_into = [&](int64_t n, int64_t c, float* b0, float* b1) -> const float* {
    const float* v = row_f32(x + n * xsn + c * xsc, xsp, b0, P);
    if (!skip && !has_bias) return v;
    if (full_skip) {
      const float* k = row_f32(skip + n * ksn + c * ksc, ksp, b1, P);
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) b0[p] = v[p] + k[p];
    } else {
      const float k = bcast ? bsk[n * C + c] : 0.0f;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) b0[p] = v[p] + k;
    }
    if (has_bias) {
      const float bb = biasf[c];
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) b0[p] += bb;
    }
    return b0;
  };

#pragma omp parallel num_threads(nt)
  {
    float* b0 = tbuf + per_thread * thread_id();
    float* b1 = b0 + row_len;

    // v = (x + skip) + bias in fp32 for the generic (non-blocked) paths of both passes, into b0 (b1:
    // second input buffer); returns the input itself when nothing is added to contiguous fp32.
    // One NHWC pixel row (n, p): C values.
    auto pixel_values = [&](int64_t n, int64_t p) -> const float* {
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
    auto channel_values = [&](int64_t n, int64_t c) { return channel_values_into(n, c, b0, b1); };

    if (flat) {
#pragma omp for schedule(static)
      for (int64_t ng = 0; ng < N * G; ++ng) {
        const int64_t n = ng / G, g = ng % G, c0 = g * cpg;
        const float k = pivot[n * C + c0];
        LaneSums sums;
        for (int64_t c = c0; c < c0 + cpg; ++c) {
          const float* v = channel_values(n, c);
          if (s) put_row(v, s + n * xsn + c * xsc, 1, P);
          sums.add(v, P, k);
        }
        double ss, qq;
        sums.totals(ss, qq);
        finalize(n, g, from_shifted_sums(static_cast<double>(cpg * P), ss, qq));
        for (int64_t c = c0; c < c0 + cpg; ++c) {
          const float* v =
              reread_s ? reinterpret_cast<const float*>(s) + n * xsn + c * xsc : channel_values(n, c);
          normalise_channel(n, c, v, b1);
        }
      }
    } else if (nhwc) {
      float* acc_s = b1 + row_len;  // [C] shifted sums
      float* acc_q = acc_s + row_len;  // [C] shifted sums of squares
      // Phase 1: statistics (and s), this thread's chunks in order.
      int64_t t_begin, t_end;
      thread_range(N * nchunks, t_begin, t_end);
      for (int64_t task = t_begin; task < t_end; ++task) {
        const int64_t n = task / nchunks, ch = task % nchunks;
        const int64_t p0 = ch * rows_per_chunk, p1 = std::min(P, p0 + rows_per_chunk);
        const float* kp = pivot + n * C;
#if defined(__AVX512F__)
        if (blocked) {
          with_mode(stats_mode, [&](auto mode) {
            const NhwcRows<T, decltype(mode)::value> rows{x + n * xsn, full_skip ? skip + n * ksn : nullptr, xsp, ksp,
                                                         bcast ? bsk + n * C : nullptr, has_bias ? biasf : nullptr,
                                                         s ? s + n * xsn : nullptr};
            nhwc_stats_rows(rows, C, p0, p1, kp, acc_s, acc_q);
          });
        } else
#endif
        {
          for (int64_t c = 0; c < C; ++c) acc_s[c] = 0.0f, acc_q[c] = 0.0f;
          for (int64_t p = p0; p < p1; ++p) {
            const float* v = pixel_values(n, p);
            if (s) put_row(v, s + n * xsn + p * xsp, 1, C);
  #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const float d = v[c] - kp[c];
              acc_s[c] += d;
              acc_q[c] += d * d;
            }
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
        const float* v = channel_values(n, c);
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

    if (!flat) {
#pragma omp barrier  // every chunk's partial moments are written

      // Phase 2: merge the partials of each (n, group); per-channel scale and shift.
#pragma omp for schedule(static)
      for (int64_t ng = 0; ng < N * G; ++ng) {
        const Moments64* pr = part + ng * units;
        Moments64 acc{0.0, 0.0, 0.0};
        for (int64_t u = 0; u < units; ++u) acc = combine(acc, pr[u]);
        finalize(ng / G, ng % G, acc);  // phase 1 is done with the pivots (barrier)
      }

      // Phase 3: normalise (+SiLU) and write y.
      if (nhwc) {
        float* b2 = b1 + row_len;  // output row
        // The same chunks as in phase 1, last first: the chunks this thread read most recently are
        // still in its L2 cache.
        int64_t t_begin, t_end;
        thread_range(N * nchunks, t_begin, t_end);
        for (int64_t task = t_end - 1; task >= t_begin; --task) {
          const int64_t n = task / nchunks, ch = task % nchunks;
          const int64_t p0 = ch * rows_per_chunk, p1 = std::min(P, p0 + rows_per_chunk);
          const float *kp = pivot + n * C, *ap = scale + n * C, *bp = shift + n * C;
#if defined(__AVX512F__)
          if (blocked) {
            with_mode(norm_mode, [&](auto mode) {
              const NhwcRows<T, decltype(mode)::value> rows{x + n * xsn, full_skip ? skip + n * ksn : nullptr, xsp, ksp,
                                                           bcast ? bsk + n * C : nullptr, has_bias ? biasf : nullptr,
                                                           reread_s ? s + n * xsn : nullptr};
              if (silu) {
                nhwc_norm_rows<T, true>(rows, y + n * xsn, C, p0, p1, kp, ap, bp);
              } else {
                nhwc_norm_rows<T, false>(rows, y + n * xsn, C, p0, p1, kp, ap, bp);
              }
            });
            continue;
          }
#endif
          for (int64_t p = p0; p < p1; ++p) {
            const float* v =
                reread_s ? reinterpret_cast<const float*>(s) + n * xsn + p * xsp : pixel_values(n, p);
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
          const float* v = reread_s && xsp == 1 ? reinterpret_cast<const float*>(s) + n * xsn + c * xsc
                                                 : channel_values(n, c);
          normalise_channel(n, c, v, b1);
        }
      }
    }  // !flat
  }
  return Status::Ok();
}

}  // namespace gn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
