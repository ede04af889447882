// Python adapter for bias_add.
#include "binding.h"
#include "sdkern/bias_add.h"

namespace sdkern {

void bind_bias_add(py::module_& m) {
  m.def(
      "bias_add",
      [](uintptr_t x, uintptr_t bias, uintptr_t skip, uintptr_t y, int64_t M, int64_t C, int64_t x_row_stride,
         int64_t skip_row_stride, int dtype, int bias_dtype SDKERN_STREAM_ARG) {
        BiasAddArgs a;
        a.x = as_ptr<const void>(x);
        a.bias = as_ptr<const void>(bias);
        a.skip = as_ptr<const void>(skip);
        a.y = as_ptr<void>(y);
        a.M = M, a.C = C, a.x_row_stride = x_row_stride, a.skip_row_stride = skip_row_stride;
        a.dtype = to_dtype(dtype, "x");
        a.bias_dtype = to_dtype(bias_dtype, "bias");
        run_released([&] { return SDKERN_LAUNCH(bias_add, a); });
      },
      "y = x + bias + skip over (M, C) rows.");
}

}  // namespace sdkern
