// BiasAdd on CPU: y = x + bias + skip over (M, C) rows. Memory-bound: one pass, rows split across
// OpenMP threads, fp32 bias row prepared once per thread, inner loop vectorised by the compiler.
#include <vector>

#include "convert.h"
#include "sdkern/bias_add.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

template <typename T>
static void bias_add_rows(const BiasAddArgs& a) {
  const T* x = static_cast<const T*>(a.x);      // (M, C), row stride x_row_stride
  const T* skip = static_cast<const T*>(a.skip);  // (M, C), row stride skip_row_stride
  T* y = static_cast<T*>(a.y);                    // (M, C) contiguous
  const int64_t M = a.M, C = a.C;
#pragma omp parallel
  {
    // Per-thread fp32 copy of the bias: thread-local scratch, reused across calls.
    static thread_local std::vector<float> bias;
    bias.resize(C);
    for (int64_t c = 0; c < C; ++c) bias[c] = load_param(a.bias, a.bias_dtype, c);
    const float* b = bias.data();
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + m * a.x_row_stride;
      const T* sr = skip + m * a.skip_row_stride;
      T* yr = y + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yr[c] = from_f32<T>(to_f32(xr[c]) + b[c] + to_f32(sr[c]));
    }
  }
}

Status bias_add(const BiasAddArgs& a) {
  if (a.M == 0) return Status::Ok();
  return with_dtype(a.dtype, [&](auto tag) {
    bias_add_rows<decltype(tag)>(a);
    return Status::Ok();
  });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
