// Python adapter for attention.
#include "binding.h"
#include "sdkern/attention.h"

namespace sdkern {

void bind_attention(py::module_& m) {
  m.def(
      "attention",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, int64_t B, int64_t Sq, int64_t Sk, int64_t H,
         int64_t D, int64_t Dv, int64_t q_sb, int64_t q_ss, int64_t q_sh, int64_t k_sb, int64_t k_ss,
         int64_t k_sh, int64_t v_sb, int64_t v_ss, int64_t v_sh, float scale, bool causal,
         int dtype SDKERN_STREAM_ARG) {
        AttentionArgs a;
        a.q = as_ptr<const void>(q);
        a.k = as_ptr<const void>(k);
        a.v = as_ptr<const void>(v);
        a.o = as_ptr<void>(o);
        a.B = B, a.Sq = Sq, a.Sk = Sk, a.H = H, a.D = D, a.Dv = Dv;
        a.q_sb = q_sb, a.q_ss = q_ss, a.q_sh = q_sh;
        a.k_sb = k_sb, a.k_ss = k_ss, a.k_sh = k_sh;
        a.v_sb = v_sb, a.v_ss = v_ss, a.v_sh = v_sh;
        a.scale = scale;
        a.causal = causal;
        a.dtype = to_dtype(dtype, "q");
        run_released([&] { return SDKERN_LAUNCH(attention, a); });
      },
      "o (B, Sq, H, Dv) = softmax(q k^T * scale) v on (B, S, H, D) strided views; causal: query i sees keys "
      "j <= i + Sk - Sq.");
}

}  // namespace sdkern
