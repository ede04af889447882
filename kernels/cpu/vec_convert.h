// Element loads/stores for the vectorised CPU loops: ld(v) -> fp32, st<T>(f) -> storage type.
//
// Same results as convert.h's to_f32 / from_f32 (IEEE round to nearest even, subnormals, inf,
// NaN), but written so that `#pragma omp simd` loops vectorise for every storage type: float16
// goes through branch-free integer/float code instead of the scalar F16C intrinsics (_cvtss_sh),
// which GCC does not vectorise. bfloat16 and float use convert.h directly.
#pragma once

#include <cstdint>

#include "convert.h"

namespace sdkern {
namespace cpu {
namespace vc {

inline float ld(float v) { return v; }
inline float ld(bf16_t v) { return to_f32(v); }
inline float ld(f16_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Shift exponent/mantissa into place and multiply by 2^112 to re-bias (exact, subnormals too).
  const float scaled = math::bits_f32(em << 13) * math::bits_f32(0x77800000u);
  const uint32_t mag = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : math::f32_bits(scaled);  // inf/NaN
  return math::bits_f32(mag | sign);
}

template <typename T>
inline T st(float f) {
  return from_f32<T>(f);
}
template <>
inline f16_t st<f16_t>(float f) {
  const uint32_t u = math::f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal results: re-bias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // Subnormal results (|f| < 2^-14): float addition of 0.5 aligns the f16 quantum 2^-24 to the
  // float ulp and rounds to nearest even.
  const uint32_t sub = math::f32_bits(math::bits_f32(a) + 0.5f) - 0x3f000000u;
  uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;  // overflow (>= 65520) -> inf
  r = a > 0x7f800000u ? 0x7e00u : r;   // NaN stays (quiet) NaN
  return f16_t{static_cast<uint16_t>(sign | r)};
}

}  // namespace vc
}  // namespace cpu
}  // namespace sdkern
