// Shared device helpers for the sdkern CUDA kernels: storage types, fp32 conversion, 16-byte vector
// access, runtime-dtype parameter loads, reductions and launch-status checks.
// Kernels compute in fp32 and store in the input dtype. Nothing here allocates or synchronises.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "sdkern/common.h"
#include "sdkern/math.h"

namespace sdkern {
namespace cuda {

// ---- storage type <-> fp32 ----
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int kN = 16 / sizeof(T);
};

// 16-byte aligned register array of kN elements.
template <typename T>
struct alignas(16) Pack {
  T v[Vec<T>::kN];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {  // p: 16-byte aligned
  Pack<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& r) {  // p: 16-byte aligned
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

// Load element i of a small parameter vector whose dtype is only known at run time (gamma, beta,
// bias may be fp32 while activations are fp16/bf16). The branch is uniform across the grid.
__device__ __forceinline__ float load_param(const void* p, int dtype, int64_t i) {
  if (dtype == static_cast<int>(DType::kFloat32)) return __ldg(static_cast<const float*>(p) + i);
  if (dtype == static_cast<int>(DType::kFloat16)) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// ---- reductions ----
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `scratch` holds >= 33 floats of shared memory; it may be reused after the call returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? scratch[lane] : 0.0f;
  t = warp_sum(t);
  return t;
}

// ---- host helpers ----
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A GPU whose architecture this build has no code for (no cubin for its SM, no PTX it can JIT: a T4
// or V100 with SDKERN_CUDA_ARCHS=80;90) is "unsupported", not a device error: the caller falls back
// (Triton, then the PyTorch reference) with this reason. Both errors are non-sticky.
inline Status arch_unsupported(const char* what) {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) {
    (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  }
  return Status::Unsupported(std::string(what) + ": no kernel image for this GPU (sm_" + std::to_string(major) +
                             std::to_string(minor) + "); rebuild with SDKERN_CUDA_ARCHS including it");
}

inline Status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction) return arch_unsupported(what);
  return Status::Device(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

// Status of the launch just made on this thread (launch-configuration errors and sticky errors).
inline Status launch_status(const char* what) { return cuda_status(cudaGetLastError(), what); }

// Calls f.template operator()<T>() with T the storage type of `dtype`.
template <typename F>
inline Status with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return Status::Invalid("unknown dtype");
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace cuda
}  // namespace sdkern
