// Python adapter for skip_layer_norm.
#include "binding.h"
#include "sdkern/skip_layer_norm.h"

#if defined(SDKERN_BIND_CUDA)
#define SDKERN_SLN_STREAM_NAME , py::arg("stream")
#else
#define SDKERN_SLN_STREAM_NAME
#endif

namespace sdkern {

void bind_skip_layer_norm(py::module_& m) {
  m.def(
      "skip_layer_norm",
      [](uintptr_t x, uintptr_t skip, uintptr_t gamma, uintptr_t beta, uintptr_t bias, uintptr_t y, uintptr_t s,
         int64_t M, int64_t C, int64_t x_row_stride, int64_t skip_row_stride, float eps, int dtype,
         int param_dtype SDKERN_STREAM_ARG, uintptr_t mean, uintptr_t inv_std) {
        SkipLayerNormArgs a;
        a.x = as_ptr<const void>(x);
        a.skip = as_ptr<const void>(skip);
        a.gamma = as_ptr<const void>(gamma);
        a.beta = as_ptr<const void>(beta);
        a.bias = as_ptr<const void>(bias);
        a.y = as_ptr<void>(y);
        a.s = as_ptr<void>(s);
        a.mean = as_ptr<float>(mean);
        a.inv_std = as_ptr<float>(inv_std);
        a.M = M, a.C = C, a.x_row_stride = x_row_stride, a.skip_row_stride = skip_row_stride, a.eps = eps;
        a.dtype = to_dtype(dtype, "x");
        a.param_dtype = to_dtype(param_dtype, "gamma/beta/bias");
        run_released([&] { return SDKERN_LAUNCH(skip_layer_norm, a); });
      },
      py::arg("x"), py::arg("skip"), py::arg("gamma"), py::arg("beta"), py::arg("bias"), py::arg("y"), py::arg("s"),
      py::arg("M"), py::arg("C"), py::arg("x_row_stride"), py::arg("skip_row_stride"), py::arg("eps"),
      py::arg("dtype"), py::arg("param_dtype") SDKERN_SLN_STREAM_NAME, py::arg("mean") = 0, py::arg("inv_std") = 0,
      "s = x + skip (+bias); y = LayerNorm(s) * gamma (+beta) over rows of C. Optional fp32 [M] outputs "
      "mean and inv_std (0 = not written); beta, bias and s may be 0 too.");
}

}  // namespace sdkern
