// BiasAdd on CUDA: y = x + bias + skip over (M, C) rows (last dim contiguous).
// One thread per 16-byte vector of a row when sizes and pointers allow, else one per element.
#include "common.cuh"
#include "sdkern/bias_add.h"

namespace sdkern {
namespace cuda {
namespace {

// x:    (M, C) rows x_rs elements apart, storage T
// bias: [C] contiguous, dtype code bias_dtype
// skip: (M, C) rows k_rs elements apart, storage T
// y:    (M, C) contiguous, storage T
// VEC: elements per thread (Vec<T>::kN on the vector path, 1 otherwise); C % VEC == 0.
template <typename T, bool kVector>
__global__ void bias_add_kernel(const T* __restrict__ x, const void* __restrict__ bias,
                                const T* __restrict__ skip, T* __restrict__ y, int64_t M, int64_t C,
                                int64_t x_rs, int64_t k_rs, int bias_dtype) {
  constexpr int VEC = kVector ? Vec<T>::kN : 1;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  float b[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) b[i] = load_param(bias, bias_dtype, c0 + i);
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    if constexpr (kVector) {
      const Pack<T> xv = load_pack(x + m * x_rs + c0);
      const Pack<T> kv = load_pack(skip + m * k_rs + c0);
      Pack<T> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) out.v[i] = from_f<T>(to_f(xv.v[i]) + b[i] + to_f(kv.v[i]));
      store_pack(y + m * C + c0, out);
    } else {
      y[m * C + c0] = from_f<T>(to_f(x[m * x_rs + c0]) + b[0] + to_f(skip[m * k_rs + c0]));
    }
  }
}

}  // namespace
}  // namespace cuda

Status bias_add_cuda(const BiasAddArgs& a, cudaStream_t stream) {
  Status st = validate(a);
  if (!st.ok() || a.M == 0) return st;
  return cuda::with_dtype(a.dtype, [&](auto tag) -> Status {
    using T = decltype(tag);
    constexpr int VEC = cuda::Vec<T>::kN;
    const int64_t xrs = a.M == 1 ? a.C : a.x_row_stride, krs = a.M == 1 ? a.C : a.skip_row_stride;
    const bool vec = a.C % VEC == 0 && xrs % VEC == 0 && krs % VEC == 0 && cuda::aligned16(a.x) &&
                     cuda::aligned16(a.skip) && cuda::aligned16(a.y);
    const int64_t per_row = vec ? a.C / VEC : a.C;
    const int threads = static_cast<int>(std::min<int64_t>(256, cuda::ceil_div(per_row, 32) * 32));
    const dim3 grid(static_cast<unsigned>(cuda::ceil_div(per_row, threads)),
                    static_cast<unsigned>(std::min<int64_t>(a.M, cuda::kMaxGridY)));
    const T* x = static_cast<const T*>(a.x);
    const T* k = static_cast<const T*>(a.skip);
    T* y = static_cast<T*>(a.y);
    const int bd = static_cast<int>(a.bias_dtype);
    if (vec)
      cuda::bias_add_kernel<T, true><<<grid, threads, 0, stream>>>(x, a.bias, k, y, a.M, a.C, xrs, krs, bd);
    else
      cuda::bias_add_kernel<T, false><<<grid, threads, 0, stream>>>(x, a.bias, k, y, a.M, a.C, xrs, krs, bd);
    return cuda::launch_status("bias_add_cuda");
  });
}

}  // namespace sdkern
