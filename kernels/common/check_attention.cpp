// Host-side argument validation for attention (every implementation calls it).
#include "sdkern/attention.h"

namespace sdkern {

Status validate(const AttentionArgs& a) {
  SDKERN_CHECK_ARG(a.B >= 0 && a.Sq >= 0 && a.H >= 0, "attention: sizes must be non-negative");
  SDKERN_CHECK_ARG(a.Sk > 0 && a.D > 0 && a.Dv > 0, "attention: Sk, D and Dv must be positive");
  SDKERN_CHECK_ARG(dtype_valid(static_cast<int>(a.dtype)), "attention: unknown dtype code");
  SDKERN_CHECK_ARG(!a.causal || a.Sq <= a.Sk,
                   "attention: causal attention needs Sq <= Sk (query i sees keys j <= i + Sk - Sq)");
  if (a.B == 0 || a.Sq == 0 || a.H == 0) return Status::Ok();
  SDKERN_CHECK_ARG(a.q && a.k && a.v && a.o, "attention: q, k, v and o must be non-null");
  SDKERN_CHECK_ARG(a.q_sb >= 0 && a.q_ss >= 0 && a.q_sh >= 0 && a.k_sb >= 0 && a.k_ss >= 0 && a.k_sh >= 0 &&
                       a.v_sb >= 0 && a.v_ss >= 0 && a.v_sh >= 0,
                   "attention: strides must be non-negative");
  return Status::Ok();
}

}  // namespace sdkern
