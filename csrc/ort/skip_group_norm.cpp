// SkipGroupNorm (domain sdkern, semantics of com.microsoft SkipGroupNorm): S = X + skip + bias,
// Y = GroupNorm(S) (+SiLU).
//   attrs:   as GroupNorm (epsilon, groups, activation, channels_last)
//   inputs:  X, gamma [C], beta [C] (float or X's type), skip, optional bias [C] (float or X's type)
//            skip: like X, or broadcast per (n, c): (N, 1, 1, C) / (N, C) when channels_last=1,
//            (N, C, 1, 1) / (N, C) when channels_last=0
//   outputs: Y like X, optional S like X
#include "ort_common.h"
#include "sdkern/skip_group_norm.h"

namespace sdkern_ort {
namespace {

constexpr const char* kOp = "SkipGroupNorm";

// skip strides over the (N, C, P) view, or an error naming the accepted shapes.
OrtStatus* skip_strides(const TensorView& skip, const TensorView& x, const GroupNormShape& sh, bool channels_last,
                        sdkern::GroupNormArgs* a) {
  const std::vector<int64_t>& s = skip.shape;
  const bool per_nc = (s.size() == 2 && s[0] == sh.N && s[1] == sh.C) ||
                      (s.size() == 4 && s[0] == sh.N &&
                       (channels_last ? (s[1] == 1 && s[2] == 1 && s[3] == sh.C) : (s[1] == sh.C && s[2] == 1 && s[3] == 1)));
  if (per_nc) {
    a->skip_sn = sh.C;
    a->skip_sc = 1;
    a->skip_sp = 0;
    return nullptr;
  }
  if (s == x.shape) {  // the full shape: (2, 4, 3, 8) is no substitute for X (2, 3, 4, 8)
    a->skip_sn = sh.sn;
    a->skip_sc = sh.sc;
    a->skip_sp = sh.sp;
    return nullptr;
  }
  return error(std::string("sdkern.SkipGroupNorm: skip has shape ") + shape_str(s) + "; expected X's shape, " +
               (channels_last ? "(N, 1, 1, C)" : "(N, C, 1, 1)") + " or (N, C) with N=" + std::to_string(sh.N) +
               ", C=" + std::to_string(sh.C));
}

class SkipGroupNormKernel : public Kernel {
 public:
  SkipGroupNormKernel(GroupNormAttrs at, Ep ep) : at_(at), ep_(ep) {}

  OrtStatus* compute(OrtKernelContext* ctx) override {
    TensorView x, gamma, beta, skip, bias, y, s;
    SDKERN_ORT_TRY(input(ctx, 0, kOp, "X", true, &x));
    SDKERN_ORT_TRY(input(ctx, 1, kOp, "gamma", true, &gamma));
    SDKERN_ORT_TRY(input(ctx, 2, kOp, "beta", true, &beta));
    SDKERN_ORT_TRY(input(ctx, 3, kOp, "skip", true, &skip));
    SDKERN_ORT_TRY(input(ctx, 4, kOp, "bias", false, &bias));
    GroupNormShape sh;
    SDKERN_ORT_TRY(group_norm_shape(x, at_, kOp, &sh));
    SDKERN_ORT_TRY(check_param(gamma, kOp, "gamma", sh.C, x.type));
    SDKERN_ORT_TRY(check_param(beta, kOp, "beta", sh.C, x.type));
    if (gamma.type != beta.type) return error("sdkern.SkipGroupNorm: gamma and beta must have the same type");
    if (skip.type != x.type)
      return error(std::string("sdkern.SkipGroupNorm: skip must have X's type ") + type_name(x.type) + ", got " +
                   type_name(skip.type));
    if (bias.present()) SDKERN_ORT_TRY(check_param(bias, kOp, "bias", sh.C, x.type));

    sdkern::GroupNormArgs a;
    SDKERN_ORT_TRY(skip_strides(skip, x, sh, at_.channels_last, &a));
    SDKERN_ORT_TRY(output(ctx, 0, x.shape, &y));
    SDKERN_ORT_TRY(output(ctx, 1, x.shape, &s));
    if (numel(x.shape) == 0) return nullptr;

    a.x = x.data;
    a.skip = skip.data;
    a.bias = bias.data;
    a.gamma = gamma.data;
    a.beta = beta.data;
    a.y = y.data;
    a.s = s.data;
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
    a.bias_dtype = bias.present() ? bias.dtype : x.dtype;
    if (ep_ == Ep::kCpu) return from_status(sdkern::skip_group_norm_cpu(a), kOp);
#ifdef SDKERN_ORT_WITH_CUDA
    return run_group_norm_cuda(ctx, x, a, /*skip=*/true, kOp);
#else
    return error("sdkern.SkipGroupNorm: this library was built without CUDA", ORT_NOT_IMPLEMENTED);
#endif
  }

 private:
  GroupNormAttrs at_;
  Ep ep_;
};

OrtStatus* create(const OrtKernelInfo* info, Ep ep, std::unique_ptr<Kernel>* out) {
  GroupNormAttrs at;
  SDKERN_ORT_TRY(read_group_norm_attrs(info, kOp, &at));
  out->reset(new SkipGroupNormKernel(at, ep));
  return nullptr;
}

}  // namespace

void register_skip_group_norm(OpList& ops) {
  add_op(ops, kOp,
         {{IoType::kT, false}, {IoType::kAny, false}, {IoType::kAny, false}, {IoType::kT, false}, {IoType::kAny, true}},
         {{IoType::kT, false}, {IoType::kT, true}}, create);
}

}  // namespace sdkern_ort
