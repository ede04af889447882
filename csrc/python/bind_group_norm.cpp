// Python adapter for group_norm: pointers and sizes in, exception on error status.
#include "binding.h"
#include "sdkern/group_norm.h"

namespace sdkern {

void bind_group_norm(py::module_& m) {
  m.def(
      "group_norm",
      [](uintptr_t x, uintptr_t gamma, uintptr_t beta, uintptr_t y, int64_t N, int64_t C, int64_t P,
         int64_t groups, float eps, bool silu, int64_t x_sn, int64_t x_sc, int64_t x_sp, int dtype,
         int param_dtype SDKERN_WS_STREAM_ARGS) {
        GroupNormArgs a;
        a.x = as_ptr<const void>(x);
        a.gamma = as_ptr<const void>(gamma);
        a.beta = as_ptr<const void>(beta);
        a.y = as_ptr<void>(y);
        a.N = N, a.C = C, a.P = P, a.groups = groups, a.eps = eps, a.silu = silu;
        a.x_sn = x_sn, a.x_sc = x_sc, a.x_sp = x_sp;
        a.dtype = to_dtype(dtype, "x");
        a.param_dtype = to_dtype(param_dtype, "gamma/beta");
#if defined(SDKERN_BIND_CUDA)
        a.workspace = as_ptr<void>(workspace);
#endif
        run_released([&] { return SDKERN_LAUNCH(group_norm, a); });
      },
      "GroupNorm(+SiLU) over (N, C, P) strided tensors; y uses x's strides.");
#if defined(SDKERN_BIND_CUDA)
  m.def(
      "group_norm_workspace_bytes",
      [](int64_t N, int64_t C, int64_t P, int64_t groups) {
        GroupNormArgs a;
        a.N = N, a.C = C, a.P = P, a.groups = groups;
        return group_norm_workspace_bytes(a);
      },
      "Device scratch bytes the CUDA group norms need for these sizes.");
#endif
}

}  // namespace sdkern
