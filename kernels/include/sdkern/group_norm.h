// GroupNorm (+SiLU) and SkipGroupNorm launchers.
//
// Tensors are viewed as (N, C, P) with P = H*W flattened; element (n, c, p) of a tensor lives at
// base[n*sn + c*sc + p*sp]. NHWC (channels-last) is sc = 1, sp = C; NCHW is sc = P, sp = 1.
// y and s use exactly the strides of x.
#pragma once

#include "sdkern/common.h"

namespace sdkern {

struct GroupNormArgs {
  const void* x = nullptr;     // (N, C, P) strided as x_sn/x_sc/x_sp; dtype `dtype`
  const void* skip = nullptr;  // optional (N, C, P) strided as skip_s*; (N, C) broadcast has skip_sp = 0
  const void* bias = nullptr;  // optional [C] contiguous; dtype `bias_dtype`
  const void* gamma = nullptr; // [C] contiguous; dtype `param_dtype`
  const void* beta = nullptr;  // [C] contiguous; dtype `param_dtype`
  void* y = nullptr;           // (N, C, P) output, strides of x; dtype `dtype`
  void* s = nullptr;           // optional (N, C, P) output x + skip + bias, strides of x
  void* workspace = nullptr;   // device scratch of group_norm_workspace_bytes() (CUDA only; CPU ignores)

  int64_t N = 0, C = 0, P = 0, groups = 0;
  float eps = 1e-5f;
  bool silu = false;
  int64_t x_sn = 0, x_sc = 0, x_sp = 0;
  int64_t skip_sn = 0, skip_sc = 0, skip_sp = 0;
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  DType bias_dtype = DType::kFloat32;
};

// Shared argument validation (host side), used by every implementation.
Status validate(const GroupNormArgs& a, bool with_skip);

Status group_norm_cpu(const GroupNormArgs& a);       // skip/bias/s must be null
Status skip_group_norm_cpu(const GroupNormArgs& a);  // skip required; bias optional; s optional

size_t group_norm_workspace_bytes(const GroupNormArgs& a);
Status group_norm_cuda(const GroupNormArgs& a, cudaStream_t stream);
Status skip_group_norm_cuda(const GroupNormArgs& a, cudaStream_t stream);

}  // namespace sdkern
