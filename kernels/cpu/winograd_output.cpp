// Winograd F(2x2, 3x3) output transform on CPU, float32, fused with the convolution's epilogue:
// y[2x2 tile t] = At M_t A (+ bias) (+ other), M_t[a][b] = M[4a+b][t] (tiling and layouts: sdkern/winograd.h).
//
// One pass over M and y, one OpenMP parallel region, nothing allocated. Work items are (tile, block of kCB
// output channels), tile-major, split statically across the threads. Per item: 16 source rows M[k][t], up to
// 4 destination pixels of the channels-last y (and of `other`); the loop over the block's channels is
// `#pragma omp simd` straight-line code (16 loads, 24 adds/subs, then bias and residual: 4 + 4 adds, 4 stores
// per channel), vectorised 16 lanes wide (AVX-512) or 8 (AVX2) by this file's per-ISA builds.
// Partial tiles (odd H or W: the tile's second row and/or column lies outside the image) store only the
// pixels inside; their `other` pointers are clamped to a valid pixel and the value is never stored.
// Additions follow the order of the torch reference (sdkern/patch/winograd.py: At over rows, then columns,
// then + bias, then + other), so y is bit-identical to it.
#include <cstdint>

#include "isa.h"
#include "sdkern/winograd.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace {

constexpr int64_t kCB = 64;                         // output channels per work item (4 AVX-512 vectors)
constexpr int64_t kParallelMin = int64_t{1} << 16;  // M elements below which one thread does it all

struct F2 {
  float e0, e1;
};

// At applied to (m0, m1, m2, m3); At = [[1,1,1,0],[0,1,-1,-1]].
inline F2 at(float m0, float m1, float m2, float m3) { return {(m0 + m1) + m2, (m1 - m2) - m3}; }

// One tile, output channels [c0, c1).
//   m:    M[0][t] at channel 0; M[k][t] at m + k*tk (tk = T*K);
//   bias: [K] (kBias);
//   oth:  other at pixels (p, q) = (0,0), (0,1), (1,0), (1,1) of the tile, channel 0 (kOther; valid addresses);
//   y:    y at the same pixels, channel 0; pixel i is stored only when bit i of `inside` is set (kEdge).
template <bool kBias, bool kOther, bool kEdge>
inline void output_tile(const float* __restrict m, int64_t tk, const float* __restrict bias, const float* const* oth,
                        float* const* y, uint32_t inside, int64_t c0, int64_t c1) {
  const float *o0 = oth[0], *o1 = oth[1], *o2 = oth[2], *o3 = oth[3];
  float *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) {
    // rows: At over a for each column b (sb.ep = row p of At M, column b)
    const F2 s0 = at(m[0 * tk + c], m[4 * tk + c], m[8 * tk + c], m[12 * tk + c]);
    const F2 s1 = at(m[1 * tk + c], m[5 * tk + c], m[9 * tk + c], m[13 * tk + c]);
    const F2 s2 = at(m[2 * tk + c], m[6 * tk + c], m[10 * tk + c], m[14 * tk + c]);
    const F2 s3 = at(m[3 * tk + c], m[7 * tk + c], m[11 * tk + c], m[15 * tk + c]);
    // columns: At over b
    const F2 r0 = at(s0.e0, s1.e0, s2.e0, s3.e0);
    const F2 r1 = at(s0.e1, s1.e1, s2.e1, s3.e1);
    float p00 = r0.e0, p01 = r0.e1, p10 = r1.e0, p11 = r1.e1;
    if constexpr (kBias) {
      const float b = bias[c];
      p00 += b, p01 += b, p10 += b, p11 += b;
    }
    if constexpr (kOther) p00 += o0[c], p01 += o1[c], p10 += o2[c], p11 += o3[c];
    y0[c] = p00;  // pixel (0, 0) is inside the image for every tile
    if (!kEdge || (inside & 2u)) y1[c] = p01;
    if (!kEdge || (inside & 4u)) y2[c] = p10;
    if (!kEdge || (inside & 8u)) y3[c] = p11;
  }
}

template <bool kBias, bool kOther>
void output_all(const WinogradOutputArgs& a) {
  const int64_t N = a.N, K = a.K, H = a.H, W = a.W;
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, T = N * TH * TW;
  const float* m = static_cast<const float*>(a.m);          // (16, T, K) contiguous
  const float* bias = static_cast<const float*>(a.bias);    // [K] or null
  const float* other = static_cast<const float*>(a.other);  // (N, K, H, W), channel stride 1, or null
  float* y = static_cast<float*>(a.y);                      // (N, K, H, W) channels-last contiguous
  const int64_t nb = (K + kCB - 1) / kCB, items = T * nb, tk = T * K;
#pragma omp parallel for schedule(static) if (16 * tk >= kParallelMin)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t t = it / nb, c0 = (it % nb) * kCB, c1 = c0 + kCB < K ? c0 + kCB : K;
    const int64_t n = t / (TH * TW), ty = (t / TW) % TH, tx = t % TW;
    const int64_t h0 = 2 * ty, w0 = 2 * tx;
    const bool row1 = h0 + 1 < H, col1 = w0 + 1 < W;
    const uint32_t inside = 1u | (col1 ? 2u : 0u) | (row1 ? 4u : 0u) | (row1 && col1 ? 8u : 0u);
    float* yp[4];
    const float* op[4] = {nullptr, nullptr, nullptr, nullptr};
    for (int i = 0; i < 4; ++i) {
      const int64_t h = h0 + ((i >> 1) && row1 ? 1 : 0), w = w0 + ((i & 1) && col1 ? 1 : 0);  // clamped inside
      yp[i] = y + ((n * H + h) * W + w) * K;
      if (kOther) op[i] = other + n * a.o_sn + h * a.o_sh + w * a.o_sw;
    }
    const float* mt = m + t * K;
    if (inside == 0xfu) {
      output_tile<kBias, kOther, false>(mt, tk, bias, op, yp, inside, c0, c1);
    } else {
      output_tile<kBias, kOther, true>(mt, tk, bias, op, yp, inside, c0, c1);
    }
  }
}

}  // namespace

Status winograd_output(const WinogradOutputArgs& a) {
  if (winograd_tiles(a.N, a.H, a.W) == 0) return Status::Ok();
  const bool bias = a.bias != nullptr, other = a.other != nullptr;
  if (bias && other) {
    output_all<true, true>(a);
  } else if (bias) {
    output_all<true, false>(a);
  } else if (other) {
    output_all<false, true>(a);
  } else {
    output_all<false, false>(a);
  }
  return Status::Ok();
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
