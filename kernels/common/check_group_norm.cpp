// Host-side argument validation for GroupNorm / SkipGroupNorm (every implementation calls it).
#include <string>

#include "sdkern/group_norm.h"

namespace sdkern {

Status validate(const GroupNormArgs& a, bool with_skip) {
  SDKERN_CHECK_ARG(a.N >= 0 && a.C > 0 && a.P >= 0, "group_norm: sizes must be N >= 0, C > 0, H*W >= 0");
  SDKERN_CHECK_ARG(a.groups > 0, "group_norm: groups must be positive");
  SDKERN_CHECK_ARG(a.C % a.groups == 0,
                   "group_norm: C=" + std::to_string(a.C) + " is not divisible by groups=" + std::to_string(a.groups));
  SDKERN_CHECK_ARG(a.eps >= 0.0f, "group_norm: eps must be >= 0");
  SDKERN_CHECK_ARG(dtype_valid(static_cast<int>(a.dtype)) && dtype_valid(static_cast<int>(a.param_dtype)) &&
                       dtype_valid(static_cast<int>(a.bias_dtype)),
                   "group_norm: unknown dtype code");
  if (a.N == 0 || a.P == 0) return Status::Ok();
  SDKERN_CHECK_ARG(a.x && a.y && a.gamma && a.beta, "group_norm: x, y, gamma and beta must be non-null");
  SDKERN_CHECK_ARG(a.x_sn >= 0 && a.x_sc >= 0 && a.x_sp >= 0, "group_norm: strides of x must be non-negative");
  if (with_skip) {
    SDKERN_CHECK_ARG(a.skip != nullptr, "skip_group_norm: skip must be non-null");
    SDKERN_CHECK_ARG(a.skip_sn >= 0 && a.skip_sc >= 0 && a.skip_sp >= 0,
                     "skip_group_norm: strides of skip must be non-negative");
  } else {
    SDKERN_CHECK_ARG(a.skip == nullptr && a.bias == nullptr && a.s == nullptr,
                     "group_norm: skip, bias and s must be null (use skip_group_norm)");
  }
  return Status::Ok();
}

}  // namespace sdkern
