// SkipGroupNorm on CPU: s = x + skip + bias (fp32), written in x's dtype when requested;
// y = GroupNorm(s) (+SiLU) computed from the fp32 sum. skip is (N, C, P) strided or broadcast
// (N, C) (skip_sp = 0). Shares the two-phase kernel of group_norm (group_norm_impl.h).
#include "group_norm_impl.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

Status skip_group_norm(const GroupNormArgs& a) {
  return with_dtype(a.dtype, [&](auto tag) { return gn::run<decltype(tag)>(a, /*with_skip=*/true); });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
