// GroupNorm(+SiLU) on CUDA and the workspace size shared with SkipGroupNorm.
// Kernels: group_norm_impl.cuh (instantiated here without skip).
#include "group_norm_impl.cuh"

namespace sdkern {

size_t group_norm_workspace_bytes(const GroupNormArgs& a) {
  return cuda::gn::workspace_floats(a.N, a.C, a.P, a.groups) * sizeof(float);
}

Status group_norm_cuda(const GroupNormArgs& a, cudaStream_t stream) { return cuda::gn::launch<false>(a, stream); }

}  // namespace sdkern
