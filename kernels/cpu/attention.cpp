// attention on CPU. PLACEHOLDER: not implemented yet; reports Unsupported so callers fall back.
#include "convert.h"
#include "sdkern/attention.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

Status attention(const AttentionArgs& a) {
  (void)a;
  return Status::Unsupported("attention: CPU kernel not implemented yet");
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
