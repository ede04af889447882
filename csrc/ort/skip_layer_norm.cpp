// SkipLayerNormalization (domain sdkern, semantics of com.microsoft SkipLayerNormalization):
// S = input + skip (+ bias); output = LayerNorm(S) * gamma (+ beta) over the last dimension.
//   attrs:   epsilon (float, default 1e-12 as in ONNX Runtime)
//   inputs:  input (..., H) (com.microsoft: (B, S, H)); skip: input's shape, or broadcast over the
//            batch as (1, S, H) / (S, H); gamma [H]; optional beta [H]; optional bias [H]
//            (gamma/beta/bias all float or all input's type)
//   outputs: output like input; optional mean and inv_std_var (float, input's shape with last dim 1);
//            optional input_skip_bias_sum like input
#include "ort_common.h"
#include "sdkern/skip_layer_norm.h"

namespace sdkern_ort {
namespace {

constexpr const char* kOp = "SkipLayerNormalization";

class SkipLayerNormKernel : public Kernel {
 public:
  SkipLayerNormKernel(float eps, Ep ep) : eps_(eps), ep_(ep) {}

  OrtStatus* compute(OrtKernelContext* ctx) override {
    TensorView x, skip, gamma, beta, bias, y, mean, inv_std, sum;
    SDKERN_ORT_TRY(input(ctx, 0, kOp, "input", true, &x));
    SDKERN_ORT_TRY(input(ctx, 1, kOp, "skip", true, &skip));
    SDKERN_ORT_TRY(input(ctx, 2, kOp, "gamma", true, &gamma));
    SDKERN_ORT_TRY(input(ctx, 3, kOp, "beta", false, &beta));
    SDKERN_ORT_TRY(input(ctx, 4, kOp, "bias", false, &bias));
    if (x.rank() < 1) return error("sdkern.SkipLayerNormalization: input must have rank >= 1, got a scalar");
    const int64_t C = x.dim(-1);
    const int64_t M = C ? numel(x.shape) / C : 0;
    SDKERN_ORT_TRY(check_param(gamma, kOp, "gamma", C, x.type));
    if (beta.present()) SDKERN_ORT_TRY(check_param(beta, kOp, "beta", C, x.type));
    if (bias.present()) SDKERN_ORT_TRY(check_param(bias, kOp, "bias", C, x.type));
    if ((beta.present() && beta.type != gamma.type) || (bias.present() && bias.type != gamma.type))
      return error("sdkern.SkipLayerNormalization: gamma, beta and bias must have the same type");
    if (skip.type != x.type)
      return error(std::string("sdkern.SkipLayerNormalization: skip must have input's type ") + type_name(x.type) +
                   ", got " + type_name(skip.type));
    // skip: same shape (one launch), or the trailing (S, H) repeated over the batch (one launch per batch).
    const int64_t skip_rows = skip.rank() ? (skip.dim(-1) ? numel(skip.shape) / skip.dim(-1) : 0) : 0;
    bool same = skip.shape == x.shape;
    bool bcast = false;
    if (!same && x.rank() == 3 && skip.dim(-1) == C && skip_rows == x.shape[1] &&
        ((skip.rank() == 3 && skip.shape[0] == 1 && skip.shape[1] == x.shape[1]) || skip.rank() == 2))
      bcast = true;
    if (!same && !bcast)
      return error("sdkern.SkipLayerNormalization: skip must have input's shape " + shape_str(x.shape) +
                   " or (1, S, H) / (S, H), got " + shape_str(skip.shape));

    std::vector<int64_t> stat_shape = x.shape;
    stat_shape.back() = 1;
    SDKERN_ORT_TRY(output(ctx, 0, x.shape, &y));
    SDKERN_ORT_TRY(output(ctx, 1, stat_shape, &mean));
    SDKERN_ORT_TRY(output(ctx, 2, stat_shape, &inv_std));
    SDKERN_ORT_TRY(output(ctx, 3, x.shape, &sum));
    if (M == 0 || C == 0) return nullptr;

    sdkern::SkipLayerNormArgs a;
    a.gamma = gamma.data;
    a.beta = beta.data;
    a.bias = bias.data;
    a.C = C;
    a.x_row_stride = C;
    a.skip_row_stride = C;
    a.eps = eps_;
    a.dtype = x.dtype;
    a.param_dtype = gamma.dtype;
    const int64_t batches = same ? 1 : x.shape[0];
    const int64_t rows = M / batches;
    const size_t es = elem_size(x.dtype);
#ifdef SDKERN_ORT_WITH_CUDA
    cudaStream_t stream = nullptr;
    if (ep_ == Ep::kCuda) SDKERN_ORT_TRY(cuda_stream(ctx, &stream));
#endif
    for (int64_t b = 0; b < batches; ++b) {
      const size_t off = static_cast<size_t>(b * rows * C) * es;
      a.M = rows;
      a.x = static_cast<const char*>(x.data) + off;
      a.skip = skip.data;
      a.y = static_cast<char*>(y.data) + off;
      a.s = sum.data ? static_cast<char*>(sum.data) + off : nullptr;
      a.mean = mean.data ? static_cast<float*>(mean.data) + b * rows : nullptr;
      a.inv_std = inv_std.data ? static_cast<float*>(inv_std.data) + b * rows : nullptr;
      sdkern::Status st;
      if (ep_ == Ep::kCpu) {
        st = sdkern::skip_layer_norm_cpu(a);
      } else {
#ifdef SDKERN_ORT_WITH_CUDA
        st = sdkern::skip_layer_norm_cuda(a, stream);
#else
        return error("sdkern.SkipLayerNormalization: this library was built without CUDA", ORT_NOT_IMPLEMENTED);
#endif
      }
      SDKERN_ORT_TRY(from_status(st, kOp));
    }
    return nullptr;
  }

 private:
  float eps_;
  Ep ep_;
};

OrtStatus* create(const OrtKernelInfo* info, Ep ep, std::unique_ptr<Kernel>* out) {
  const float def = 1e-12f;
  float eps = def;
  SDKERN_ORT_TRY(attr_float(info, kOp, "epsilon", &def, &eps));
  if (!(eps >= 0.0f)) return error("sdkern.SkipLayerNormalization: attribute 'epsilon' must be >= 0");
  out->reset(new SkipLayerNormKernel(eps, ep));
  return nullptr;
}

}  // namespace

void register_skip_layer_norm(OpList& ops) {
  add_op(ops, kOp,
         {{IoType::kT, false}, {IoType::kT, false}, {IoType::kAny, false}, {IoType::kAny, true}, {IoType::kAny, true}},
         {{IoType::kT, false}, {IoType::kFloat, true}, {IoType::kFloat, true}, {IoType::kT, true}}, create);
}

}  // namespace sdkern_ort
