// Per-element math shared by the CPU and CUDA kernels (and unit-tested on the host).
// Everything here is SDKERN_HD: plain C++ on the host, __host__ __device__ under nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SDKERN_HD __host__ __device__ __forceinline__
#else
// static: internal linkage, so each translation unit (compiled per CPU ISA level) keeps its own copy
#define SDKERN_HD static inline
#endif

namespace sdkern {
namespace math {

// ---- bit casts (memcpy is free after optimisation and legal in both worlds) ----
SDKERN_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
SDKERN_HD float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// ---- bfloat16 / float16 <-> float32 ----
// The only software implementation of these conversions in the project (the CPU kernels' SIMD layer,
// kernels/cpu/simd.h, calls these). Written branch-free (selects, no early returns) so that loops
// over them vectorise under `#pragma omp simd`; tests/native/test_math_host.py checks them on every
// 16-bit pattern and every rounding midpoint.

// bfloat16 -> float32: exact (a shift).
SDKERN_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
SDKERN_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t r = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded;
  return static_cast<uint16_t>(r);
}

// float16 (IEEE binary16) -> float32: exact, subnormals, inf and NaN included.
SDKERN_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Normal and subnormal numbers by scaling: shift exponent/mantissa into float position and
  // multiply by 2^112 to re-bias (exact, handles subnormals for free).
  const float scaled = bits_f32(em << 13) * bits_f32(0x77800000u);  // 2^112
  const uint32_t mag = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : f32_bits(scaled);  // inf / NaN
  return bits_f32(mag | sign);
}

// float32 -> float16, round to nearest even; overflow (|f| >= 65520) to inf, NaN to a quiet NaN.
SDKERN_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal results: re-bias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // Subnormal results (|f| < 2^-14): adding 0.5f = 2^-1 aligns the f16 quantum 2^-24 to the float
  // ulp, so float addition does the rounding.
  const uint32_t sub = f32_bits(bits_f32(a) + 0.5f) - 0x3f000000u;
  uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;
  r = a > 0x7f800000u ? 0x7e00u : r;
  return static_cast<uint16_t>(sign | r);
}

// ---- activations (accurate in fp32, libm-based; the CUDA kernels' and the host tests'. The CPU
// kernels use the vectorisable forms of kernels/cpu/vec_math.h instead.) ----
SDKERN_HD float silu(float x) { return x / (1.0f + expf(-x)); }

SDKERN_HD float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// ---- Welford / Chan combine of partial statistics (count, mean, M2) ----
struct Moments {
  float n;
  float mean;
  float m2;
};

SDKERN_HD Moments moments_combine(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return {0.0f, 0.0f, 0.0f};
  const float delta = b.mean - a.mean;
  const float wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// Moments of a block from its sum and sum of squared deviations about a shift (used to merge
// per-block (sum, sumsq) partials computed about a common pivot without cancellation).
SDKERN_HD Moments moments_from_shifted_sums(float n, float sum, float sumsq, float shift) {
  if (n == 0.0f) return {0.0f, 0.0f, 0.0f};
  const float m = sum / n;
  float m2 = sumsq - sum * m;
  if (m2 < 0.0f) m2 = 0.0f;
  return {n, shift + m, m2};
}

}  // namespace math
}  // namespace sdkern
