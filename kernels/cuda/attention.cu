// Attention forward on CUDA: o = softmax(q k^T * scale) v per (batch, head).
// fp16 / bf16 with D == Dv, D % 8 == 0, D <= 160, 16-byte aligned rows: tensor-core flash attention
// (attention_tc.cuh). Everything else (fp32, other head dims, odd strides; D, Dv <= 256): a simpler
// exact kernel with one warp per query row, online softmax over 32-key chunks, fp32 throughout.
// Causal (query s sees keys n <= s + Sk - Sq): the simple kernel stops each row at its last key; the
// tensor-core kernel stops each block after its last row's key tile and masks the diagonal tiles.
#include <cmath>

#include "attention_tc.cuh"

namespace sdkern {
namespace cuda {
namespace attn {

extern template Status launch_tc<__half>(const TcParams& p, int B, cudaStream_t stream);
extern template Status launch_tc<__nv_bfloat16>(const TcParams& p, int B, cudaStream_t stream);

constexpr int kSimpleWarps = 4;
constexpr int kSimpleMaxD = 256;

// q: (B, Sq, H, D) strided; k: (B, Sk, H, D) strided; v: (B, Sk, H, Dv) strided (last dims contiguous)
// o: (B, Sq, H, Dv) contiguous. One warp per (b, s, h) query row, s fastest across warps so the
// warps of a block share K/V rows in L1. causal != 0: row s sees keys n <= s + Sk - Sq only.
template <typename T>
__global__ void __launch_bounds__(kSimpleWarps * 32)
    attn_simple_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                       int64_t B, int64_t Sq, int64_t Sk, int64_t H, int D, int Dv, int64_t q_sb, int64_t q_ss,
                       int64_t q_sh, int64_t k_sb, int64_t k_ss, int64_t k_sh, int64_t v_sb, int64_t v_ss,
                       int64_t v_sh, float scale_log2, int causal) {
  __shared__ float sq[kSimpleWarps][kSimpleMaxD];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kSimpleWarps + warp;
  if (w >= B * Sq * H) return;  // whole warp; no block-wide barriers below
  const int64_t s = w % Sq, h = (w / Sq) % H, b = w / (Sq * H);
  // keys this row sees: all, or (causal) the first s + Sk - Sq + 1 (>= 1: Sq <= Sk is validated)
  const int64_t nk = causal ? min(Sk, s + (Sk - Sq) + 1) : Sk;
  const T* qr = q + b * q_sb + s * q_ss + h * q_sh;
  for (int d = lane; d < D; d += 32) sq[warp][d] = to_f(qr[d]) * scale_log2;
  __syncwarp();
  const T* kb = k + b * k_sb + h * k_sh;
  const T* vb = v + b * v_sb + h * v_sh;
  constexpr int kAcc = kSimpleMaxD / 32;
  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int64_t n0 = 0; n0 < nk; n0 += 32) {
    const int64_t n = n0 + lane;
    float score = -INFINITY;
    if (n < nk) {
      const T* kr = kb + n * k_ss;
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot += sq[warp][d] * to_f(kr[d]);
      score = dot;
    }
    const float mnew = fmaxf(m, warp_max(score));  // finite: key n0 is always valid
    const float alpha = exp2f(m - mnew);
    const float pr = n < nk ? exp2f(score - mnew) : 0.0f;
    l = l * alpha + warp_sum(pr);
    m = mnew;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] *= alpha;
    const int cnt = nk - n0 < 32 ? static_cast<int>(nk - n0) : 32;
    for (int jj = 0; jj < cnt; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, pr, jj);
      const T* vr = vb + (n0 + jj) * v_ss;
#pragma unroll
      for (int i = 0; i < kAcc; ++i) {
        const int d = lane + 32 * i;
        if (d < Dv) acc[i] += pj * to_f(vr[d]);
      }
    }
  }
  const float inv = 1.0f / l;
  T* orow = o + ((b * Sq + s) * H + h) * Dv;
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int d = lane + 32 * i;
    if (d < Dv) orow[d] = from_f<T>(acc[i] * inv);
  }
}

bool tc_eligible(const AttentionArgs& a) {
  if (a.dtype == DType::kFloat32 || a.D != a.Dv || a.D % 8 != 0 || a.D > 160) return false;
  const int64_t strides[] = {a.q_sb, a.q_ss, a.q_sh, a.k_sb, a.k_ss, a.k_sh, a.v_sb, a.v_ss, a.v_sh};
  for (int64_t s : strides)
    if (s % 8 != 0) return false;
  const int64_t lim = int64_t{1} << 30;
  return aligned16(a.q) && aligned16(a.k) && aligned16(a.v) && aligned16(a.o) && a.Sq < lim && a.Sk < lim &&
         a.H <= kMaxGridY && a.B <= kMaxGridY;
}

}  // namespace attn
}  // namespace cuda

Status attention_cuda(const AttentionArgs& a, cudaStream_t stream) {
  Status st = validate(a);
  if (!st.ok() || a.B == 0 || a.Sq == 0 || a.H == 0) return st;
  const float scale_log2 = a.scale * 1.4426950408889634f;
  if (cuda::attn::tc_eligible(a)) {
    cuda::attn::TcParams p{a.q,
                           a.k,
                           a.v,
                           a.o,
                           static_cast<int>(a.Sq),
                           static_cast<int>(a.Sk),
                           static_cast<int>(a.H),
                           static_cast<int>(a.D),
                           a.q_sb,
                           a.q_ss,
                           a.q_sh,
                           a.k_sb,
                           a.k_ss,
                           a.k_sh,
                           a.v_sb,
                           a.v_ss,
                           a.v_sh,
                           scale_log2,
                           a.causal ? 1 : 0};
    if (a.dtype == DType::kFloat16) return cuda::attn::launch_tc<__half>(p, static_cast<int>(a.B), stream);
    return cuda::attn::launch_tc<__nv_bfloat16>(p, static_cast<int>(a.B), stream);
  }
  if (a.D > cuda::attn::kSimpleMaxD || a.Dv > cuda::attn::kSimpleMaxD)
    return Status::Unsupported("attention_cuda: head dims above 256 are not supported");
  const int64_t blocks = cuda::ceil_div(a.B * a.Sq * a.H, cuda::attn::kSimpleWarps);
  if (blocks > 0x7fffffff) return Status::Unsupported("attention_cuda: too many query rows");
  return cuda::with_dtype(a.dtype, [&](auto tag) -> Status {
    using T = decltype(tag);
    cuda::attn::attn_simple_kernel<T><<<static_cast<unsigned>(blocks), cuda::attn::kSimpleWarps * 32, 0, stream>>>(
        static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v), static_cast<T*>(a.o), a.B,
        a.Sq, a.Sk, a.H, static_cast<int>(a.D), static_cast<int>(a.Dv), a.q_sb, a.q_ss, a.q_sh, a.k_sb, a.k_ss,
        a.k_sh, a.v_sb, a.v_ss, a.v_sh, scale_log2, a.causal ? 1 : 0);
    return cuda::launch_status("attention_cuda (simple)");
  });
}

}  // namespace sdkern
