// Shared plumbing of libsdkern_ort: the OrtCustomOp adapter every op derives from, tensor views
// over kernel-context inputs/outputs, attribute readers and status conversion.
//
// Everything talks to ONNX Runtime through the plain C API (version 21); no exception ever crosses
// the C boundary: kernel creation and compute return an OrtStatus* (nullptr = success).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"
#include "sdkern/common.h"

namespace sdkern {
struct GroupNormArgs;
}

namespace sdkern_ort {

// The OrtApi table requested by RegisterCustomOps (set before any op is created).
const OrtApi& api();
void set_api(const OrtApi* api);

enum class Ep { kCpu, kCuda };

// Error status with `message`; ORT takes ownership.
OrtStatus* error(const std::string& message, OrtErrorCode code = ORT_INVALID_ARGUMENT);
// nullptr when `st` is ok, else an ORT error naming the op.
OrtStatus* from_status(const sdkern::Status& st, const char* op);

#define SDKERN_ORT_TRY(expr)                  \
  do {                                        \
    if (OrtStatus* _st = (expr)) return _st;  \
  } while (0)

// "[2, 3, 4]"
std::string shape_str(const std::vector<int64_t>& shape);
// float / float16 / bfloat16 -> sdkern dtype; false for anything else.
bool to_dtype(ONNXTensorElementDataType t, sdkern::DType* out);
const char* type_name(ONNXTensorElementDataType t);
size_t elem_size(sdkern::DType t);
int64_t numel(const std::vector<int64_t>& shape);

// View of one input or output tensor. `data` is null when an optional one is absent / not requested.
struct TensorView {
  void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  sdkern::DType dtype = sdkern::DType::kFloat32;  // valid when `type` is float/float16/bfloat16
  std::vector<int64_t> shape;
  const OrtValue* value = nullptr;
  bool present() const { return data != nullptr || value != nullptr; }
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : static_cast<size_t>(i)]; }
  size_t rank() const { return shape.size(); }
};

// Input `index` ("name" in messages). Required inputs that are absent give an error; optional ones
// leave `out` not present. Only float/float16/bfloat16 tensors are accepted.
OrtStatus* input(OrtKernelContext* ctx, size_t index, const char* op, const char* name, bool required,
                 TensorView* out);
// Output `index` allocated with `shape` and `type`; not present when the node does not request it.
OrtStatus* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape, TensorView* out);

// Attributes: `def` == nullptr makes the attribute required.
OrtStatus* attr_int(const OrtKernelInfo* info, const char* op, const char* name, const int64_t* def, int64_t* out);
OrtStatus* attr_float(const OrtKernelInfo* info, const char* op, const char* name, const float* def, float* out);

// Checks that a parameter vector (gamma/beta/bias) is 1-D of length `c` with type float or `x_type`.
OrtStatus* check_param(const TensorView& p, const char* op, const char* name, int64_t c,
                       ONNXTensorElementDataType x_type);

// One op kernel instance (attributes read at creation); compute() may run concurrently.
class Kernel {
 public:
  virtual ~Kernel() = default;
  virtual OrtStatus* compute(OrtKernelContext* ctx) = 0;
};

// Input/output type: the op's element type T, always float, or any (checked at run time).
enum class IoType { kT, kFloat, kAny };
struct IoSpec {
  IoType type;
  bool optional;
};

using KernelFactory = OrtStatus* (*)(const OrtKernelInfo* info, Ep ep, std::unique_ptr<Kernel>* out);

// An OrtCustomOp for one (name, execution provider, element type T). ORT merges ops of the same name
// into one schema, so every op is registered once per supported T.
struct OpDef : OrtCustomOp {
  OpDef(const char* name, Ep ep, ONNXTensorElementDataType t, std::vector<IoSpec> inputs, std::vector<IoSpec> outputs,
        KernelFactory factory);
  const char* name_;
  Ep ep_;
  ONNXTensorElementDataType t_;
  std::vector<IoSpec> inputs_, outputs_;
  KernelFactory factory_;
};

using OpList = std::vector<std::unique_ptr<OpDef>>;

// Appends one OpDef per supported element type (and per EP built).
void add_op(OpList& ops, const char* name, std::vector<IoSpec> inputs, std::vector<IoSpec> outputs,
            KernelFactory factory);

// GroupNorm / SkipGroupNorm attributes and the (N, C, P) view of X (group_norm.cpp).
struct GroupNormAttrs {
  float eps = 1e-5f;
  int64_t groups = 0;
  bool silu = false;
  bool channels_last = true;
};
OrtStatus* read_group_norm_attrs(const OrtKernelInfo* info, const char* op, GroupNormAttrs* out);
// Checks X (rank 4, C % groups) and fills N, C, P and X's strides of `a`.
struct GroupNormShape {
  int64_t N = 0, C = 0, P = 0, sn = 0, sc = 0, sp = 0;
};
OrtStatus* group_norm_shape(const TensorView& x, const GroupNormAttrs& at, const char* op, GroupNormShape* out);

// One registration function per op file.
void register_group_norm(OpList& ops);
void register_skip_group_norm(OpList& ops);
void register_bias_split_gelu(OpList& ops);
void register_bias_add(OpList& ops);
void register_skip_layer_norm(OpList& ops);
void register_multi_head_attention(OpList& ops);

#ifdef SDKERN_ORT_WITH_CUDA
// Stream of the kernel context (CUDA EP).
OrtStatus* cuda_stream(OrtKernelContext* ctx, cudaStream_t* out);
// Launch (skip_)group_norm_cuda with a scratch workspace taken from the EP's stream-ordered
// allocator for X's memory and returned right after the launch (group_norm.cpp).
OrtStatus* run_group_norm_cuda(OrtKernelContext* ctx, const TensorView& x, sdkern::GroupNormArgs& a, bool skip,
                               const char* op);
#endif

}  // namespace sdkern_ort
