// GroupNorm (+SiLU) on CPU: y = GroupNorm(x) (+SiLU) over (N, C, P) strided views.
// Two-phase parallel kernel shared with skip_group_norm (group_norm_impl.h): statistics parallel
// over (n, pixel chunk) [NHWC] or (n, c) [NCHW], merged per (n, group) with the Chan combine, then
// one normalise(+SiLU) write pass.
#include "group_norm_impl.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

Status group_norm(const GroupNormArgs& a) {
  return with_dtype(a.dtype, [&](auto tag) { return gn::run<decltype(tag)>(a, /*with_skip=*/false); });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
