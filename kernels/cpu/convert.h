// Element storage types and fp32 conversion for the CPU kernels.
// Kernels are templates over the storage type T (float, f16_t, bf16_t) and compute in fp32.
// Conversions are branch-light bit manipulation (sdkern/math.h) so loops stay vectorisable; with
// F16C available the compiler is given the hardware conversion.
#pragma once

#include <cstdint>

#include "isa.h"
#include "sdkern/common.h"
#include "sdkern/math.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace sdkern {
namespace cpu {
// Per-ISA inline namespace: these helpers are compiled once per ISA level with different -m flags,
// so each level must get its own symbols (one shared weak copy could carry AVX-512 code into the
// baseline path).
inline namespace SDKERN_ISA_NS {

struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) { return math::bf16_to_f32(v.bits); }
inline float to_f32(f16_t v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.bits);
#else
  return math::f16_to_f32(v.bits);
#endif
}

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
#if defined(__F16C__)
  return f16_t{_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)};
#else
  return f16_t{math::f32_to_f16(f)};
#endif
}

// Read element i of a [n] parameter vector of runtime dtype as fp32.
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

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
