// BiasSplitGelu on CPU: y[m, d] = (x[m, d] + b[d]) * gelu_erf(x[m, D + d] + b[D + d]) over (M, 2D)
// rows (diffusers GEGLU with the Linear bias folded in). Memory-bound for fp16/bf16, close to
// balanced for fp32: one pass over x, rows (or row pieces, when there are few rows) split across
// threads (parallel.h), fp32 math with the vectorised erf of vec_math.h. The bias is read in its own
// storage type (fp32, or x's dtype) inside the loop, so no scratch is needed.
#include <algorithm>

#include "parallel.h"
#include "sdkern/bias_split_gelu.h"
#include "simd.h"
#include "vec_math.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

// One piece [d0, d1) of one row.
template <typename T, typename B>
static inline void gelu_piece(const T* __restrict xr,  // [2D] row of x
                              const B* __restrict b,   // [2D] bias
                              T* __restrict yr,        // [D] row of y
                              int64_t D, int64_t d0, int64_t d1) {
#pragma omp simd
  for (int64_t d = d0; d < d1; ++d) {
    const float a = to_f32(xr[d]) + to_f32(b[d]);
    const float g = to_f32(xr[D + d]) + to_f32(b[D + d]);
    yr[d] = from_f32<T>(a * vm::gelu_erf(g));
  }
}

template <typename T, typename B>
static void bias_split_gelu_rows(const BiasSplitGeluArgs& a) {
  const T* x = static_cast<const T*>(a.x);  // (M, 2D), rows x_row_stride apart
  const B* b = static_cast<const B*>(a.bias);  // [2D]
  T* y = static_cast<T*>(a.y);              // (M, D) contiguous
  const int64_t M = a.M, D = a.D, rs = a.x_row_stride;
  const int threads = max_threads();
  // Split rows into pieces only when rows alone cannot keep every thread busy (few, long rows);
  // pieces stay >= 512 columns and a multiple of 64 so the vector loops run full.
  int64_t pieces = 1;
  if (M < 4 * threads && D >= 1024) pieces = std::min<int64_t>((4 * threads + M - 1) / M, D / 512);
  const int64_t chunk = pieces > 1 ? ((D + pieces - 1) / pieces + 63) / 64 * 64 : D;
  pieces = (D + chunk - 1) / chunk;
  const int64_t items = M * pieces;
  parallel_for(items, M * D >= 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t m = it / pieces, j = it % pieces;
      const int64_t d0 = j * chunk, d1 = std::min(D, d0 + chunk);
      gelu_piece<T, B>(x + m * rs, b, y + m * D, D, d0, d1);
    }
  });
}

Status bias_split_gelu(const BiasSplitGeluArgs& a) {
  if (a.M == 0) return Status::Ok();
  return with_dtype_and_param(a.dtype, a.bias_dtype, "bias_split_gelu: bias must be float32 or the dtype of x",
                              [&](auto t, auto p) { bias_split_gelu_rows<decltype(t), decltype(p)>(a); });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
