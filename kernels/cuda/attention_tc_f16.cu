// Tensor-core flash attention instantiated for __half (one translation unit per dtype keeps builds parallel).
#include "attention_tc.cuh"

namespace sdkern {
namespace cuda {
namespace attn {

template Status launch_tc<__half>(const TcParams& p, int B, cudaStream_t stream);

}  // namespace attn
}  // namespace cuda
}  // namespace sdkern
