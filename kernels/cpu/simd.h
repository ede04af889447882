// The CPU kernels' SIMD layer: storage types and their fp32 conversions, fp32 row loads/stores, and
// a fixed-width fp32 vector type with the operations the kernels use. Transcendental functions
// (exp, exp2, erf, GELU, SiLU; scalar and vector) are in vec_math.h, built on this file.
//
// Every kernels/cpu/<op>.cpp is compiled once per ISA level (isa.h), so everything here lives in the
// per-level inline namespace: one shared weak copy of an inline function could otherwise carry
// AVX-512 code into the baseline path.
//
// Three layers, each usable on its own:
//  * elements: to_f32(T) / from_f32<T>(float) for T in {float, f16_t, bf16_t}. Branch-free bit
//    manipulation (sdkern/math.h, shared with the host tests), so `#pragma omp simd` loops over them
//    vectorise at every level; IEEE round to nearest even, subnormals, inf and NaN.
//  * rows: load_row / store_row convert n contiguous elements with the hardware fp16 conversions
//    where the level has them (F16C, AVX-512) and the element functions elsewhere; row_f32 / put_row
//    add strided access.
//  * vectors: W lanes of fp32 in V (AVX-512: 16, AVX2+FMA: 8, otherwise a portable 4-lane struct),
//    vzero/vload/vstore/vbcast/vfma/vmul/vadd/vsub/vmax, horizontal hmax/hsum; with AVX-512 also
//    masked 16-lane loads/stores of every storage type (load16 / store16).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "sdkern/common.h"
#include "sdkern/math.h"

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace sdkern {
namespace cpu {
inline namespace SDKERN_ISA_NS {

// ---------------------------------------------------------------------------------------------
// Elements
// ---------------------------------------------------------------------------------------------

// Storage types of the kernels' templates (computation is always fp32).
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) { return math::bf16_to_f32(v.bits); }
inline float to_f32(f16_t v) { return math::f16_to_f32(v.bits); }

template <typename T>
inline T from_f32(float f);
template <>
inline float from_f32<float>(float f) {
  return f;
}
template <>
inline bf16_t from_f32<bf16_t>(float f) {
  return bf16_t{math::f32_to_bf16(f)};
}
template <>
inline f16_t from_f32<f16_t>(float f) {
  return f16_t{math::f32_to_f16(f)};
}

// Element i of a [n] parameter vector of runtime dtype, as fp32.
inline float load_param(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16: return to_f32(static_cast<const f16_t*>(p)[i]);
    case DType::kBFloat16: return to_f32(static_cast<const bf16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Call f(T{}) with the storage type matching a runtime dtype.
template <typename F>
inline Status with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(f16_t{});
    case DType::kBFloat16: return f(bf16_t{});
  }
  return Status::Invalid("unknown dtype");
}

// Call f(T{}, P{}) for activations of runtime dtype t and a parameter vector (bias, gamma, ...) of
// runtime dtype p, which must be float32 (P = float) or t (P = T); else Invalid(error).
template <typename F>
inline Status with_dtype_and_param(DType t, DType p, const char* error, F&& f) {
  return with_dtype(t, [&](auto tag) -> Status {
    if (p == DType::kFloat32) {
      f(tag, float{});
    } else if (p == t) {
      f(tag, tag);
    } else {
      return Status::Invalid(error);
    }
    return Status::Ok();
  });
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

// dst[i] = src[i] as fp32, i < n (src: [n] storage elements, dst: [n] floats).
inline void load_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, f16_t>) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  }
#pragma omp simd
  for (int64_t j = i; j < n; ++j) dst[j] = to_f32(src[j]);
}

// dst[i] = src[i] in the storage type, i < n (src: [n] floats, dst: [n] storage elements).
inline void store_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, f16_t>) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  }
#pragma omp simd
  for (int64_t j = i; j < n; ++j) dst[j] = from_f32<T>(src[j]);
}

// fp32 values of the n elements src[i * stride]: src itself when it already is contiguous fp32,
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

// dst[i * stride] = v[i] in the storage type, i < n.
template <typename T>
inline void put_row(const float* v, T* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    store_row(v, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = from_f32<T>(v[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Vectors: W fp32 lanes. Loads and stores are unaligned and of full vectors only.
// ---------------------------------------------------------------------------------------------

#if defined(__AVX512F__)
#define SDKERN_SIMD_AVX512 1
constexpr int W = 16;
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V x) { _mm512_storeu_ps(p, x); }
inline V vbcast(float x) { return _mm512_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float hmax(V x) { return _mm512_reduce_max_ps(x); }
inline float hsum(V x) { return _mm512_reduce_add_ps(x); }

// Masked 16-lane access to storage elements (lanes outside m read as 0 and are not written).
inline __mmask16 lane_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << remaining) - 1u);
}
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

#elif defined(__AVX2__) && defined(__FMA__)
#define SDKERN_SIMD_AVX2 1
constexpr int W = 8;
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V x) { _mm256_storeu_ps(p, x); }
inline V vbcast(float x) { return _mm256_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float hmax(V x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline float hsum(V x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#else
// Portable: a 4-lane struct and plain loops the compiler may vectorise.
constexpr int W = 4;
struct V {
  float x[W];
};
inline V vzero() { return V{{0.f, 0.f, 0.f, 0.f}}; }
inline V vload(const float* p) {
  V r;
  for (int i = 0; i < W; ++i) r.x[i] = p[i];
  return r;
}
inline void vstore(float* p, V a) {
  for (int i = 0; i < W; ++i) p[i] = a.x[i];
}
inline V vbcast(float s) { return V{{s, s, s, s}}; }
inline V vfma(V a, V b, V c) {
  for (int i = 0; i < W; ++i) c.x[i] += a.x[i] * b.x[i];  // no FMA assumed at this level
  return c;
}
inline V vmul(V a, V b) {
  for (int i = 0; i < W; ++i) a.x[i] *= b.x[i];
  return a;
}
inline V vadd(V a, V b) {
  for (int i = 0; i < W; ++i) a.x[i] += b.x[i];
  return a;
}
inline V vsub(V a, V b) {
  for (int i = 0; i < W; ++i) a.x[i] -= b.x[i];
  return a;
}
inline V vmax(V a, V b) {
  for (int i = 0; i < W; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
  return a;
}
inline float hmax(V a) { return std::max(std::max(a.x[0], a.x[1]), std::max(a.x[2], a.x[3])); }
inline float hsum(V a) { return (a.x[0] + a.x[1]) + (a.x[2] + a.x[3]); }
#endif

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
