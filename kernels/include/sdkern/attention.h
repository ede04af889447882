// Attention forward: o = softmax(q k^T * scale) v per (batch, head), optionally causal.
// Causal: query i attends to keys j <= i + (Sk - Sq) (bottom-right aligned, the convention of ONNX
// Runtime's unidirectional attention with past keys; equal to torch SDPA's is_causal when Sq == Sk).
// Causal needs Sq <= Sk, so every query row sees at least key 0 (validate() refuses Sq > Sk).
#pragma once

#include <cstddef>

#include "sdkern/common.h"

namespace sdkern {

struct AttentionArgs {
  const void* q = nullptr;  // (B, Sq, H, D), element [b,s,h,d] at q[b*q_sb + s*q_ss + h*q_sh + d]
  const void* k = nullptr;  // (B, Sk, H, D), strides k_sb/k_ss/k_sh, last dim contiguous
  const void* v = nullptr;  // (B, Sk, H, Dv), strides v_sb/v_ss/v_sh, last dim contiguous
  void* o = nullptr;        // (B, Sq, H, Dv) contiguous output
  int64_t B = 0, Sq = 0, Sk = 0, H = 0, D = 0, Dv = 0;
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;
  int64_t k_sb = 0, k_ss = 0, k_sh = 0;
  int64_t v_sb = 0, v_ss = 0, v_sh = 0;
  float scale = 1.0f;
  bool causal = false;            // mask keys j > i + (Sk - Sq) for query i
  DType dtype = DType::kFloat32;  // q, k, v and o share it
};

Status validate(const AttentionArgs& a);

// CPU scratch: each thread packs one head's K and V in fp32, about 4 * Sk * (D + Dv) bytes per
// thread. A call whose per-thread scratch exceeds the limit (default 1 GiB for all threads together;
// SDKERN_ATTENTION_SCRATCH_MB overrides it, read once) runs on fewer threads, and when even one
// thread's scratch is over the limit attention_cpu returns kUnsupported (the torch op then falls
// back to the chunked PyTorch reference). The calling thread keeps its scratch for the next call
// only while it is at most kAttentionScratchKeepBytesPerThread per team thread (Sk up to ~30000
// at D = Dv = 64 and every SD shape stay allocated); larger scratch is released after the call.
constexpr size_t kAttentionScratchKeepBytesPerThread = size_t{16} << 20;
size_t attention_scratch_limit_bytes();

Status attention_cpu(const AttentionArgs& a);
Status attention_cuda(const AttentionArgs& a, cudaStream_t stream);

}  // namespace sdkern
