// BiasAdd on CPU: y = x + bias + skip over (M, C) rows. Memory-bound: one pass, rows split across
// threads (parallel.h: OpenMP or the host pool), inner loop vectorised for every storage type (simd.h's
// to_f32 / from_f32; the bias is read in its own storage type, fp32 or x's dtype, so no scratch copy).
#include "parallel.h"
#include "sdkern/bias_add.h"
#include "simd.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

template <typename T, typename B>
static void bias_add_rows(const BiasAddArgs& a) {
  const T* x = static_cast<const T*>(a.x);        // (M, C), row stride x_row_stride
  const B* b = static_cast<const B*>(a.bias);     // [C]
  const T* skip = static_cast<const T*>(a.skip);  // (M, C), row stride skip_row_stride
  T* y = static_cast<T*>(a.y);                    // (M, C) contiguous
  const int64_t M = a.M, C = a.C;
  parallel_for(M, M * C >= 32768, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* __restrict xr = x + m * a.x_row_stride;
      const T* __restrict sr = skip + m * a.skip_row_stride;
      T* __restrict yr = y + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = from_f32<T>(to_f32(xr[c]) + to_f32(b[c]) + to_f32(sr[c]));
    }
  });
}

Status bias_add(const BiasAddArgs& a) {
  if (a.M == 0) return Status::Ok();
  return with_dtype_and_param(a.dtype, a.bias_dtype, "bias_add: bias must be float32 or the dtype of x",
                              [&](auto t, auto p) { bias_add_rows<decltype(t), decltype(p)>(a); });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
