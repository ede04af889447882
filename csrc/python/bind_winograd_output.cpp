// Python adapter for winograd_output (CPU only: sdkern._C; the CUDA module has no Winograd).
#include "binding.h"
#include "sdkern/winograd.h"

namespace sdkern {

#if !defined(SDKERN_BIND_CUDA)
void bind_winograd_output(py::module_& m) {
  m.def(
      "winograd_output",
      [](uintptr_t mm, uintptr_t bias, uintptr_t other, uintptr_t y, int64_t N, int64_t K, int64_t H, int64_t W,
         int64_t o_sn, int64_t o_sc, int64_t o_sh, int64_t o_sw, int dtype) {
        WinogradOutputArgs a;
        a.m = as_ptr<const void>(mm);        // (16, T, K) float32 contiguous: the batched GEMM's output
        a.bias = as_ptr<const void>(bias);   // [K] float32 contiguous, or 0
        a.other = as_ptr<const void>(other); // (N, K, H, W) float32 residual, channel stride o_sc = 1, or 0
        a.y = as_ptr<void>(y);               // (N, K, H, W) float32 channels-last contiguous, preallocated
        a.N = N, a.K = K, a.H = H, a.W = W;
        a.o_sn = o_sn, a.o_sc = o_sc, a.o_sh = o_sh, a.o_sw = o_sw;
        a.dtype = to_dtype(dtype, "m");
        run_released([&] { return winograd_output_cpu(a); });
      },
      py::arg("m"), py::arg("bias"), py::arg("other"), py::arg("y"), py::arg("N"), py::arg("K"), py::arg("H"),
      py::arg("W"), py::arg("o_sn"), py::arg("o_sc"), py::arg("o_sh"), py::arg("o_sw"), py::arg("dtype"),
      "Winograd F(2x2,3x3) output transform: y tile t = At M_t A (+ bias) (+ other), y channels-last.");
}
#endif

}  // namespace sdkern
