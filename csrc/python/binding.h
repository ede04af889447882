// Shared helpers for the pybind11 adapters. The same binding sources build two modules:
//   sdkern._C      (CPU launchers)                      SDKERN_BIND_CUDA undefined
//   sdkern._C_cuda (CUDA launchers, + workspace/stream)  SDKERN_BIND_CUDA = 1
// Pointers travel as Python ints (tensor.data_ptr()); dtypes as the DType codes of common.h.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "sdkern/common.h"

namespace sdkern {
namespace py = pybind11;

// Status -> Python exception: ValueError (invalid argument), NotImplementedError (unsupported:
// the Python dispatcher falls back), RuntimeError (device / internal error).
// Messages get the "sdkern." prefix of every sdkern error ("sdkern.attention: ...").
inline void raise_if_error(const Status& st) {
  if (st.code == StatusCode::kOk) return;
  const std::string msg = st.message.rfind("sdkern.", 0) == 0 ? st.message : "sdkern." + st.message;
  switch (st.code) {
    case StatusCode::kInvalidArgument: throw py::value_error(msg);
    case StatusCode::kUnsupported:
      PyErr_SetString(PyExc_NotImplementedError, msg.c_str());
      throw py::error_already_set();
    default: throw std::runtime_error(msg);
  }
}

inline DType to_dtype(int code, const char* what) {
  if (!dtype_valid(code)) throw py::value_error(std::string("invalid dtype code for ") + what + ": " + std::to_string(code));
  return static_cast<DType>(code);
}

template <typename T>
inline T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Run a launcher with the GIL released; translate its status.
template <typename F>
inline void run_released(F&& f) {
  Status st;
  {
    py::gil_scoped_release release;
    st = f();
  }
  raise_if_error(st);
}

void bind_group_norm(py::module_& m);
void bind_skip_group_norm(py::module_& m);
void bind_bias_split_gelu(py::module_& m);
void bind_skip_layer_norm(py::module_& m);
void bind_bias_add(py::module_& m);
void bind_attention(py::module_& m);
void bind_winograd_input(py::module_& m);   // CPU module only
void bind_winograd_output(py::module_& m);  // CPU module only

}  // namespace sdkern

#if defined(SDKERN_BIND_CUDA)
#define SDKERN_STREAM_ARG , uintptr_t stream
#define SDKERN_WS_STREAM_ARGS , uintptr_t workspace, uintptr_t stream
#define SDKERN_LAUNCH(op, args) op##_cuda(args, reinterpret_cast<cudaStream_t>(stream))
#else
#define SDKERN_STREAM_ARG
#define SDKERN_WS_STREAM_ARGS
#define SDKERN_LAUNCH(op, args) op##_cpu(args)
#endif
