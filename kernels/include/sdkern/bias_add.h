// BiasAdd launcher: y = x + bias + skip over (M, C) rows.
// Rows are addressed base[m * row_stride + c]; the last dimension is contiguous.
#pragma once

#include "sdkern/common.h"

namespace sdkern {

// y = x + bias + skip.
struct BiasAddArgs {
  const void* x = nullptr;     // (M, C) rows x_row_stride apart; dtype `dtype`
  const void* bias = nullptr;  // [C]; dtype `bias_dtype`
  const void* skip = nullptr;  // (M, C) rows skip_row_stride apart; dtype `dtype`
  void* y = nullptr;           // (M, C) contiguous; dtype `dtype`
  int64_t M = 0, C = 0, x_row_stride = 0, skip_row_stride = 0;
  DType dtype = DType::kFloat32;
  DType bias_dtype = DType::kFloat32;
};

Status validate(const BiasAddArgs& a);
Status bias_add_cpu(const BiasAddArgs& a);
Status bias_add_cuda(const BiasAddArgs& a, cudaStream_t stream);

}  // namespace sdkern
