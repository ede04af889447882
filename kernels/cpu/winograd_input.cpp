// Winograd F(2x2, 3x3) input transform on CPU, float32: V[4a+b][t][c] = (Bt d B)[a][b] for every 4x4 tile d
// of the zero-padded channels-last input x (tiling and layouts: sdkern/winograd.h).
//
// One pass over x and V, one OpenMP parallel region, nothing allocated. Work items are (tile, block of kCB
// channels), tile-major, split statically across the threads (a thread gets a run of consecutive tiles).
// Per item: 16 source pointers (the tile's 4x4 pixels, channel 0) and 16 destination rows V[k][t]; the loop
// over the block's channels is `#pragma omp simd` straight-line code (16 loads, 32 adds/subs, 16 stores per
// channel) that this file's per-ISA builds vectorise 16 lanes wide (AVX-512) or 8 (AVX2).
// Interior tiles run without bound checks; a tile touching the border (the padding; the missing row/column
// of a partial tile when H or W is odd) replaces its outside pixels by zeros with a select from a valid
// address (never a multiply by zero), so NaN/Inf of x reach exactly the tiles that contain them.
// The additions follow the order of the torch reference (sdkern/patch/winograd.py: rows, then columns),
// so V is bit-identical to it.
#include <cstdint>

#include "isa.h"
#include "sdkern/winograd.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace {

constexpr int64_t kCB = 64;                      // channels per work item (4 AVX-512 vectors)
constexpr int64_t kParallelMin = int64_t{1} << 16;  // V elements below which one thread does it all

struct F4 {
  float e0, e1, e2, e3;
};

// Bt applied to (d0, d1, d2, d3); Bt = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]].
inline F4 bt(float d0, float d1, float d2, float d3) { return {d0 - d2, d1 + d2, d2 - d1, d1 - d3}; }

inline float keep(bool in, float v) { return in ? v : 0.0f; }

// One tile, channels [c0, c1).
//   src[4i+j]: pixel (i, j) of the tile at channel 0 (a valid address even for a pixel outside the image,
//              whose bit (4i+j) of `inside` is then 0 and which reads as zero);
//   v:         V[0][t] at channel 0; V[k][t] is at v + k*tc (tc = T*C).
template <bool kEdge>
inline void input_tile(const float* const* src, uint32_t inside, float* __restrict v, int64_t tc, int64_t c0,
                       int64_t c1) {
  const float* s[16];
  for (int k = 0; k < 16; ++k) s[k] = src[k];
  // the load is unconditional (every s[k] is a valid address), the zero a select: vectorises as load + blend
#define SDKERN_WI_LD(k) keep(!kEdge || ((inside >> (k)) & 1u), s[k][c])
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) {
    // rows: Bt over the tile's row index i, one column j at a time
    const F4 r0 = bt(SDKERN_WI_LD(0), SDKERN_WI_LD(4), SDKERN_WI_LD(8), SDKERN_WI_LD(12));
    const F4 r1 = bt(SDKERN_WI_LD(1), SDKERN_WI_LD(5), SDKERN_WI_LD(9), SDKERN_WI_LD(13));
    const F4 r2 = bt(SDKERN_WI_LD(2), SDKERN_WI_LD(6), SDKERN_WI_LD(10), SDKERN_WI_LD(14));
    const F4 r3 = bt(SDKERN_WI_LD(3), SDKERN_WI_LD(7), SDKERN_WI_LD(11), SDKERN_WI_LD(15));
    // columns: Bt over j for each transformed row a (rj.ea = row a, column j)
    const F4 v0 = bt(r0.e0, r1.e0, r2.e0, r3.e0);
    const F4 v1 = bt(r0.e1, r1.e1, r2.e1, r3.e1);
    const F4 v2 = bt(r0.e2, r1.e2, r2.e2, r3.e2);
    const F4 v3 = bt(r0.e3, r1.e3, r2.e3, r3.e3);
    v[0 * tc + c] = v0.e0, v[1 * tc + c] = v0.e1, v[2 * tc + c] = v0.e2, v[3 * tc + c] = v0.e3;
    v[4 * tc + c] = v1.e0, v[5 * tc + c] = v1.e1, v[6 * tc + c] = v1.e2, v[7 * tc + c] = v1.e3;
    v[8 * tc + c] = v2.e0, v[9 * tc + c] = v2.e1, v[10 * tc + c] = v2.e2, v[11 * tc + c] = v2.e3;
    v[12 * tc + c] = v3.e0, v[13 * tc + c] = v3.e1, v[14 * tc + c] = v3.e2, v[15 * tc + c] = v3.e3;
  }
#undef SDKERN_WI_LD
}

}  // namespace

Status winograd_input(const WinogradInputArgs& a) {
  const int64_t N = a.N, C = a.C, H = a.H, W = a.W;
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, T = N * TH * TW;
  if (T == 0) return Status::Ok();
  const float* x = static_cast<const float*>(a.x);  // (N, C, H, W), channel stride 1
  float* v = static_cast<float*>(a.v);              // (16, T, C) contiguous
  const int64_t sn = a.x_sn, sh = a.x_sh, sw = a.x_sw;
  const int64_t nb = (C + kCB - 1) / kCB, items = T * nb, tc = T * C;
#pragma omp parallel for schedule(static) if (16 * tc >= kParallelMin)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t t = it / nb, c0 = (it % nb) * kCB, c1 = c0 + kCB < C ? c0 + kCB : C;
    const int64_t n = t / (TH * TW), ty = (t / TW) % TH, tx = t % TW;
    const float* img = x + n * sn;
    const float* anchor = img + 2 * ty * sh + 2 * tx * sw;  // pixel (2ty, 2tx): inside the image for every tile
    const float* src[16];
    uint32_t inside = 0;
    for (int i = 0; i < 4; ++i) {
      const int64_t h = 2 * ty - 1 + i;
      for (int j = 0; j < 4; ++j) {
        const int64_t w = 2 * tx - 1 + j;
        const bool in = h >= 0 && h < H && w >= 0 && w < W;
        src[4 * i + j] = in ? img + h * sh + w * sw : anchor;
        inside |= static_cast<uint32_t>(in) << (4 * i + j);
      }
    }
    float* vt = v + t * C;
    if (inside == 0xffffu) {
      input_tile<false>(src, inside, vt, tc, c0, c1);
    } else {
      input_tile<true>(src, inside, vt, tc, c0, c1);
    }
  }
  return Status::Ok();
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
