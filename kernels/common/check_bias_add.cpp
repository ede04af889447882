// Host-side argument validation for bias_add (every implementation calls it).
#include "sdkern/bias_add.h"

namespace sdkern {

Status validate(const BiasAddArgs& a) {
  SDKERN_CHECK_ARG(a.M >= 0 && a.C > 0, "bias_add: sizes must be M >= 0, C > 0");
  SDKERN_CHECK_ARG(dtype_valid(a.dtype) && dtype_valid(a.bias_dtype), "bias_add: unknown dtype code");
  if (a.M == 0) return Status::Ok();
  SDKERN_CHECK_ARG(a.x && a.bias && a.skip && a.y, "bias_add: x, bias, skip and y must be non-null");
  SDKERN_CHECK_ARG(a.M == 1 || (a.x_row_stride >= a.C && a.skip_row_stride >= a.C),
                   "bias_add: row strides must be >= C");
  return Status::Ok();
}

}  // namespace sdkern
