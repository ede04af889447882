// Tile configuration of the tensor-core flash-attention kernel (attention_tc.cuh).
// Plain C++ (no CUDA headers) so setup_tools/check_cuda.py can compile it on the host and check the
// dynamic shared memory of every instantiation against the per-architecture limit.
#pragma once

namespace sdkern {
namespace cuda {
namespace attn {

// DP: head dim padded to a multiple of 16 (the mma k-step); BN: keys per pipeline stage.
template <int DP>
struct TcConfig {
  static constexpr int kBM = 64;                   // query rows per block (16 per warp)
  static constexpr int kWarps = 4;                 // 128 threads
  static constexpr int kBN = DP <= 128 ? 64 : 32;  // keys per tile
  static constexpr int kLD = DP + 8;               // shared-memory row stride in elements (+16 B: no bank conflicts)
  // Q tile + double-buffered K and V tiles, 2-byte elements.
  static constexpr int kSmemBytes = (kBM * kLD + 2 * 2 * kBN * kLD) * 2;
};

// Padded head dims that are instantiated (head dims 40->48, 64, 80, 128, 160; any D % 8 == 0 <= 160).
constexpr int kTcHeadDims[] = {48, 64, 80, 128, 160};

}  // namespace attn
}  // namespace cuda
}  // namespace sdkern
