// BiasAdd on CPU: y = x + bias + skip over (M, C) rows. Memory-bound: one pass, rows split across
// OpenMP threads, inner loop vectorised for every storage type (vec_convert.h loads/stores; the
// bias is read in its own storage type, fp32 or x's dtype, so no scratch copy is needed).
#include "sdkern/bias_add.h"
#include "vec_convert.h"

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
#pragma omp parallel for schedule(static) if (M * C >= 32768)
  for (int64_t m = 0; m < M; ++m) {
    const T* __restrict xr = x + m * a.x_row_stride;
    const T* __restrict sr = skip + m * a.skip_row_stride;
    T* __restrict yr = y + m * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = vc::st<T>(vc::ld(xr[c]) + vc::ld(b[c]) + vc::ld(sr[c]));
  }
}

Status bias_add(const BiasAddArgs& a) {
  if (a.M == 0) return Status::Ok();
  return with_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.bias_dtype == DType::kFloat32) {
      bias_add_rows<T, float>(a);
    } else if (a.bias_dtype == a.dtype) {
      bias_add_rows<T, T>(a);
    } else {
      return Status::Invalid("bias_add: bias must be float32 or the dtype of x");
    }
    return Status::Ok();
  });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
