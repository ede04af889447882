// Python adapter for winograd_input (CPU only: sdkern._C; the CUDA module has no Winograd).
#include "binding.h"
#include "sdkern/winograd.h"

namespace sdkern {

#if !defined(SDKERN_BIND_CUDA)
void bind_winograd_input(py::module_& m) {
  m.def(
      "winograd_input",
      [](uintptr_t x, uintptr_t v, int64_t N, int64_t C, int64_t H, int64_t W, int64_t x_sn, int64_t x_sc,
         int64_t x_sh, int64_t x_sw, int dtype) {
        WinogradInputArgs a;
        a.x = as_ptr<const void>(x);  // (N, C, H, W) float32, channel stride x_sc = 1 (channels-last)
        a.v = as_ptr<void>(v);        // (16, T, C) float32 contiguous, T = N*ceil(H/2)*ceil(W/2), preallocated
        a.N = N, a.C = C, a.H = H, a.W = W;
        a.x_sn = x_sn, a.x_sc = x_sc, a.x_sh = x_sh, a.x_sw = x_sw;
        a.dtype = to_dtype(dtype, "x");
        run_released([&] { return winograd_input_cpu(a); });
      },
      py::arg("x"), py::arg("v"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("x_sn"),
      py::arg("x_sc"), py::arg("x_sh"), py::arg("x_sw"), py::arg("dtype"),
      "Winograd F(2x2,3x3) input transform: V[4a+b][t] = (Bt d_t B)[a][b] over the 4x4 tiles of x zero-padded by 1.");
}
#endif

}  // namespace sdkern
