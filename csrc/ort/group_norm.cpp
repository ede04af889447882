// GroupNorm (domain sdkern, semantics of com.microsoft GroupNorm).
//   attrs:   epsilon (float, 1e-5), groups (int, required), activation (int, required: 0 none, 1 SiLU),
//            channels_last (int, 1: X is (N, H, W, C); 0: X is (N, C, H, W))
//   inputs:  X (float/float16/bfloat16), gamma [C], beta [C] (float or X's type)
//   output:  Y, shape and type of X
#include "ort_common.h"
#include "sdkern/group_norm.h"

namespace sdkern_ort {

OrtStatus* read_group_norm_attrs(const OrtKernelInfo* info, const char* op, GroupNormAttrs* out) {
  const float eps_def = 1e-5f;
  const int64_t cl_def = 1;
  int64_t activation = 0, channels_last = 1;
  SDKERN_ORT_TRY(attr_float(info, op, "epsilon", &eps_def, &out->eps));
  SDKERN_ORT_TRY(attr_int(info, op, "groups", nullptr, &out->groups));
  SDKERN_ORT_TRY(attr_int(info, op, "activation", nullptr, &activation));
  SDKERN_ORT_TRY(attr_int(info, op, "channels_last", &cl_def, &channels_last));
  const std::string p = std::string("sdkern.") + op + ": ";
  if (out->groups <= 0) return error(p + "attribute 'groups' must be positive, got " + std::to_string(out->groups));
  if (activation != 0 && activation != 1)
    return error(p + "attribute 'activation' must be 0 (none) or 1 (SiLU), got " + std::to_string(activation));
  if (channels_last != 0 && channels_last != 1)
    return error(p + "attribute 'channels_last' must be 0 or 1, got " + std::to_string(channels_last));
  if (!(out->eps >= 0.0f)) return error(p + "attribute 'epsilon' must be >= 0");
  out->silu = activation == 1;
  out->channels_last = channels_last == 1;
  return nullptr;
}

OrtStatus* group_norm_shape(const TensorView& x, const GroupNormAttrs& at, const char* op, GroupNormShape* out) {
  const std::string p = std::string("sdkern.") + op + ": ";
  if (x.rank() != 4)
    return error(p + "X must be 4-D (" + (at.channels_last ? "N, H, W, C" : "N, C, H, W") + "), got shape " +
                 shape_str(x.shape));
  out->N = x.shape[0];
  out->C = at.channels_last ? x.shape[3] : x.shape[1];
  out->P = at.channels_last ? x.shape[1] * x.shape[2] : x.shape[2] * x.shape[3];
  if (out->C % at.groups != 0)
    return error(p + "channels C=" + std::to_string(out->C) + " are not divisible by groups=" +
                 std::to_string(at.groups));
  out->sn = out->C * out->P;
  out->sc = at.channels_last ? 1 : out->P;
  out->sp = at.channels_last ? out->C : 1;
  return nullptr;
}

namespace {

constexpr const char* kOp = "GroupNorm";

class GroupNormKernel : public Kernel {
 public:
  GroupNormKernel(GroupNormAttrs at, Ep ep) : at_(at), ep_(ep) {}

  OrtStatus* compute(OrtKernelContext* ctx) override {
    TensorView x, gamma, beta, y;
    SDKERN_ORT_TRY(input(ctx, 0, kOp, "X", true, &x));
    SDKERN_ORT_TRY(input(ctx, 1, kOp, "gamma", true, &gamma));
    SDKERN_ORT_TRY(input(ctx, 2, kOp, "beta", true, &beta));
    GroupNormShape sh;
    SDKERN_ORT_TRY(group_norm_shape(x, at_, kOp, &sh));
    SDKERN_ORT_TRY(check_param(gamma, kOp, "gamma", sh.C, x.type));
    SDKERN_ORT_TRY(check_param(beta, kOp, "beta", sh.C, x.type));
    if (gamma.type != beta.type) return error("sdkern.GroupNorm: gamma and beta must have the same type");
    SDKERN_ORT_TRY(output(ctx, 0, x.shape, &y));
    if (numel(x.shape) == 0) return nullptr;

    sdkern::GroupNormArgs a;
    a.x = x.data;
    a.gamma = gamma.data;
    a.beta = beta.data;
    a.y = y.data;
    a.N = sh.N;
    a.C = sh.C;
    a.P = sh.P;
    a.groups = at_.groups;
    a.eps = at_.eps;
    a.silu = at_.silu;
    a.x_sn = sh.sn;
    a.x_sc = sh.sc;
    a.x_sp = sh.sp;
    a.dtype = x.dtype;
    a.param_dtype = gamma.dtype;
    if (ep_ == Ep::kCpu) return from_status(sdkern::group_norm_cpu(a), kOp);
#ifdef SDKERN_ORT_WITH_CUDA
    return run_group_norm_cuda(ctx, x, a, /*skip=*/false, kOp);
#else
    return error("sdkern.GroupNorm: this library was built without CUDA", ORT_NOT_IMPLEMENTED);
#endif
  }

 private:
  GroupNormAttrs at_;
  Ep ep_;
};

OrtStatus* create(const OrtKernelInfo* info, Ep ep, std::unique_ptr<Kernel>* out) {
  GroupNormAttrs at;
  SDKERN_ORT_TRY(read_group_norm_attrs(info, kOp, &at));
  out->reset(new GroupNormKernel(at, ep));
  return nullptr;
}

}  // namespace

void register_group_norm(OpList& ops) {
  add_op(ops, kOp, {{IoType::kT, false}, {IoType::kAny, false}, {IoType::kAny, false}}, {{IoType::kT, false}},
         create);
}

#ifdef SDKERN_ORT_WITH_CUDA
OrtStatus* run_group_norm_cuda(OrtKernelContext* ctx, const TensorView& x, sdkern::GroupNormArgs& a, bool skip,
                               const char* op) {
  cudaStream_t stream = nullptr;
  SDKERN_ORT_TRY(cuda_stream(ctx, &stream));
  const size_t bytes = sdkern::group_norm_workspace_bytes(a);
  const OrtMemoryInfo* mem = nullptr;
  SDKERN_ORT_TRY(api().GetTensorMemoryInfo(x.value, &mem));
  OrtAllocator* alloc = nullptr;
  void* ws = nullptr;
  if (bytes > 0) {
    SDKERN_ORT_TRY(api().KernelContext_GetAllocator(ctx, mem, &alloc));
    if (OrtStatus* st = api().AllocatorAlloc(alloc, bytes, &ws)) {
      api().ReleaseAllocator(alloc);
      return st;
    }
  }
  a.workspace = ws;
  const sdkern::Status launched = skip ? sdkern::skip_group_norm_cuda(a, stream) : sdkern::group_norm_cuda(a, stream);
  OrtStatus* st = from_status(launched, op);
  if (alloc) {
    api().AllocatorFree(alloc, ws);
    api().ReleaseAllocator(alloc);
  }
  return st;
}
#endif

}  // namespace sdkern_ort
