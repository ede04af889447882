// Flash-attention forward with tensor cores for fp16 / bf16 (sm_80+): mma.sync m16n8k16 with fp32
// accumulation, ldmatrix fragment loads, cp.async double-buffered K/V tiles, online softmax in
// registers (exp2 with the scale folded in). One block = 64 query rows of one (batch, head); each
// of its 4 warps owns 16 rows. Keys beyond Sk are masked; head-dim columns beyond D are zero-filled.
// Causal (p.causal): row r sees keys n <= r + Sk - Sq; a block stops after the tile holding its last
// row's last key, and tiles crossing the diagonal are masked per element (every row sees key 0 of
// tile 0, so running maxima are finite before any fully masked row of a tile).
// Instantiated per storage type in attention_tc_f16.cu / attention_tc_bf16.cu.
#pragma once

#include "attention_tc_config.h"
#include "common.cuh"
#include "sdkern/attention.h"

namespace sdkern {
namespace cuda {
namespace attn {

struct TcParams {
  const void* q;  // (B, Sq, H, D) strides q_sb/q_ss/q_sh (elements, multiples of 8), last dim contiguous
  const void* k;  // (B, Sk, H, D) strides k_sb/k_ss/k_sh, last dim contiguous
  const void* v;  // (B, Sk, H, D) strides v_sb/v_ss/v_sh, last dim contiguous
  void* o;        // (B, Sq, H, D) contiguous
  int Sq, Sk, H, D;
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh;
  float scale_log2;  // scale * log2(e)
  int causal;        // nonzero: row r sees keys n <= r + Sk - Sq (Sq <= Sk)
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// c (16x8 fp32) += a (16x16, row) * b (16x8, col).
template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 -> one register of two T (lo = first, the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Copy a (rows x DP) tile starting at row r0 of a strided (B, S, H, D) operand into shared memory
// (row stride LD); rows >= S and columns >= D are zero-filled by cp.async's src-size operand.
template <typename T, int DP, int ROWS, int LD>
__device__ __forceinline__ void load_tile(T* sdst, const T* base, int64_t row_stride, int r0, int S, int D) {
  constexpr int kChunks = DP / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += 128) {
    const int r = idx / kChunks, col = (idx % kChunks) * 8;
    const bool ok = r0 + r < S && col < D;
    const T* src = ok ? base + static_cast<int64_t>(r0 + r) * row_stride + col : base;
    cp_async16(sdst + r * LD + col, src, ok ? 16 : 0);
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(128) flash_attn_tc_kernel(TcParams p) {
  using Cfg = TcConfig<DP>;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, LD = Cfg::kLD;
  constexpr int KT = DP / 16;  // k-steps over the head dim
  constexpr int NT = BN / 8;   // 8-key n-tiles of S
  constexpr int DT = DP / 8;   // 8-column n-tiles of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sK = sQ + BM * LD;                    // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;                // [2][BN][LD]

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;

  const int coff = p.Sk - p.Sq;  // causal diagonal offset
  const int kend = p.causal ? min(p.Sk, m0 + BM + coff) : p.Sk;  // keys any row of the block sees
  const int ntiles = (kend + BN - 1) / BN;
  load_tile<T, DP, BM, LD>(sQ, qb, p.q_ss, m0, p.Sq, p.D);
  load_tile<T, DP, BN, LD>(sK, kb, p.k_ss, 0, p.Sk, p.D);
  load_tile<T, DP, BN, LD>(sV, vb, p.v_ss, 0, p.Sk, p.D);
  cp_async_commit();

  uint32_t qf[KT][4];
  float oacc[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's partial sums (quad-reduced at the end)

  for (int j = 0; j < ntiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < ntiles) {
      const int ns = stage ^ 1;
      load_tile<T, DP, BN, LD>(sK + ns * BN * LD, kb, p.k_ss, (j + 1) * BN, p.Sk, p.D);
      load_tile<T, DP, BN, LD>(sV + ns * BN * LD, vb, p.v_ss, (j + 1) * BN, p.Sk, p.D);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk)
        ldsm_x4(qf[kk], sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
    }
    const T* tK = sK + stage * BN * LD;
    const T* tV = sV + stage * BN * LD;

    // S = Q K^T for this warp's 16 rows and BN keys.
    float sacc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.0f;
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        uint32_t bf[4];
        ldsm_x4(bf, tK + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
        mma16816<T>(sacc[2 * np], qf[kk], bf[0], bf[1]);
        mma16816<T>(sacc[2 * np + 1], qf[kk], bf[2], bf[3]);
      }
    }

    // Scale (log2 domain), mask keys >= Sk, online softmax. Rows: lane/4 (e = 0,1), lane/4 + 8 (e = 2,3).
    const int key0 = j * BN + (lane & 3) * 2;
    const bool edge = j * BN + BN > p.Sk;
    const bool diag = p.causal && j * BN + BN - 1 > m0 + coff;  // some key of the tile is past some row's limit
    const int row0 = m0 + warp * 16 + (lane >> 2);                // this thread's rows: row0 (e < 2), row0 + 8
    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float sv = sacc[nt][e] * p.scale_log2;
        const int key = key0 + nt * 8 + (e & 1);
        if (edge && key >= p.Sk) sv = -INFINITY;
        if (diag && key > row0 + (e >> 1) * 8 + coff) sv = -INFINITY;
        sacc[nt][e] = sv;
        tmax[e >> 1] = fmaxf(tmax[e >> 1], sv);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
      const float mnew = fmaxf(row_max[r], tmax[r]);  // finite: every row sees key 0 of tile 0
      alpha[r] = exp2f(row_max[r] - mnew);
      row_max[r] = mnew;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(sacc[nt][e] - row_max[e >> 1]);
        sacc[nt][e] = pe;
        row_sum[e >> 1] += pe;
      }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      oacc[dt][0] *= alpha[0];
      oacc[dt][1] *= alpha[0];
      oacc[dt][2] *= alpha[1];
      oacc[dt][3] *= alpha[1];
    }

    // O += P V: P from the S accumulators (A fragments), V through ldmatrix.trans (B fragments).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(sacc[2 * kk][0], sacc[2 * kk][1]);
      pa[1] = pack2<T>(sacc[2 * kk][2], sacc[2 * kk][3]);
      pa[2] = pack2<T>(sacc[2 * kk + 1][0], sacc[2 * kk + 1][1]);
      pa[3] = pack2<T>(sacc[2 * kk + 1][2], sacc[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t bf[4];
        ldsm_x4_t(bf, tV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
        mma16816<T>(oacc[2 * dp], pa, bf[0], bf[1]);
        mma16816<T>(oacc[2 * dp + 1], pa, bf[2], bf[3]);
      }
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }

  // Normalise and store (two adjacent columns per register pair).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  T* ob = static_cast<T*>(p.o);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + (lane >> 2) + r * 8;
    if (row >= p.Sq) continue;
    const float inv = 1.0f / row_sum[r];
    T* orow = ob + ((static_cast<int64_t>(b) * p.Sq + row) * p.H + h) * p.D;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int col = dt * 8 + (lane & 3) * 2;
      if (col < p.D)
        *reinterpret_cast<uint32_t*>(orow + col) = pack2<T>(oacc[dt][2 * r] * inv, oacc[dt][2 * r + 1] * inv);
    }
  }
}

template <typename T, int DP>
Status launch_dp(const TcParams& p, int B, cudaStream_t stream) {
  using Cfg = TcConfig<DP>;
  auto kernel = flash_attn_tc_kernel<T, DP>;
  Status st = cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
                          "attention_cuda (cudaFuncSetAttribute)");
  if (!st.ok()) return st;
  const dim3 grid(static_cast<unsigned>((p.Sq + Cfg::kBM - 1) / Cfg::kBM), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(B));
  kernel<<<grid, Cfg::kWarps * 32, Cfg::kSmemBytes, stream>>>(p);
  return launch_status("attention_cuda (tensor cores)");
}

// Launches the tensor-core kernel for head dim p.D (D % 8 == 0, D <= 160; checked by the caller).
template <typename T>
Status launch_tc(const TcParams& p, int B, cudaStream_t stream) {
  if (p.D <= 48) return launch_dp<T, 48>(p, B, stream);
  if (p.D <= 64) return launch_dp<T, 64>(p, B, stream);
  if (p.D <= 80) return launch_dp<T, 80>(p, B, stream);
  if (p.D <= 128) return launch_dp<T, 128>(p, B, stream);
  return launch_dp<T, 160>(p, B, stream);
}

}  // namespace attn
}  // namespace cuda
}  // namespace sdkern
