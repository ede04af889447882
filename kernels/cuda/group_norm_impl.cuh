// GroupNorm(+SiLU) / SkipGroupNorm on CUDA, shared by group_norm.cu (kSkip = false) and
// skip_group_norm.cu (kSkip = true), so each translation unit instantiates only its own variant.
//
// Tensors are (N, C, P) with element (n, c, p) at base[n*sn + c*sc + p*sp] (NHWC: sc = 1, sp = C).
// Three launches on the caller's stream, no allocation, no synchronisation:
//   1. stats:    per (n, pixel chunk[, group]) block, fp32 sums of (v - pivot) and (v - pivot)^2 for
//                every group, where v = x (+ skip + bias) and pivot = v(n, first channel of group, 0)
//                (a sample of the data, so the shifted sums do not cancel). Written to the workspace.
//   2. finalise: one warp per (n, group) merges the chunk partials with Chan's formula
//                (math::moments_from_shifted_sums + math::moments_combine) into mean and 1/std.
//   3. apply:    y = (v - mean) * rstd * gamma + beta (+ SiLU), s = v when asked; 16-byte vectors.
// Channels-last tensors use vectorised stats and apply kernels (all channels of a pixel chunk per
// block, fully coalesced); any other strides (NCHW, odd alignment) use the scalar kernels.
#pragma once

#include "common.cuh"
#include "sdkern/group_norm.h"

namespace sdkern {
namespace cuda {
namespace gn {

constexpr int kBlock = 256;
constexpr int64_t kStatsSmemMax = 48 * 1024;

// Pixel chunking of the stats pass; a function of (C, P) only, so the workspace size is known
// from the sizes alone (group_norm_workspace_bytes).
struct Plan {
  int64_t ppc;     // pixels per chunk
  int64_t chunks;  // ceil(P / ppc), <= 1024
};

inline Plan plan(int64_t C, int64_t P) {
  int64_t ppc = std::max<int64_t>(1, ceil_div(8192, C));
  int64_t chunks = ceil_div(P, ppc);
  if (chunks > 1024) {
    ppc = ceil_div(P, 1024);
    chunks = ceil_div(P, ppc);
  }
  return {ppc, chunks};
}

// Workspace: partial[N][chunks][G][2] (shifted sum, shifted sum of squares) then stats[N][G][2]
// (mean, rstd), all fp32. The scalar path may use fewer, longer chunks (packed at the front).
inline size_t workspace_floats(int64_t N, int64_t C, int64_t P, int64_t G) {
  if (N <= 0 || P <= 0 || C <= 0 || G <= 0) return 0;
  const Plan pl = plan(C, P);
  return static_cast<size_t>(N * pl.chunks * G * 2 + N * G * 2);
}

// Reads v(n, c, p) = x (+ skip + bias) in fp32.
template <typename T, bool kSkip>
struct Source {
  const T* x;        // (N, C, P) strides x_sn/x_sc/x_sp
  const T* skip;     // (N, C, P) strides k_sn/k_sc/k_sp (k_sp = 0: broadcast over pixels); kSkip only
  const void* bias;  // optional [C], dtype code bias_dt; kSkip only
  int bias_dt;
  int64_t x_sn, x_sc, x_sp, k_sn, k_sc, k_sp;

  __device__ __forceinline__ float at(int64_t n, int64_t c, int64_t p) const {
    float v = to_f(x[n * x_sn + c * x_sc + p * x_sp]);
    if constexpr (kSkip) {
      v += to_f(skip[n * k_sn + c * k_sc + p * k_sp]);
      if (bias) v += load_param(bias, bias_dt, c);
    }
    return v;
  }

  // VEC channels c0.. of pixel p; requires x_sc == 1 and 16-byte aligned x rows (vector path).
  // skip_vec: skip has k_sc == 1 and aligned rows too (else it is read element by element).
  __device__ __forceinline__ void vec(int64_t n, int64_t c0, int64_t p, bool skip_vec, float* v) const {
    constexpr int VEC = Vec<T>::kN;
    const Pack<T> xv = load_pack(x + n * x_sn + c0 + p * x_sp);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_f(xv.v[i]);
    if constexpr (kSkip) {
      if (skip_vec) {
        const Pack<T> kv = load_pack(skip + n * k_sn + c0 + p * k_sp);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] += to_f(kv.v[i]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] += to_f(skip[n * k_sn + (c0 + i) * k_sc + p * k_sp]);
      }
      if (bias) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] += load_param(bias, bias_dt, c0 + i);
      }
    }
  }
};

// Stats, vector path. Grid (chunks, N); block kBlock.
// ws: partial[N][chunks][G][2] (see workspace_floats). Dynamic shared memory: 2 * rows * C floats,
// rows = kBlock / min(C / VEC, kBlock).
template <typename T, bool kSkip>
__global__ void __launch_bounds__(kBlock)
    stats_vec_kernel(Source<T, kSkip> src, bool skip_vec, float* __restrict__ ws, int64_t C, int64_t P, int G,
                     int Cg, int64_t ppc, int chunks) {
  constexpr int VEC = Vec<T>::kN;
  extern __shared__ float sm[];
  const int CV = static_cast<int>(C / VEC);
  const int tpc = CV < kBlock ? CV : kBlock;
  const int rows = kBlock / tpc;
  const int tr = threadIdx.x / tpc, tc = threadIdx.x % tpc;
  const int64_t n = blockIdx.y;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * ppc;
  const int64_t p1 = min(P, p0 + ppc);
  float* s_sum = sm;
  float* s_sq = sm + static_cast<int64_t>(rows) * C;
  if (tr < rows) {
    for (int cv = tc; cv < CV; cv += tpc) {
      const int64_t c0 = static_cast<int64_t>(cv) * VEC;
      float piv[VEC], a[VEC], q[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        piv[i] = src.at(n, (c0 + i) / Cg * Cg, 0);
        a[i] = 0.0f;
        q[i] = 0.0f;
      }
      for (int64_t p = p0 + tr; p < p1; p += rows) {
        float v[VEC];
        src.vec(n, c0, p, skip_vec, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = v[i] - piv[i];
          a[i] += d;
          q[i] += d * d;
        }
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        s_sum[tr * C + c0 + i] = a[i];
        s_sq[tr * C + c0 + i] = q[i];
      }
    }
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += kBlock) {
    float a = 0.0f, q = 0.0f;
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < Cg; ++j) {
        a += s_sum[r * C + g * Cg + j];
        q += s_sq[r * C + g * Cg + j];
      }
    float* out = ws + ((n * chunks + blockIdx.x) * G + g) * 2;
    out[0] = a;
    out[1] = q;
  }
}

// Stats, scalar path (any strides). Grid (chunks, G, N); block kBlock.
// pfast: iterate pixels fastest (NCHW-like, sp <= sc) rather than channels.
template <typename T, bool kSkip>
__global__ void __launch_bounds__(kBlock)
    stats_scalar_kernel(Source<T, kSkip> src, bool pfast, float* __restrict__ ws, int64_t P, int Cg, int64_t ppc,
                        int chunks) {
  __shared__ float scratch[33];
  const int64_t n = blockIdx.z;
  const int g = blockIdx.y, G = gridDim.y;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * ppc;
  const int64_t npix = min(P, p0 + ppc) - p0;
  const int64_t cnt = npix * Cg;
  const int64_t cbase = static_cast<int64_t>(g) * Cg;
  const float piv = src.at(n, cbase, 0);
  float a = 0.0f, q = 0.0f;
  for (int64_t e = threadIdx.x; e < cnt; e += kBlock) {
    const int64_t cl = pfast ? e / npix : e % Cg;
    const int64_t p = p0 + (pfast ? e % npix : e / Cg);
    const float d = src.at(n, cbase + cl, p) - piv;
    a += d;
    q += d * d;
  }
  a = block_sum(a, scratch);
  q = block_sum(q, scratch);
  if (threadIdx.x == 0) {
    float* out = ws + ((n * chunks + blockIdx.x) * G + g) * 2;
    out[0] = a;
    out[1] = q;
  }
}

// Finalise: one warp per (n, g). ws as above; stats = ws + N*chunks*G*2 floats, [N][G][2].
template <typename T, bool kSkip>
__global__ void __launch_bounds__(kBlock)
    finalize_kernel(Source<T, kSkip> src, const float* __restrict__ ws, float* __restrict__ stats, int64_t N,
                    int64_t P, int G, int Cg, int64_t ppc, int chunks, float eps) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (pair >= N * G) return;  // whole warps leave together
  const int64_t n = pair / G;
  const int g = static_cast<int>(pair % G);
  const float piv = src.at(n, static_cast<int64_t>(g) * Cg, 0);
  math::Moments m{0.0f, 0.0f, 0.0f};
  for (int ch = lane; ch < chunks; ch += 32) {
    const int64_t p0 = static_cast<int64_t>(ch) * ppc;
    const float cnt = static_cast<float>((min(P, p0 + ppc) - p0) * Cg);
    const float* part = ws + ((n * chunks + ch) * G + g) * 2;
    m = math::moments_combine(m, math::moments_from_shifted_sums(cnt, part[0], part[1], piv));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    math::Moments other;
    other.n = __shfl_xor_sync(0xffffffffu, m.n, o);
    other.mean = __shfl_xor_sync(0xffffffffu, m.mean, o);
    other.m2 = __shfl_xor_sync(0xffffffffu, m.m2, o);
    m = math::moments_combine(m, other);
  }
  if (lane == 0) {
    const float var = fmaxf(m.m2 / m.n, 0.0f);
    stats[pair * 2] = m.mean;
    stats[pair * 2 + 1] = rsqrtf(var + eps);
  }
}

__device__ __forceinline__ float maybe_silu(float v, bool silu) { return silu ? math::silu(v) : v; }

// Apply, vector path. Grid (blocks, N); block kBlock; thread per (pixel, 16-byte channel vector).
// y, s: (N, C, P) with the strides of x (x_sc == 1); s optional. gamma, beta: [C] dtype pdt.
// stats: [N][G][2] (mean, rstd). Requires P * C / VEC < 2^31.
template <typename T, bool kSkip>
__global__ void __launch_bounds__(kBlock)
    apply_vec_kernel(Source<T, kSkip> src, bool skip_vec, const float* __restrict__ stats,
                     const void* __restrict__ gamma, const void* __restrict__ beta, int pdt, T* __restrict__ y,
                     T* __restrict__ s, int64_t C, int64_t P, int G, int Cg, bool silu) {
  constexpr int VEC = Vec<T>::kN;
  const uint32_t CV = static_cast<uint32_t>(C / VEC);
  const uint32_t total = static_cast<uint32_t>(P) * CV;
  const int64_t n = blockIdx.y;
  const float* st = stats + n * G * 2;
  for (uint32_t i = blockIdx.x * kBlock + threadIdx.x; i < total; i += gridDim.x * kBlock) {
    const int64_t p = i / CV;
    const int64_t c0 = static_cast<int64_t>(i % CV) * VEC;
    float v[VEC];
    src.vec(n, c0, p, skip_vec, v);
    const int64_t off = n * src.x_sn + c0 + p * src.x_sp;
    if (kSkip && s) {
      Pack<T> sv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) sv.v[j] = from_f<T>(v[j]);
      store_pack(s + off, sv);
    }
    Pack<T> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = c0 + j;
      const int g = static_cast<int>(c / Cg);
      const float mean = st[g * 2], rstd = st[g * 2 + 1];
      const float o = (v[j] - mean) * rstd * load_param(gamma, pdt, c) + load_param(beta, pdt, c);
      out.v[j] = from_f<T>(maybe_silu(o, silu));
    }
    store_pack(y + off, out);
  }
}

// Apply, scalar path (any strides). 1-D grid-stride over N*C*P elements; pfast as in stats.
template <typename T, bool kSkip>
__global__ void __launch_bounds__(kBlock)
    apply_scalar_kernel(Source<T, kSkip> src, bool pfast, const float* __restrict__ stats,
                        const void* __restrict__ gamma, const void* __restrict__ beta, int pdt, T* __restrict__ y,
                        T* __restrict__ s, int64_t N, int64_t C, int64_t P, int G, int Cg, bool silu) {
  const int64_t total = N * C * P;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kBlock) {
    int64_t n, c, p;
    if (pfast) {
      p = e % P;
      c = (e / P) % C;
      n = e / (P * C);
    } else {
      c = e % C;
      p = (e / C) % P;
      n = e / (P * C);
    }
    const float v = src.at(n, c, p);
    const int64_t off = n * src.x_sn + c * src.x_sc + p * src.x_sp;
    if (kSkip && s) s[off] = from_f<T>(v);
    const int64_t g = c / Cg;
    const float mean = stats[(n * G + g) * 2], rstd = stats[(n * G + g) * 2 + 1];
    const float o = (v - mean) * rstd * load_param(gamma, pdt, c) + load_param(beta, pdt, c);
    y[off] = from_f<T>(maybe_silu(o, silu));
  }
}

template <bool kSkip>
Status launch(const GroupNormArgs& a, cudaStream_t stream) {
  const char* name = kSkip ? "skip_group_norm_cuda" : "group_norm_cuda";
  Status st = validate(a, kSkip);
  if (!st.ok() || a.N == 0 || a.P == 0) return st;
  if (a.workspace == nullptr)
    return Status::Invalid(std::string(name) + ": workspace is null (size it with group_norm_workspace_bytes)");
  if (a.N > kMaxGridY || a.groups > kMaxGridY)
    return Status::Unsupported(std::string(name) + ": N or groups too large");
  const int G = static_cast<int>(a.groups);
  const int Cg = static_cast<int>(a.C / a.groups);
  const Plan pl = plan(a.C, a.P);
  float* ws = static_cast<float*>(a.workspace);
  float* stats = ws + a.N * pl.chunks * a.groups * 2;

  return with_dtype(a.dtype, [&](auto tag) -> Status {
    using T = decltype(tag);
    constexpr int VEC = Vec<T>::kN;
    Source<T, kSkip> src{static_cast<const T*>(a.x),
                         static_cast<const T*>(a.skip),
                         kSkip ? a.bias : nullptr,
                         static_cast<int>(a.bias_dtype),
                         a.x_sn,
                         a.x_sc,
                         a.x_sp,
                         a.skip_sn,
                         a.skip_sc,
                         a.skip_sp};
    T* y = static_cast<T*>(a.y);
    T* s = kSkip ? static_cast<T*>(a.s) : nullptr;
    const int pdt = static_cast<int>(a.param_dtype);

    const int64_t CV = a.C / VEC;
    const int64_t rows = CV > 0 ? kBlock / std::min<int64_t>(CV, kBlock) : 0;
    const int64_t smem = 2 * rows * a.C * 4;
    const bool vec = a.x_sc == 1 && a.C % VEC == 0 && (a.N == 1 || a.x_sn % VEC == 0) &&
                     (a.P == 1 || a.x_sp % VEC == 0) && aligned16(a.x) && aligned16(a.y) &&
                     (s == nullptr || aligned16(s)) && a.P * CV < (int64_t{1} << 31) && smem <= kStatsSmemMax;
    const bool skip_vec = kSkip && a.skip_sc == 1 && (a.N == 1 || a.skip_sn % VEC == 0) &&
                          (a.P == 1 || a.skip_sp % VEC == 0) && aligned16(a.skip);
    const bool pfast = a.x_sp <= a.x_sc;
    // The scalar path reads one group per block: give each block ~8192 elements with longer chunks
    // (never more chunks than the workspace was sized for).
    const int64_t ppc = vec ? pl.ppc : std::max<int64_t>(pl.ppc, ceil_div(8192, Cg));
    const int chunks = static_cast<int>(vec ? pl.chunks : ceil_div(a.P, ppc));

    if (vec) {
      stats_vec_kernel<T, kSkip><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(a.N)), kBlock, smem,
                                   stream>>>(src, skip_vec, ws, a.C, a.P, G, Cg, ppc, chunks);
    } else {
      stats_scalar_kernel<T, kSkip>
          <<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(G), static_cast<unsigned>(a.N)), kBlock, 0,
             stream>>>(src, pfast, ws, a.P, Cg, ppc, chunks);
    }
    Status ls = launch_status(name);
    if (!ls.ok()) return ls;

    const int64_t warps = a.N * a.groups;
    finalize_kernel<T, kSkip><<<static_cast<unsigned>(ceil_div(warps * 32, kBlock)), kBlock, 0, stream>>>(
        src, ws, stats, a.N, a.P, G, Cg, ppc, chunks, a.eps);
    ls = launch_status(name);
    if (!ls.ok()) return ls;

    if (vec) {
      const int64_t blocks = std::min<int64_t>(ceil_div(a.P * CV, kBlock), 8192);
      apply_vec_kernel<T, kSkip><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(a.N)), kBlock, 0,
                                   stream>>>(src, skip_vec, stats, a.gamma, a.beta, pdt, y, s, a.C, a.P, G, Cg,
                                             a.silu);
    } else {
      const int64_t blocks = std::min<int64_t>(ceil_div(a.N * a.C * a.P, kBlock), 65536);
      apply_scalar_kernel<T, kSkip><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
          src, pfast, stats, a.gamma, a.beta, pdt, y, s, a.N, a.C, a.P, G, Cg, a.silu);
    }
    return launch_status(name);
  });
}

}  // namespace gn
}  // namespace cuda
}  // namespace sdkern
