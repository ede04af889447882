// sdkern._C (CPU kernels) and, compiled with SDKERN_BIND_CUDA, sdkern._C_cuda (CUDA kernels).
#include <pybind11/stl.h>

#include <string>

#include "binding.h"

#if !defined(SDKERN_BIND_CUDA)
#include "../../kernels/cpu/isa.h"
#endif

#ifndef SDKERN_MODULE_NAME
#define SDKERN_MODULE_NAME _C
#endif
#ifndef SDKERN_CUDA_ARCHS_STR
#define SDKERN_CUDA_ARCHS_STR ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(SDKERN_MODULE_NAME, m) {
  m.doc() = "sdkern native launchers (pointer-based; use sdkern.ops instead)";
  sdkern::bind_group_norm(m);
  sdkern::bind_skip_group_norm(m);
  sdkern::bind_bias_split_gelu(m);
  sdkern::bind_skip_layer_norm(m);
  sdkern::bind_bias_add(m);
  sdkern::bind_attention(m);
#if !defined(SDKERN_BIND_CUDA)
  sdkern::bind_winograd_input(m);
  sdkern::bind_winograd_output(m);
#endif

#if defined(SDKERN_BIND_CUDA)
  m.def("build_info", [] {
    py::dict d;
    d["built"] = true;
    d["archs"] = std::string(SDKERN_CUDA_ARCHS_STR);
    return d;
  });
#else
  using sdkern::cpu::Isa;
  m.def("build_info", [] {
    py::dict d;
    py::list built;
    for (int i = 0; i <= 3; ++i)
      if (sdkern::cpu::isa_built(static_cast<Isa>(i))) built.append(sdkern::cpu::isa_name(static_cast<Isa>(i)));
    d["built"] = true;
    d["isa_built"] = built;
    d["isa_best"] = sdkern::cpu::isa_name(sdkern::cpu::best_isa_supported());
    d["isa_active"] = sdkern::cpu::isa_name(sdkern::cpu::active_isa());
#if defined(_OPENMP)
    d["openmp"] = _OPENMP;
#else
    d["openmp"] = false;
#endif
    return d;
  });
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        for (int i = 0; i <= 3; ++i) {
          auto isa = static_cast<Isa>(i);
          if (name == sdkern::cpu::isa_name(isa)) return sdkern::cpu::set_active_isa(isa);
        }
        throw py::value_error("unknown ISA level: " + name);
      },
      "Force an ISA level (baseline, avx2, avx512, avx512bf16); False if not built or unsupported here.");
  m.def("cpu_isa", [] { return std::string(sdkern::cpu::isa_name(sdkern::cpu::active_isa())); });
#endif
}
