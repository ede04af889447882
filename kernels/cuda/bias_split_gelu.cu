// BiasSplitGelu on CUDA: y[m, d] = (x[m, d] + b[d]) * gelu_erf(x[m, D + d] + b[D + d]), d < D.
// One thread per 16-byte vector of the output row when sizes and pointers allow, else per element.
#include "common.cuh"
#include "sdkern/bias_split_gelu.h"

namespace sdkern {
namespace cuda {
namespace {

// x:    (M, 2D) rows x_rs elements apart, storage T
// bias: [2D] contiguous, dtype code bias_dtype
// y:    (M, D) contiguous, storage T
template <typename T, bool kVector>
__global__ void bias_split_gelu_kernel(const T* __restrict__ x, const void* __restrict__ bias, T* __restrict__ y,
                                       int64_t M, int64_t D, int64_t x_rs, int bias_dtype) {
  constexpr int VEC = kVector ? Vec<T>::kN : 1;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (d0 >= D) return;
  float ba[VEC], bg[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    ba[i] = load_param(bias, bias_dtype, d0 + i);
    bg[i] = load_param(bias, bias_dtype, D + d0 + i);
  }
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const T* row = x + m * x_rs;
    if constexpr (kVector) {
      const Pack<T> av = load_pack(row + d0);
      const Pack<T> gv = load_pack(row + D + d0);
      Pack<T> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        out.v[i] = from_f<T>((to_f(av.v[i]) + ba[i]) * math::gelu_erf(to_f(gv.v[i]) + bg[i]));
      store_pack(y + m * D + d0, out);
    } else {
      y[m * D + d0] = from_f<T>((to_f(row[d0]) + ba[0]) * math::gelu_erf(to_f(row[D + d0]) + bg[0]));
    }
  }
}

}  // namespace
}  // namespace cuda

Status bias_split_gelu_cuda(const BiasSplitGeluArgs& a, cudaStream_t stream) {
  Status st = validate(a);
  if (!st.ok() || a.M == 0) return st;
  return cuda::with_dtype(a.dtype, [&](auto tag) -> Status {
    using T = decltype(tag);
    constexpr int VEC = cuda::Vec<T>::kN;
    const int64_t xrs = a.M == 1 ? 2 * a.D : a.x_row_stride;
    const bool vec = a.D % VEC == 0 && xrs % VEC == 0 && cuda::aligned16(a.x) && cuda::aligned16(a.y);
    const int64_t per_row = vec ? a.D / VEC : a.D;
    const int threads = static_cast<int>(std::min<int64_t>(256, cuda::ceil_div(per_row, 32) * 32));
    const dim3 grid(static_cast<unsigned>(cuda::ceil_div(per_row, threads)),
                    static_cast<unsigned>(std::min<int64_t>(a.M, cuda::kMaxGridY)));
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    const int bd = static_cast<int>(a.bias_dtype);
    if (vec)
      cuda::bias_split_gelu_kernel<T, true><<<grid, threads, 0, stream>>>(x, a.bias, y, a.M, a.D, xrs, bd);
    else
      cuda::bias_split_gelu_kernel<T, false><<<grid, threads, 0, stream>>>(x, a.bias, y, a.M, a.D, xrs, bd);
    return cuda::launch_status("bias_split_gelu_cuda");
  });
}

}  // namespace sdkern
