// SkipLayerNorm on CUDA: s = x (+ skip) (+ bias); y = LayerNorm(s) * gamma (+ beta) over rows of C
// (no skip: a plain LayerNorm).
// A row is handled by `tpr` threads (one or more warps; several rows per 256-thread block). The
// row's fp32 sums are cached in shared memory when they fit, so mean and variance are computed in
// two exact passes (no E[x^2] - E[x]^2 cancellation) with one read of x and skip.
#include "common.cuh"
#include "sdkern/skip_layer_norm.h"

namespace sdkern {
namespace cuda {
namespace {

constexpr int kBlock = 256;
// Static shared memory of the kernel: the [8][8] float reduction scratch `red`.
constexpr int64_t kStaticSmemBytes = 8 * 8 * sizeof(float);
// Dynamic + static shared memory must stay within the 48 KiB a launch gets without opting in
// (cudaFuncAttributeMaxDynamicSharedMemorySize): C <= 12224 fp32 sums per row at one row per block.
constexpr int64_t kMaxCacheBytes = 48 * 1024 - kStaticSmemBytes;

// Sum over the blockDim.x threads of this row (threadIdx.y); every thread of the row gets it.
// red: shared [8][8] scratch (rows per block x warps per row).
__device__ __forceinline__ float row_sum(float v, float (*red)[8]) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;  // uniform over the block
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.y][threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) t += red[threadIdx.y][w];
  return t;
}

// v[0..VEC) = x (+ skip) (+ bias) at columns c0.. of one row (xr, kr: row starts, kr read only when kSkip;
// bias optional, dtype pdt).
template <typename T, bool kVector, bool kSkip>
__device__ __forceinline__ void load_row_sum(const T* xr, const T* kr, const void* bias, int pdt, int64_t c0,
                                             float* v) {
  constexpr int VEC = kVector ? Vec<T>::kN : 1;
  if constexpr (kVector) {
    const Pack<T> a = load_pack(xr + c0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_f(a.v[i]);
    if constexpr (kSkip) {
      const Pack<T> b = load_pack(kr + c0);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] += to_f(b.v[i]);
    }
  } else {
    v[0] = to_f(xr[c0]);
    if constexpr (kSkip) v[0] += to_f(kr[c0]);
  }
  if (bias) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] += load_param(bias, pdt, c0 + i);
  }
}

// x:     (M, C) rows x_rs apart, storage T        skip:  (M, C) rows k_rs apart, storage T (read when kSkip)
// gamma: [C] dtype pdt        beta, bias: optional [C] dtype pdt (nullptr = absent)
// y:     (M, C) contiguous    s: optional (M, C) contiguous (nullptr = not written)
// mean_out, rstd_out: optional [M] fp32
// Dynamic shared memory (kCache): blockDim.y * C floats.
template <typename T, bool kVector, bool kCache, bool kSkip>
__global__ void __launch_bounds__(kBlock)
    skip_layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ skip, const void* __restrict__ gamma,
                           const void* __restrict__ beta, const void* __restrict__ bias, T* __restrict__ y,
                           T* __restrict__ s, float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t M,
                           int64_t C, int64_t x_rs, int64_t k_rs, float eps, int pdt) {
  constexpr int VEC = kVector ? Vec<T>::kN : 1;
  extern __shared__ float cache[];
  __shared__ float red[8][8];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < M;  // inactive rows still take part in the barriers
  float* rc = cache + static_cast<int64_t>(threadIdx.y) * C;
  const T* xr = x + (active ? row : 0) * x_rs;
  const T* kr = kSkip ? skip + (active ? row : 0) * k_rs : nullptr;
  const int64_t nvec = C / VEC;

  auto load_sum = [&](int64_t c0, float* v) { load_row_sum<T, kVector, kSkip>(xr, kr, bias, pdt, c0, v); };

  float sum = 0.0f;
  if (active) {
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t c0 = j * VEC;
      float v[VEC];
      load_sum(c0, v);
      if (s) {
        if constexpr (kVector) {
          Pack<T> o;
#pragma unroll
          for (int i = 0; i < VEC; ++i) o.v[i] = from_f<T>(v[i]);
          store_pack(s + row * C + c0, o);
        } else {
          s[row * C + c0] = from_f<T>(v[0]);
        }
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sum += v[i];
        if constexpr (kCache) rc[c0 + i] = v[i];
      }
    }
  }
  const float mean = row_sum(sum, red) / static_cast<float>(C);

  float sq = 0.0f;
  if (active) {
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      const int64_t c0 = j * VEC;
      float v[VEC];
      if constexpr (kCache) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = rc[c0 + i];
      } else {
        load_sum(c0, v);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sq += (v[i] - mean) * (v[i] - mean);
    }
  }
  const float var = row_sum(sq, red) / static_cast<float>(C);
  const float rstd = rsqrtf(var + eps);
  if (!active) return;
  if (threadIdx.x == 0) {
    if (mean_out) mean_out[row] = mean;
    if (rstd_out) rstd_out[row] = rstd;
  }
  for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
    const int64_t c0 = j * VEC;
    float v[VEC];
    if constexpr (kCache) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = rc[c0 + i];
    } else {
      load_sum(c0, v);
    }
    float o[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      o[i] = (v[i] - mean) * rstd * load_param(gamma, pdt, c0 + i);
      if (beta) o[i] += load_param(beta, pdt, c0 + i);
    }
    if constexpr (kVector) {
      Pack<T> p;
#pragma unroll
      for (int i = 0; i < VEC; ++i) p.v[i] = from_f<T>(o[i]);
      store_pack(y + row * C + c0, p);
    } else {
      y[row * C + c0] = from_f<T>(o[0]);
    }
  }
}

// Threads per row: one warp, doubled while each thread would have more than 4 items (max kBlock).
inline int threads_per_row(int64_t items) {
  int tpr = 32;
  while (tpr < kBlock && tpr * 4 < items) tpr *= 2;
  return tpr;
}

// kVector: 16-byte accesses (caller checked sizes and alignment); kSkip: a skip input (else a plain
// LayerNorm). Rows whose fp32 copy does not fit the shared-memory cache (C > 12224 at one row per block)
// take the scalar re-reading kernel.
template <typename T, bool kVector, bool kSkip>
Status launch(const SkipLayerNormArgs& a, int64_t xrs, int64_t krs, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  const T* k = static_cast<const T*>(a.skip);
  T* y = static_cast<T*>(a.y);
  T* s = static_cast<T*>(a.s);
  const int pdt = static_cast<int>(a.param_dtype);
  int tpr = threads_per_row(kVector ? a.C / Vec<T>::kN : a.C);
  int rows = kBlock / tpr;
  const int64_t cache_bytes = static_cast<int64_t>(rows) * a.C * 4;
  const bool cache = cache_bytes <= kMaxCacheBytes;
  if (!cache) {
    tpr = threads_per_row(a.C);
    rows = kBlock / tpr;
  }
  const int64_t nblocks = ceil_div(a.M, rows);
  if (nblocks > 0x7fffffff) return Status::Unsupported("skip_layer_norm_cuda: too many rows");
  const dim3 block(tpr, rows);
  if (cache)
    skip_layer_norm_kernel<T, kVector, true, kSkip><<<static_cast<unsigned>(nblocks), block, cache_bytes, stream>>>(
        x, k, a.gamma, a.beta, a.bias, y, s, a.mean, a.inv_std, a.M, a.C, xrs, krs, a.eps, pdt);
  else
    skip_layer_norm_kernel<T, false, false, kSkip><<<static_cast<unsigned>(nblocks), block, 0, stream>>>(
        x, k, a.gamma, a.beta, a.bias, y, s, a.mean, a.inv_std, a.M, a.C, xrs, krs, a.eps, pdt);
  return launch_status("skip_layer_norm_cuda");
}

}  // namespace
}  // namespace cuda

Status skip_layer_norm_cuda(const SkipLayerNormArgs& a, cudaStream_t stream) {
  Status st = validate(a);
  if (!st.ok() || a.M == 0) return st;
  return cuda::with_dtype(a.dtype, [&](auto tag) -> Status {
    using T = decltype(tag);
    constexpr int VEC = cuda::Vec<T>::kN;
    const int64_t xrs = a.M == 1 ? a.C : a.x_row_stride;
    const int64_t krs = a.M == 1 || a.skip == nullptr ? a.C : a.skip_row_stride;
    const bool vec = a.C % VEC == 0 && xrs % VEC == 0 && krs % VEC == 0 && cuda::aligned16(a.x) &&
                     cuda::aligned16(a.skip) && cuda::aligned16(a.y) && (a.s == nullptr || cuda::aligned16(a.s));
    if (a.skip == nullptr)
      return vec ? cuda::launch<T, true, false>(a, xrs, krs, stream)
                 : cuda::launch<T, false, false>(a, xrs, krs, stream);
    return vec ? cuda::launch<T, true, true>(a, xrs, krs, stream) : cuda::launch<T, false, true>(a, xrs, krs, stream);
  });
}

}  // namespace sdkern
