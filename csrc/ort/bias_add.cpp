// BiasAdd (domain sdkern, semantics of com.microsoft BiasAdd): Y = X + bias + skip.
//   inputs:  X (..., C) (com.microsoft: (N, S, C)), bias [C] (float or X's type), skip: X's shape and type
//   output:  Y like X
#include "ort_common.h"
#include "sdkern/bias_add.h"

namespace sdkern_ort {
namespace {

constexpr const char* kOp = "BiasAdd";

class BiasAddKernel : public Kernel {
 public:
  explicit BiasAddKernel(Ep ep) : ep_(ep) {}

  OrtStatus* compute(OrtKernelContext* ctx) override {
    TensorView x, bias, skip, y;
    SDKERN_ORT_TRY(input(ctx, 0, kOp, "X", true, &x));
    SDKERN_ORT_TRY(input(ctx, 1, kOp, "bias", true, &bias));
    SDKERN_ORT_TRY(input(ctx, 2, kOp, "skip", true, &skip));
    if (x.rank() < 1) return error("sdkern.BiasAdd: X must have rank >= 1 ((N, S, C)), got a scalar");
    const int64_t C = x.dim(-1);
    SDKERN_ORT_TRY(check_param(bias, kOp, "bias", C, x.type));
    if (skip.shape != x.shape)
      return error("sdkern.BiasAdd: skip must have X's shape " + shape_str(x.shape) + ", got " + shape_str(skip.shape));
    if (skip.type != x.type)
      return error(std::string("sdkern.BiasAdd: skip must have X's type ") + type_name(x.type) + ", got " +
                   type_name(skip.type));
    SDKERN_ORT_TRY(output(ctx, 0, x.shape, &y));
    if (numel(x.shape) == 0) return nullptr;

    sdkern::BiasAddArgs a;
    a.x = x.data;
    a.bias = bias.data;
    a.skip = skip.data;
    a.y = y.data;
    a.M = numel(x.shape) / C;
    a.C = C;
    a.x_row_stride = C;
    a.skip_row_stride = C;
    a.dtype = x.dtype;
    a.bias_dtype = bias.dtype;
    if (ep_ == Ep::kCpu) return from_status(sdkern::bias_add_cpu(a), kOp);
#ifdef SDKERN_ORT_WITH_CUDA
    cudaStream_t stream = nullptr;
    SDKERN_ORT_TRY(cuda_stream(ctx, &stream));
    return from_status(sdkern::bias_add_cuda(a, stream), kOp);
#else
    return error("sdkern.BiasAdd: this library was built without CUDA", ORT_NOT_IMPLEMENTED);
#endif
  }

 private:
  Ep ep_;
};

OrtStatus* create(const OrtKernelInfo*, Ep ep, std::unique_ptr<Kernel>* out) {
  out->reset(new BiasAddKernel(ep));
  return nullptr;
}

}  // namespace

void register_bias_add(OpList& ops) {
  add_op(ops, kOp, {{IoType::kT, false}, {IoType::kAny, false}, {IoType::kT, false}}, {{IoType::kT, false}}, create);
}

}  // namespace sdkern_ort
