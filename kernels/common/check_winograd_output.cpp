// Host-side argument validation for winograd_output (every implementation calls it).
#include "sdkern/winograd.h"

namespace sdkern {

Status validate(const WinogradOutputArgs& a) {
  SDKERN_CHECK_ARG(a.N >= 0 && a.K > 0 && a.H >= 0 && a.W >= 0,
                   "winograd_output: sizes must be N >= 0, K > 0, H >= 0, W >= 0");
  SDKERN_CHECK_ARG(dtype_valid(a.dtype), "winograd_output: unknown dtype code");
  if (a.dtype != DType::kFloat32)
    return Status::Unsupported(std::string("winograd_output: float32 only, got ") + dtype_name(a.dtype));
  if (winograd_tiles(a.N, a.H, a.W) == 0) return Status::Ok();
  SDKERN_CHECK_ARG(a.m && a.y, "winograd_output: m and y must be non-null");
  if (a.other != nullptr) {
    SDKERN_CHECK_ARG(a.K == 1 || a.o_sc == 1,
                     "winograd_output: other must be channels-last (channel stride 1, got " + std::to_string(a.o_sc) +
                         "); convert with .contiguous(memory_format=torch.channels_last)");
    SDKERN_CHECK_ARG(a.o_sn >= 0 && a.o_sh >= 0 && a.o_sw >= 0,
                     "winograd_output: strides of other must be non-negative");
  }
  return Status::Ok();
}

}  // namespace sdkern
