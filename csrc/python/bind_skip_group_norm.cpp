// Python adapter for skip_group_norm.
#include "binding.h"
#include "sdkern/group_norm.h"

namespace sdkern {

void bind_skip_group_norm(py::module_& m) {
  m.def(
      "skip_group_norm",
      [](uintptr_t x, uintptr_t skip, uintptr_t bias, uintptr_t gamma, uintptr_t beta, uintptr_t y,
         uintptr_t s, int64_t N, int64_t C, int64_t P, int64_t groups, float eps, bool silu, int64_t x_sn,
         int64_t x_sc, int64_t x_sp, int64_t skip_sn, int64_t skip_sc, int64_t skip_sp, int dtype,
         int param_dtype, int bias_dtype SDKERN_WS_STREAM_ARGS) {
        GroupNormArgs a;
        a.x = as_ptr<const void>(x);
        a.skip = as_ptr<const void>(skip);
        a.bias = as_ptr<const void>(bias);
        a.gamma = as_ptr<const void>(gamma);
        a.beta = as_ptr<const void>(beta);
        a.y = as_ptr<void>(y);
        a.s = as_ptr<void>(s);
        a.N = N, a.C = C, a.P = P, a.groups = groups, a.eps = eps, a.silu = silu;
        a.x_sn = x_sn, a.x_sc = x_sc, a.x_sp = x_sp;
        a.skip_sn = skip_sn, a.skip_sc = skip_sc, a.skip_sp = skip_sp;
        a.dtype = to_dtype(dtype, "x");
        a.param_dtype = to_dtype(param_dtype, "gamma/beta");
        a.bias_dtype = to_dtype(bias_dtype, "bias");
#if defined(SDKERN_BIND_CUDA)
        a.workspace = as_ptr<void>(workspace);
#endif
        run_released([&] { return SDKERN_LAUNCH(skip_group_norm, a); });
      },
      "s = x + skip + bias; y = GroupNorm(s)(+SiLU). skip_sp = 0 broadcasts (N, C) over P.");
}

}  // namespace sdkern
