// Python adapter for bias_split_gelu.
#include "binding.h"
#include "sdkern/bias_split_gelu.h"

namespace sdkern {

void bind_bias_split_gelu(py::module_& m) {
  m.def(
      "bias_split_gelu",
      [](uintptr_t x, uintptr_t bias, uintptr_t y, int64_t M, int64_t D, int64_t x_row_stride, int dtype,
         int bias_dtype SDKERN_STREAM_ARG) {
        BiasSplitGeluArgs a;
        a.x = as_ptr<const void>(x);
        a.bias = as_ptr<const void>(bias);
        a.y = as_ptr<void>(y);
        a.M = M, a.D = D, a.x_row_stride = x_row_stride;
        a.dtype = to_dtype(dtype, "x");
        a.bias_dtype = to_dtype(bias_dtype, "bias");
        run_released([&] { return SDKERN_LAUNCH(bias_split_gelu, a); });
      },
      "y (M, D) = (x+b)[:, :D] * gelu_erf((x+b)[:, D:]) for x (M, 2D).");
}

}  // namespace sdkern
