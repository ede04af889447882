// Host-side argument validation for bias_split_gelu (every implementation calls it).
#include "sdkern/bias_split_gelu.h"

namespace sdkern {

Status validate(const BiasSplitGeluArgs& a) {
  SDKERN_CHECK_ARG(a.M >= 0 && a.D > 0, "bias_split_gelu: sizes must be M >= 0, D > 0");
  SDKERN_CHECK_ARG(dtype_valid(a.dtype) && dtype_valid(a.bias_dtype), "bias_split_gelu: unknown dtype code");
  if (a.M == 0) return Status::Ok();
  SDKERN_CHECK_ARG(a.x && a.bias && a.y, "bias_split_gelu: x, bias and y must be non-null");
  SDKERN_CHECK_ARG(a.M == 1 || a.x_row_stride >= 2 * a.D, "bias_split_gelu: x row stride must be >= 2*D");
  return Status::Ok();
}

}  // namespace sdkern
