// Host-side argument validation for skip_layer_norm (every implementation calls it).
#include "sdkern/skip_layer_norm.h"

namespace sdkern {

Status validate(const SkipLayerNormArgs& a) {
  SDKERN_CHECK_ARG(a.M >= 0 && a.C > 0, "skip_layer_norm: sizes must be M >= 0, C > 0");
  SDKERN_CHECK_ARG(a.eps >= 0.0f, "skip_layer_norm: eps must be >= 0");
  SDKERN_CHECK_ARG(dtype_valid(a.dtype) && dtype_valid(a.param_dtype), "skip_layer_norm: unknown dtype code");
  if (a.M == 0) return Status::Ok();
  SDKERN_CHECK_ARG(a.x && a.gamma && a.y, "skip_layer_norm: x, gamma and y must be non-null");
  SDKERN_CHECK_ARG(a.M == 1 || (a.x_row_stride >= a.C && (!a.skip || a.skip_row_stride >= a.C)),
                   "skip_layer_norm: row strides must be >= C");
  return Status::Ok();
}

}  // namespace sdkern
