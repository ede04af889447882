// Host-side argument validation for winograd_input (every implementation calls it).
#include "sdkern/winograd.h"

namespace sdkern {

Status validate(const WinogradInputArgs& a) {
  SDKERN_CHECK_ARG(a.N >= 0 && a.C > 0 && a.H >= 0 && a.W >= 0,
                   "winograd_input: sizes must be N >= 0, C > 0, H >= 0, W >= 0");
  SDKERN_CHECK_ARG(dtype_valid(a.dtype), "winograd_input: unknown dtype code");
  if (a.dtype != DType::kFloat32)
    return Status::Unsupported(std::string("winograd_input: float32 only, got ") + dtype_name(a.dtype));
  if (winograd_tiles(a.N, a.H, a.W) == 0) return Status::Ok();
  SDKERN_CHECK_ARG(a.x && a.v, "winograd_input: x and v must be non-null");
  SDKERN_CHECK_ARG(a.C == 1 || a.x_sc == 1,
                   "winograd_input: x must be channels-last (channel stride 1, got " + std::to_string(a.x_sc) +
                       "); convert with .contiguous(memory_format=torch.channels_last)");
  SDKERN_CHECK_ARG(a.x_sn >= 0 && a.x_sh >= 0 && a.x_sw >= 0, "winograd_input: strides of x must be non-negative");
  return Status::Ok();
}

}  // namespace sdkern
