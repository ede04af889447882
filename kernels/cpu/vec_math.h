// fp32 transcendental functions of the CPU kernels (namespace vm), on top of the SIMD layer simd.h:
//  * scalar exp, erf, erfc (t >= 0), GELU (erf form) and SiLU, written so that `#pragma omp simd`
//    loops over them vectorise at every ISA level (the only scalar forms the CPU kernels use);
//  * on the vector type V: exp2 (attention's softmax) and, with AVX-512, SiLU at fp32 and at bf16
//    output precision (GroupNorm+SiLU).
//
// Every scalar function is branch-free straight-line code on one float (selects instead of branches,
// integer bit tricks instead of library calls), so loops under `#pragma omp simd` compile to SIMD
// at every ISA level. Accuracy (measured against std::exp / std::erf by setup_tools/check_vec_math.py
// and the op tests): relative error ~1e-7 (a few ulp) over the whole fp32 range, including the
// tails GELU needs (1 + erf(z) for z << 0 is computed as erfc(|z|) without cancellation).
//
// Polynomial coefficients were fitted for this file (iteratively reweighted least squares toward
// minimax in double precision, then rounded to float).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace sdkern {
namespace cpu {
// Per-ISA inline namespace: these helpers are compiled once per ISA level with different -m flags,
// so each level must get its own symbols (one shared weak copy could carry AVX-512 code into the
// baseline path).
inline namespace SDKERN_ISA_NS {
namespace vm {

// a * b + c, fused when the target has FMA (no libm call on targets without it).
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

inline float as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

inline int32_t as_int(float f) {
  int32_t i;
  std::memcpy(&i, &f, 4);
  return i;
}

// exp(hi + lo) for every float hi and a small correction |lo| <= ~2^-10 |hi| (lo = 0: plain exp):
// Cody-Waite reduction hi + lo = n ln2 + r, |r| <= ln2/2, exp(r) as 1 + r + r^2 P(r) (P of degree
// 4), then 2^n applied in two halves so that results down to the subnormal range and up to
// overflow (inf for x > ~88.72) come out right. NaN propagates.
inline float exp_hl(float hi, float lo) {
  float xc = hi > 88.8f ? 88.8f : hi;  // comparisons with NaN are false: NaN stays NaN
  xc = xc < -104.0f ? -104.0f : xc;
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (default rounding mode).
  const float kShift = 12582912.0f;
  const float nf = (xc * 1.44269504088896341f + kShift) - kShift;
  // ln2 split so that nf * kLn2Hi is exact (|n| <= 151 needs 8 bits; kLn2Hi has 9 significant bits).
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float r = fmadd(nf, -kLn2Hi, xc) + lo;
  r = fmadd(nf, -kLn2Lo, r);
  float p = 1.390126883e-03f;
  p = fmadd(p, r, 8.363140747e-03f);
  p = fmadd(p, r, 4.166685417e-02f);
  p = fmadd(p, r, 1.666657776e-01f);
  p = fmadd(p, r, 5.000000000e-01f);
  p = fmadd(p * r, r, r) + 1.0f;
  // NaN: p is NaN already; casting NaN to int is UB (and INT_MIN would make the shifts below UB too).
  const int32_t n = nf == nf ? static_cast<int32_t>(nf) : 0;
  const int32_t n1 = n >> 1, n2 = n - n1;  // both in [-76, 64]: 2^n1, 2^n2 are normal floats
  return p * as_float((n1 + 127) << 23) * as_float((n2 + 127) << 23);
}

// exp(x) for every float x.
inline float exp(float x) { return exp_hl(x, 0.0f); }

// x * x = hi + lo with hi exact-ish: x split into a 12-significant-bit head (whose square is exact)
// and a tail (Veltkamp-style by masking). Works without FMA, so every ISA level gives the same result.
struct Square {
  float hi, lo;
};
inline Square square_split(float x) {
  const float xh = as_float(as_int(x) & static_cast<int32_t>(0xfffff000u));
  const float xl = x - xh;
  return {xh * xh, xl * (x + xh)};
}

// erf(x) / x for |x| <= 1/2 as a polynomial in x^2 (relative error < 1e-7).
inline float erf_small_over_x(float s /* = x * x */) {
  float p = 4.718085285e-03f;
  p = fmadd(p, s, -2.675723843e-02f);
  p = fmadd(p, s, 1.128282398e-01f);
  p = fmadd(p, s, -3.761260808e-01f);
  return fmadd(p, s, 1.128379107e+00f);
}

// Below this |x|, erf(x) comes from the series-like polynomial; above, from erfc.
constexpr float kErfSplit = 0.5f;

// erfc(t) for t >= 0 given t^2 = sq.hi + sq.lo (relative error ~2e-7 up to t ~ 9, 0 beyond 10):
// erfc(t) = exp(-t^2) * erfcx(t), erfcx as a polynomial in u = 1 / (1 + t/2) on u in [1/6, 1]
// (t in [0, 10]). The split square keeps the relative accuracy of the tail (exp(-t^2) is as
// sensitive to t^2 as t^2 is large).
inline float erfc_large(float t, Square sq) {
  const float u = 1.0f / fmadd(0.5f, t, 1.0f);
  float q = -5.505615100e-02f;
  q = fmadd(q, u, 2.639279068e-01f);
  q = fmadd(q, u, -4.415320456e-01f);
  q = fmadd(q, u, 2.212580144e-01f);
  q = fmadd(q, u, 1.702669635e-02f);
  q = fmadd(q, u, 1.812745929e-01f);
  q = fmadd(q, u, 2.497858852e-01f);
  q = fmadd(q, u, 2.810998559e-01f);
  q = fmadd(q, u, 2.822212279e-01f);
  q = fmadd(q, u, -6.004768238e-06f);
  const float e = exp_hl(-sq.hi, -sq.lo) * q;
  return t > 10.0f ? 0.0f : e;  // also keeps inf inputs (inf - inf in the split) from making NaN
}

// erf(x) for every float x.
inline float erf(float x) {
  const float t = x < 0.0f ? -x : x;
  const float small = x * erf_small_over_x(x * x);
  const float big = 1.0f - erfc_large(t, square_split(x));
  return t < kErfSplit ? small : (x < 0.0f ? -big : big);
}

// 1 + erf(x / sqrt(2)) (= 2 Phi(x)) from erfc alone, accurate also where erf ~ -1 (z^2 = x^2 / 2
// taken from the split square of x, not of the rounded z). No small-argument branch is needed
// here: near 0 the result is ~1, so erfc's relative accuracy is also the result's.
inline float one_plus_erf_scaled(float x) {
  const float z = x * 0.707106781186547524f;
  const float t = z < 0.0f ? -z : z;
  Square sq = square_split(x);
  sq.hi *= 0.5f, sq.lo *= 0.5f;
  const float c = erfc_large(t, sq);
  return z < 0.0f ? c : 2.0f - c;
}

// GELU, erf form: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))).
inline float gelu_erf(float x) { return 0.5f * x * one_plus_erf_scaled(x); }

// SiLU: x * sigmoid(x) = x / (1 + exp(-x)).
inline float silu(float x) { return x / (1.0f + exp(-x)); }

// ---------------------------------------------------------------------------------------------
// On vectors (simd.h's V)
// ---------------------------------------------------------------------------------------------

// 2^f on f in [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 7 (relative error < 1e-8).
constexpr float kExp2C1 = 0.6931471805599453f, kExp2C2 = 0.2402265069591007f, kExp2C3 = 0.05550410866482158f,
                kExp2C4 = 0.009618129107628477f, kExp2C5 = 0.0013333558146428443f,
                kExp2C6 = 1.5403530393381606e-4f, kExp2C7 = 1.525273380405984e-5f;
constexpr float kExp2Lo = -126.0f, kExp2Hi = 127.0f;  // the clamp keeps 2^n a normal float

// 2^x lane by lane, x clamped to [-126, 127] (so 2^-126 is the smallest result, never 0); NaN stays NaN.
#if defined(SDKERN_SIMD_AVX512) || defined(SDKERN_SIMD_AVX2)
inline V exp2_poly(V f) {
  V p = vfma(vbcast(kExp2C7), f, vbcast(kExp2C6));
  p = vfma(p, f, vbcast(kExp2C5));
  p = vfma(p, f, vbcast(kExp2C4));
  p = vfma(p, f, vbcast(kExp2C3));
  p = vfma(p, f, vbcast(kExp2C2));
  p = vfma(p, f, vbcast(kExp2C1));
  return vfma(p, f, vbcast(1.0f));
}
#endif

#if defined(SDKERN_SIMD_AVX512)
inline V exp2(V x) {
  // max/min return their second operand when either is NaN: x second, so NaN stays NaN.
  x = _mm512_min_ps(vbcast(kExp2Hi), _mm512_max_ps(vbcast(kExp2Lo), x));
  const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_poly(vsub(x, n)), n);
}
#elif defined(SDKERN_SIMD_AVX2)
inline V exp2(V x) {
  // max/min return their second operand when either is NaN: x second, so NaN stays NaN.
  x = _mm256_min_ps(vbcast(kExp2Hi), _mm256_max_ps(vbcast(kExp2Lo), x));
  const V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V p = exp2_poly(vsub(x, n));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return vmul(p, _mm256_castsi256_ps(e));
}
#else
inline V exp2(V a) {
  for (int i = 0; i < W; ++i) {
    const float x = std::min(std::max(a.x[i], kExp2Lo), kExp2Hi);  // std::max/min keep a NaN first argument
    const float n = std::nearbyint(x);
    const float f = x - n;
    const float p =
        1.0f +
        f * (kExp2C1 + f * (kExp2C2 + f * (kExp2C3 + f * (kExp2C4 + f * (kExp2C5 + f * (kExp2C6 + f * kExp2C7))))));
    const int32_t ni = n == n ? static_cast<int32_t>(n) : 0;  // NaN: p is NaN already; no UB cast
    a.x[i] = p * math::bits_f32(static_cast<uint32_t>(ni + 127) << 23);
  }
  return a;
}
#endif

#if defined(SDKERN_SIMD_AVX512)
// SiLU of 16 lanes: y / (1 + exp(-y)), with y clamped to [-80, 87] inside exp (for y < -80 the result
// is y * sigmoid(-80): |error| < 1e-32, far below any tolerance; NaN propagates through the final
// division). exp(-y) = 2^n exp(r): n = round(-y / ln2) and rn = -r = y + n ln2 from one FMA with ln2 in
// fp32 (its representation error, 2e-9 per unit of n, stays below 3e-8 wherever exp(-y) still moves
// the result, |y| < 15), exp(-rn) by Horner in rn (degree 6), 2^n by vscalefps, then a correctly
// rounded division. Relative L2 error 4.3e-8 over y in [-30, 10], max 2.1e-7. (Why this form and not
// exp_hl's two-constant one, or rcp14 + Newton: benchmarks/results/cpu_kernel_design_notes.md.)
inline __m512 silu16(__m512 y) {
  const __m512 yc = _mm512_max_ps(_mm512_min_ps(y, _mm512_set1_ps(87.0f)), _mm512_set1_ps(-80.0f));
  const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(yc, _mm512_set1_ps(-1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 rn = _mm512_fmadd_ps(nf, _mm512_set1_ps(0.693147180559945309f), yc);  // -r, |r| <= ln2/2
  // exp(r) = exp(-rn): exp_hl's coefficients with the odd ones negated.
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

// The SiLU for outputs of storage type T: silu16_bf16 where the result is rounded to bf16 anyway.
template <typename T>
inline __m512 silu16_for(__m512 y) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return silu16_bf16(y);
  } else {
    return silu16(y);
  }
}
#endif

}  // namespace vm
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
