// sdkern native core: shared types for every launcher.
// Framework-free: no torch, no ONNX Runtime, no CUDA runtime header.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

// Same definition the CUDA runtime uses, so launchers can name the stream type
// without pulling in cuda_runtime.h.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace sdkern {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // bad sizes / strides / dtypes: a caller bug
  kUnsupported = 2,      // valid request this implementation cannot run (caller may fall back)
  kDeviceError = 3,      // a CUDA (or other device) call failed
  kInternal = 4,
};

// Result of every launcher. Cheap on the success path (empty message).
struct Status {
  StatusCode code = StatusCode::kOk;
  std::string message;

  static Status Ok() { return {}; }
  static Status Invalid(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status Unsupported(std::string m) { return {StatusCode::kUnsupported, std::move(m)}; }
  static Status Device(std::string m) { return {StatusCode::kDeviceError, std::move(m)}; }
  bool ok() const { return code == StatusCode::kOk; }
};

// Element types. The integer values are part of the Python binding ABI (sdkern/ops/_native.py).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline bool dtype_valid(int t) { return t >= 0 && t <= 2; }
inline bool dtype_valid(DType t) { return dtype_valid(static_cast<int>(t)); }

}  // namespace sdkern

// Early-return helper for argument checks inside launchers.
#define SDKERN_CHECK_ARG(cond, msg)                      \
  do {                                                   \
    if (!(cond)) return ::sdkern::Status::Invalid(msg);  \
  } while (0)
