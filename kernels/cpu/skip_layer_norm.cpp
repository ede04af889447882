// skip_layer_norm on CPU. PLACEHOLDER: not implemented yet; reports Unsupported so callers fall back.
#include "convert.h"
#include "sdkern/skip_layer_norm.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {

Status skip_layer_norm(const SkipLayerNormArgs& a) {
  (void)a;
  return Status::Unsupported("skip_layer_norm: CPU kernel not implemented yet");
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
