// BiasSplitGelu launcher (diffusers GEGLU with the Linear bias folded in).
// Rows are addressed base[m * row_stride + c]; the last dimension is contiguous.
#pragma once

#include "sdkern/common.h"

namespace sdkern {

// y[m, d] = (x[m, d] + b[d]) * gelu_erf(x[m, D + d] + b[D + d]),  d < D.
struct BiasSplitGeluArgs {
  const void* x = nullptr;     // (M, 2D) rows x_row_stride apart; dtype `dtype`
  const void* bias = nullptr;  // [2D] contiguous; dtype `bias_dtype`
  void* y = nullptr;           // (M, D) contiguous; dtype `dtype`
  int64_t M = 0, D = 0, x_row_stride = 0;
  DType dtype = DType::kFloat32;
  DType bias_dtype = DType::kFloat32;
};

Status validate(const BiasSplitGeluArgs& a);
Status bias_split_gelu_cpu(const BiasSplitGeluArgs& a);
Status bias_split_gelu_cuda(const BiasSplitGeluArgs& a, cudaStream_t stream);

}  // namespace sdkern
