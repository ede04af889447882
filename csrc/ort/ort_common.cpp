// Shared plumbing of libsdkern_ort (see ort_common.h).
#include "ort_common.h"

#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <sstream>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

#include "sdkern/host_pool.h"

namespace sdkern_ort {

namespace {
// Written by every RegisterCustomOps call (always the same table within one runtime), read by the ops.
std::atomic<const OrtApi*> g_api{nullptr};

// RAII release of an OrtTensorTypeAndShapeInfo.
struct InfoGuard {
  OrtTensorTypeAndShapeInfo* p = nullptr;
  ~InfoGuard() {
    if (p) api().ReleaseTensorTypeAndShapeInfo(p);
  }
};
}  // namespace

const OrtApi& api() { return *g_api.load(std::memory_order_acquire); }
void set_api(const OrtApi* a) { g_api.store(a, std::memory_order_release); }

OrtStatus* error(const std::string& message, OrtErrorCode code) { return api().CreateStatus(code, message.c_str()); }

OrtStatus* from_status(const sdkern::Status& st, const char* op) {
  if (st.ok()) return nullptr;
  std::string msg = std::string("sdkern.") + op + ": " + st.message;
  switch (st.code) {
    case sdkern::StatusCode::kInvalidArgument: return error(msg, ORT_INVALID_ARGUMENT);
    case sdkern::StatusCode::kUnsupported: return error(msg + " (not supported by this build)", ORT_NOT_IMPLEMENTED);
    default: return error(msg, ORT_FAIL);
  }
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

bool to_dtype(ONNXTensorElementDataType t, sdkern::DType* out) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: *out = sdkern::DType::kFloat32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: *out = sdkern::DType::kFloat16; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: *out = sdkern::DType::kBFloat16; return true;
    default: return false;
  }
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "unsupported type";
  }
}

size_t elem_size(sdkern::DType t) { return t == sdkern::DType::kFloat32 ? 4 : 2; }

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

OrtStatus* input(OrtKernelContext* ctx, size_t index, const char* op, const char* name, bool required,
                 TensorView* out) {
  *out = TensorView{};
  size_t count = 0;
  SDKERN_ORT_TRY(api().KernelContext_GetInputCount(ctx, &count));
  const OrtValue* v = nullptr;
  if (index < count) SDKERN_ORT_TRY(api().KernelContext_GetInput(ctx, index, &v));
  if (v == nullptr) {
    if (required) return error(std::string("sdkern.") + op + ": required input '" + name + "' is missing");
    return nullptr;
  }
  InfoGuard info;
  SDKERN_ORT_TRY(api().GetTensorTypeAndShape(v, &info.p));
  SDKERN_ORT_TRY(api().GetTensorElementType(info.p, &out->type));
  size_t rank = 0;
  SDKERN_ORT_TRY(api().GetDimensionsCount(info.p, &rank));
  out->shape.resize(rank);
  if (rank) SDKERN_ORT_TRY(api().GetDimensions(info.p, out->shape.data(), rank));
  if (!to_dtype(out->type, &out->dtype))
    return error(std::string("sdkern.") + op + ": input '" + name + "' has type " + type_name(out->type) +
                 "; expected float, float16 or bfloat16");
  SDKERN_ORT_TRY(api().GetTensorMutableData(const_cast<OrtValue*>(v), &out->data));
  out->value = v;
  return nullptr;
}

OrtStatus* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape, TensorView* out) {
  *out = TensorView{};
  size_t count = 0;
  SDKERN_ORT_TRY(api().KernelContext_GetOutputCount(ctx, &count));
  if (index >= count) return nullptr;
  OrtValue* v = nullptr;
  SDKERN_ORT_TRY(api().KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &v));
  if (v == nullptr) return nullptr;
  InfoGuard info;
  SDKERN_ORT_TRY(api().GetTensorTypeAndShape(v, &info.p));
  SDKERN_ORT_TRY(api().GetTensorElementType(info.p, &out->type));
  to_dtype(out->type, &out->dtype);
  out->shape = shape;
  SDKERN_ORT_TRY(api().GetTensorMutableData(v, &out->data));
  out->value = v;
  return nullptr;
}

// The type of attribute `name` when it is not `expected`: nullptr when the attribute is absent,
// otherwise the ONNX name of the type it has ("float", "int", "string", "floats", "ints", or
// "another type" for tensors/graphs the C API cannot probe without an allocator).
namespace {
bool ok(OrtStatus* st) {
  if (st == nullptr) return true;
  api().ReleaseStatus(st);
  return false;
}
const char* attr_actual_type(const OrtKernelInfo* info, const char* name) {
  float f = 0.0f;
  int64_t i = 0;
  size_t n = 0;
  if (ok(api().KernelInfoGetAttribute_float(info, name, &f))) return "float";
  if (ok(api().KernelInfoGetAttribute_int64(info, name, &i))) return "int";
  if (ok(api().KernelInfoGetAttribute_string(info, name, nullptr, &n))) return "string";
  // The array getters do not check the attribute's type (they return the ints or floats field, empty
  // for the other type): a non-empty answer tells the type.
  n = 0;
  if (ok(api().KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) && n > 0) return "ints";
  n = 0;
  if (ok(api().KernelInfoGetAttributeArray_float(info, name, nullptr, &n)) && n > 0) return "floats";
  return nullptr;
}
// Error for an attribute of the wrong type, or nullptr (attribute absent).
OrtStatus* wrong_type(const OrtKernelInfo* info, const char* op, const char* name, const char* expected) {
  const char* actual = attr_actual_type(info, name);
  if (actual == nullptr) return nullptr;
  return error(std::string("sdkern.") + op + ": attribute '" + name + "' must be of type " + expected + ", got " +
               actual);
}
}  // namespace

// ORT reports a missing attribute as a failure status; a present attribute of another type is an
// error naming both types (never silently the default), a missing one our message (or the default).
OrtStatus* attr_int(const OrtKernelInfo* info, const char* op, const char* name, const int64_t* def, int64_t* out) {
  if (OrtStatus* st = api().KernelInfoGetAttribute_int64(info, name, out)) {
    api().ReleaseStatus(st);
    SDKERN_ORT_TRY(wrong_type(info, op, name, "int"));
    if (def == nullptr)
      return error(std::string("sdkern.") + op + ": required int attribute '" + name + "' is missing");
    *out = *def;
  }
  return nullptr;
}

OrtStatus* attr_float(const OrtKernelInfo* info, const char* op, const char* name, const float* def, float* out) {
  if (OrtStatus* st = api().KernelInfoGetAttribute_float(info, name, out)) {
    api().ReleaseStatus(st);
    SDKERN_ORT_TRY(wrong_type(info, op, name, "float"));
    if (def == nullptr)
      return error(std::string("sdkern.") + op + ": required float attribute '" + name + "' is missing");
    *out = *def;
  }
  return nullptr;
}

OrtStatus* check_param(const TensorView& p, const char* op, const char* name, int64_t c,
                       ONNXTensorElementDataType x_type) {
  if (p.rank() != 1 || p.shape[0] != c)
    return error(std::string("sdkern.") + op + ": " + name + " must have shape [" + std::to_string(c) + "], got " +
                 shape_str(p.shape));
  if (p.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && p.type != x_type) {
    const std::string allowed = x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                                    ? std::string("float (the type of X)")
                                    : std::string("float or ") + type_name(x_type) + " (the type of X)";
    return error(std::string("sdkern.") + op + ": " + name + " must be " + allowed + ", got " + type_name(p.type));
  }
  return nullptr;
}

#ifdef SDKERN_ORT_WITH_CUDA
OrtStatus* cuda_stream(OrtKernelContext* ctx, cudaStream_t* out) {
  void* s = nullptr;
  SDKERN_ORT_TRY(api().KernelContext_GetGPUComputeStream(ctx, &s));
  *out = static_cast<cudaStream_t>(s);
  return nullptr;
}
#endif

// ---------------------------------------------------------------------------------------------
// OrtCustomOp callbacks. `op` is always one of our OpDef objects.

namespace {
const OpDef* self(const OrtCustomOp* op) { return static_cast<const OpDef*>(op); }

ONNXTensorElementDataType io_type(const OpDef* d, IoType t) {
  switch (t) {
    case IoType::kT: return d->t_;
    case IoType::kFloat: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case IoType::kAny: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

OrtStatus* ORT_API_CALL create_kernel_v2(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                                         void** kernel) {
  *kernel = nullptr;
  try {
    std::unique_ptr<Kernel> k;
    SDKERN_ORT_TRY(self(op)->factory_(info, self(op)->ep_, &k));
    *kernel = k.release();
    return nullptr;
  } catch (const std::bad_alloc&) {
    return error(std::string("sdkern.") + self(op)->name_ + ": out of memory creating the kernel", ORT_FAIL);
  } catch (const std::exception& e) {
    return error(std::string("sdkern.") + self(op)->name_ + ": " + e.what(), ORT_FAIL);
  }
}

// sdkern::cpu::HostPool over the kernel context's intra-op pool (KernelContext_ParallelFor, C API 17+;
// with no pool, ORT runs the items on the calling thread). false when ORT refused the call (e.g. a
// build without the kernel-context API): nothing ran, the kernels run the items themselves.
bool ort_parallel_for(void* host, void (*fn)(void*, size_t), size_t n, void* arg) {
  OrtStatus* st = api().KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(host), fn, n, 0, arg);
  if (!st) return true;
  api().ReleaseStatus(st);
  return false;
}

// How many items a parallel loop is split into on ORT's pool. ORT does not tell a custom op its pool's
// size, and its default is one thread per core: the CPUs this process may run on (its affinity mask;
// not OMP_NUM_THREADS, which users often set to 1 beside ORT). A smaller pool runs the extra items in turn.
int ort_pool_split() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

// SDKERN_ORT_THREADS=openmp: the CPU kernels keep their own OpenMP team inside ORT (the behaviour
// before the pool was used; for A/B measurements). Anything else, or unset: ORT's pool.
bool use_ort_pool() {
  const char* v = std::getenv("SDKERN_ORT_THREADS");
  return !(v && std::strcmp(v, "openmp") == 0);
}

OrtStatus* ORT_API_CALL compute_v2(void* kernel, OrtKernelContext* ctx) {
  try {
    // CPU kernels run on ORT's intra-op pool, not on a second (OpenMP) team of threads next to it.
    static const int split = ort_pool_split();
    static const bool on_pool = use_ort_pool();
    const sdkern::cpu::HostPool pool{ort_parallel_for, ctx, split};
    const sdkern::cpu::ScopedHostPool on_ort_pool(on_pool ? &pool : nullptr);
    return static_cast<Kernel*>(kernel)->compute(ctx);
  } catch (const std::exception& e) {
    return error(std::string("sdkern: ") + e.what(), ORT_FAIL);
  } catch (...) {
    return error("sdkern: unknown C++ exception", ORT_FAIL);
  }
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

size_t ORT_API_CALL no_pairs(int** a, int** b) {
  *a = nullptr;
  *b = nullptr;
  return 0;
}
void ORT_API_CALL release_pairs(int*, int*) {}
}  // namespace

OpDef::OpDef(const char* name, Ep ep, ONNXTensorElementDataType t, std::vector<IoSpec> inputs,
             std::vector<IoSpec> outputs, KernelFactory factory)
    : OrtCustomOp{}, name_(name), ep_(ep), t_(t), inputs_(std::move(inputs)), outputs_(std::move(outputs)),
      factory_(factory) {
  version = ORT_API_VERSION;
  CreateKernel = nullptr;  // CreateKernelV2 is used (reports errors as a status)
  GetName = [](const OrtCustomOp* op) -> const char* { return self(op)->name_; };
  GetExecutionProviderType = [](const OrtCustomOp* op) -> const char* {
    return self(op)->ep_ == Ep::kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  };
  GetInputType = [](const OrtCustomOp* op, size_t i) { return io_type(self(op), self(op)->inputs_[i].type); };
  GetInputTypeCount = [](const OrtCustomOp* op) { return self(op)->inputs_.size(); };
  GetOutputType = [](const OrtCustomOp* op, size_t i) { return io_type(self(op), self(op)->outputs_[i].type); };
  GetOutputTypeCount = [](const OrtCustomOp* op) { return self(op)->outputs_.size(); };
  KernelCompute = nullptr;  // KernelComputeV2 is used
  KernelDestroy = destroy_kernel;
  GetInputCharacteristic = [](const OrtCustomOp* op, size_t i) {
    return self(op)->inputs_[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  GetOutputCharacteristic = [](const OrtCustomOp* op, size_t i) {
    return self(op)->outputs_[i].optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  CreateKernelV2 = create_kernel_v2;
  KernelComputeV2 = compute_v2;
  InferOutputShapeFn = nullptr;
  GetStartVersion = [](const OrtCustomOp*) { return 1; };
  GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  GetMayInplace = no_pairs;
  ReleaseMayInplace = release_pairs;
  GetAliasMap = no_pairs;
  ReleaseAliasMap = release_pairs;
}

void add_op(OpList& ops, const char* name, std::vector<IoSpec> inputs, std::vector<IoSpec> outputs,
            KernelFactory factory) {
  const ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                             ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16};
  for (ONNXTensorElementDataType t : types) {
    ops.emplace_back(new OpDef(name, Ep::kCpu, t, inputs, outputs, factory));
#ifdef SDKERN_ORT_WITH_CUDA
    ops.emplace_back(new OpDef(name, Ep::kCuda, t, inputs, outputs, factory));
#endif
  }
}

}  // namespace sdkern_ort
