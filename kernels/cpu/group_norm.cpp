// group_norm on CPU. PLACEHOLDER: not implemented yet; reports Unsupported so callers fall back.
#include "convert.h"
#include "sdkern/group_norm.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

Status group_norm(const GroupNormArgs& a) {
  (void)a;
  return Status::Unsupported("group_norm: CPU kernel not implemented yet");
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
