// bias_split_gelu on CPU. PLACEHOLDER: not implemented yet; reports Unsupported so callers fall back.
#include "convert.h"
#include "sdkern/bias_split_gelu.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

Status bias_split_gelu(const BiasSplitGeluArgs& a) {
  (void)a;
  return Status::Unsupported("bias_split_gelu: CPU kernel not implemented yet");
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
