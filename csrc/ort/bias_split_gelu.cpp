// BiasSplitGelu (domain sdkern, semantics of com.microsoft BiasSplitGelu):
// Y = (X + bias)[..., :D/2] * gelu_erf((X + bias)[..., D/2:]).
//   inputs:  X (..., D) (com.microsoft: (N, S, D)), bias [D] (float or X's type); D even
//   output:  Y (..., D/2), X's type
#include "ort_common.h"
#include "sdkern/bias_split_gelu.h"

namespace sdkern_ort {
namespace {

constexpr const char* kOp = "BiasSplitGelu";

class BiasSplitGeluKernel : public Kernel {
 public:
  explicit BiasSplitGeluKernel(Ep ep) : ep_(ep) {}

  OrtStatus* compute(OrtKernelContext* ctx) override {
    TensorView x, bias, y;
    SDKERN_ORT_TRY(input(ctx, 0, kOp, "X", true, &x));
    SDKERN_ORT_TRY(input(ctx, 1, kOp, "bias", true, &bias));
    if (x.rank() < 2)
      return error("sdkern.BiasSplitGelu: X must have rank >= 2 ((N, S, D)), got shape " + shape_str(x.shape));
    const int64_t D2 = x.dim(-1);
    if (D2 % 2 != 0)
      return error("sdkern.BiasSplitGelu: the last dimension of X must be even, got " + std::to_string(D2));
    SDKERN_ORT_TRY(check_param(bias, kOp, "bias", D2, x.type));
    std::vector<int64_t> yshape = x.shape;
    yshape.back() = D2 / 2;
    SDKERN_ORT_TRY(output(ctx, 0, yshape, &y));
    if (numel(x.shape) == 0) return nullptr;

    sdkern::BiasSplitGeluArgs a;
    a.x = x.data;
    a.bias = bias.data;
    a.y = y.data;
    a.M = numel(x.shape) / D2;
    a.D = D2 / 2;
    a.x_row_stride = D2;
    a.dtype = x.dtype;
    a.bias_dtype = bias.dtype;
    if (ep_ == Ep::kCpu) return from_status(sdkern::bias_split_gelu_cpu(a), kOp);
#ifdef SDKERN_ORT_WITH_CUDA
    cudaStream_t stream = nullptr;
    SDKERN_ORT_TRY(cuda_stream(ctx, &stream));
    return from_status(sdkern::bias_split_gelu_cuda(a, stream), kOp);
#else
    return error("sdkern.BiasSplitGelu: this library was built without CUDA", ORT_NOT_IMPLEMENTED);
#endif
  }

 private:
  Ep ep_;
};

OrtStatus* create(const OrtKernelInfo*, Ep ep, std::unique_ptr<Kernel>* out) {
  out->reset(new BiasSplitGeluKernel(ep));
  return nullptr;
}

}  // namespace

void register_bias_split_gelu(OpList& ops) {
  add_op(ops, kOp, {{IoType::kT, false}, {IoType::kAny, false}}, {{IoType::kT, false}}, create);
}

}  // namespace sdkern_ort
