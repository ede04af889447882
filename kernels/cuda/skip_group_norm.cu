// SkipGroupNorm on CUDA: s = x + skip (+ bias); y = GroupNorm(s) (+SiLU); s written when non-null.
// Kernels: group_norm_impl.cuh (instantiated here with skip).
#include "group_norm_impl.cuh"

namespace sdkern {

Status skip_group_norm_cuda(const GroupNormArgs& a, cudaStream_t stream) { return cuda::gn::launch<true>(a, stream); }

}  // namespace sdkern
