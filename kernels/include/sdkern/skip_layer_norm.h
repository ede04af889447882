// SkipLayerNorm launcher: residual add (+bias) then LayerNorm over the last dim.
// Rows are addressed base[m * row_stride + c]; the last dimension is contiguous.
#pragma once

#include "sdkern/common.h"

namespace sdkern {

// s = x (+ skip) (+ bias); y = LayerNorm(s) * gamma (+ beta). Without skip: a plain LayerNorm.
struct SkipLayerNormArgs {
  const void* x = nullptr;      // (M, C) rows x_row_stride apart; dtype `dtype`
  const void* skip = nullptr;   // optional (M, C) rows skip_row_stride apart; dtype `dtype`
  const void* gamma = nullptr;  // [C]; dtype `param_dtype`
  const void* beta = nullptr;   // optional [C]; dtype `param_dtype`
  const void* bias = nullptr;   // optional [C]; dtype `param_dtype`
  void* y = nullptr;            // (M, C) contiguous; dtype `dtype`
  void* s = nullptr;            // optional (M, C) contiguous sum; dtype `dtype`
  float* mean = nullptr;        // optional [M] fp32 (ONNX Runtime's optional output)
  float* inv_std = nullptr;     // optional [M] fp32
  int64_t M = 0, C = 0, x_row_stride = 0, skip_row_stride = 0;
  float eps = 1e-5f;
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
};

Status validate(const SkipLayerNormArgs& a);
Status skip_layer_norm_cpu(const SkipLayerNormArgs& a);
Status skip_layer_norm_cuda(const SkipLayerNormArgs& a, cudaStream_t stream);

}  // namespace sdkern
