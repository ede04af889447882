// Attention on CPU (attention.cpp): tile sizes, the per-thread scratch layout, causal key limits and
// the fp32 micro-kernels (S = q k^T, online softmax, O = O*alpha + P V) on simd.h's vectors.
// Included by attention.cpp only, so compiled once per ISA level like it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "sdkern/attention.h"
#include "simd.h"
#include "vec_math.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace attn {

// Register blocking of the micro-kernels, from the number of vector registers (AVX-512: 32, AVX2: 16).
#if defined(SDKERN_SIMD_AVX512)
constexpr int kR = 8;   // query rows per micro-kernel
constexpr int kNP = 2;  // key panels (of W keys) per q k^T micro-kernel: kR*kNP = 16 accumulators
constexpr int kCB = 3;  // Dv vectors per P V micro-kernel: kR*kCB = 24 accumulators
#elif defined(SDKERN_SIMD_AVX2)
constexpr int kR = 4;
constexpr int kNP = 2;  // 8 accumulators
constexpr int kCB = 3;  // 12 accumulators
#else
constexpr int kR = 4;
constexpr int kNP = 2;
constexpr int kCB = 2;
#endif

constexpr int64_t kBM = 64;   // query rows per task (multiple of kR)
constexpr int64_t kBN = 128;  // keys per tile (multiple of W)
static_assert(kBM % kR == 0 && kBN % W == 0, "tile sizes");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Micro-kernels
// ---------------------------------------------------------------------------------------------

// s[r][p*W + w] = sum_d q[r][d] * kp[p][d][w] for kR rows and NP panels.
//   q:  (kR, D) fp32 rows, row stride D
//   kp: NP consecutive panels, each (D, W) fp32
//   s:  (kR, ldS) fp32 output
template <int NP>
inline void qk_block(const float* q, const float* kp, float* s, int64_t D, int64_t ldS) {
  V acc[kR][NP];
  for (int r = 0; r < kR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    V kv[NP];
    for (int p = 0; p < NP; ++p) kv[p] = vload(kp + (p * D + d) * W);
    for (int r = 0; r < kR; ++r) {
      const V qb = vbcast(q[r * D + d]);
      for (int p = 0; p < NP; ++p) acc[r][p] = vfma(qb, kv[p], acc[r][p]);
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int p = 0; p < NP; ++p) vstore(s + r * ldS + p * W, acc[r][p]);
}

// o[r][c*W..] = o[r][c*W..] * alpha[r] + sum_j p[r][j] * vp[j][c*W..] for kR rows, CB vectors.
//   o:     (kR, ldO) fp32 accumulators (already offset to the first vector)
//   p:     (kR, ldP) fp32 probabilities, n keys used
//   vp:    (n, ldV) fp32 packed V (offset to the first vector)
//   alpha: kR rescale factors
template <int CB>
inline void pv_block(float* o, int64_t ldO, const float* p, int64_t ldP, const float* vp, int64_t ldV, int64_t n,
                     const float* alpha) {
  V acc[kR][CB];
  for (int r = 0; r < kR; ++r) {
    const V a = vbcast(alpha[r]);
    for (int c = 0; c < CB; ++c) acc[r][c] = vmul(vload(o + r * ldO + c * W), a);
  }
  for (int64_t j = 0; j < n; ++j) {
    V vv[CB];
    for (int c = 0; c < CB; ++c) vv[c] = vload(vp + j * ldV + c * W);
    for (int r = 0; r < kR; ++r) {
      const V pb = vbcast(p[r * ldP + j]);
      for (int c = 0; c < CB; ++c) acc[r][c] = vfma(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < CB; ++c) vstore(o + r * ldO + c * W, acc[r][c]);
}

// Runs pv_block over all nvec vectors of Dvp in blocks of up to kCB.
inline void pv_rows(float* o, int64_t ldO, const float* p, int64_t ldP, const float* vp, int64_t ldV, int64_t n,
                    const float* alpha, int64_t nvec) {
  int64_t c = 0;
  for (; c + kCB <= nvec; c += kCB) pv_block<kCB>(o + c * W, ldO, p, ldP, vp + c * W, ldV, n, alpha);
  const int64_t rest = nvec - c;
  if (rest == 1) pv_block<1>(o + c * W, ldO, p, ldP, vp + c * W, ldV, n, alpha);
  if (rest == 2) pv_block<2>(o + c * W, ldO, p, ldP, vp + c * W, ldV, n, alpha);
}

// Online softmax update of kR rows of one key tile, in place.
//   s:      (kR, ldS) scores in log2 units; keys [nvalid[r], nkp) of row r are padding or causally
//           masked and get probability 0 (nvalid[r] may be <= 0 for a row that sees none of this
//           tile; every row sees key 0 of the first tile, so its running max is finite by then)
//   m, l:   kR running row maxima and sums (updated)
//   alpha:  kR output rescale factors exp2(m_old - m_new)
inline void softmax_rows(float* s, int64_t ldS, int64_t nkp, const int64_t* nvalid, float* m, float* l,
                         float* alpha) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < kR; ++r) {
    float* sr = s + r * ldS;
    for (int64_t j = std::max<int64_t>(nvalid[r], 0); j < nkp; ++j) sr[j] = kNegInf;
    V mx = vload(sr);
    for (int64_t j = W; j < nkp; j += W) mx = vmax(mx, vload(sr + j));
    const float mold = m[r];
    const float mnew = std::max(mold, hmax(mx));
    alpha[r] = mold == kNegInf ? 0.f : std::exp2(mold - mnew);  // first tile: O and l are zero
    const V mb = vbcast(mnew);
    V sum = vzero();
    // vm::exp2 clamps its argument at -126: masked keys get exactly 0 below (not 2^-126), so a key a row
    // must not see contributes nothing at all, whatever its value.
    const int64_t nv = std::min(std::max<int64_t>(nvalid[r], 0), nkp);
    const int64_t jfull = nv / W * W;
    for (int64_t j = 0; j < jfull; j += W) {
      const V e = vm::exp2(vsub(vload(sr + j), mb));
      vstore(sr + j, e);
      sum = vadd(sum, e);
    }
    for (int64_t j = jfull; j < nkp; j += W) {
      vstore(sr + j, vm::exp2(vsub(vload(sr + j), mb)));
      for (int64_t t = std::max(j, nv); t < j + W; ++t) sr[t] = 0.f;
      sum = vadd(sum, vload(sr + j));
    }
    l[r] = l[r] * alpha[r] + hsum(sum);
    m[r] = mnew;
  }
}

// Before the first key tile of a query block: O = 0, running maxima -inf and sums 0 of rows_p rows.
//   o: (rows_p, Dvp) fp32 accumulators; m, l: [rows_p]
inline void start_rows(float* o, int64_t rows_p, int64_t Dvp, float* m, float* l) {
  std::fill(o, o + rows_p * Dvp, 0.f);
  for (int64_t r = 0; r < rows_p; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.f;
}

// After the last tile: o = O / l for rows [s0, s0 + rows) of head (b, h), into a.o ((B, Sq, H, Dv)
// contiguous, storage type T). o: (rows, Dvp) fp32 accumulators; l: [rows] row sums.
template <typename T>
inline void finish_rows(const AttentionArgs& a, int64_t b, int64_t h, int64_t s0, int64_t rows, const float* o,
                        int64_t Dvp, const float* l) {
  const int64_t Dv = a.Dv;
  T* out = static_cast<T*>(a.o) + ((b * a.Sq + s0) * a.H + h) * Dv;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / l[r];
    const float* src = o + r * Dvp;
    T* dst = out + r * a.H * Dv;
    for (int64_t d = 0; d < Dv; ++d) dst[d] = from_f32<T>(src[d] * inv);
  }
}

// ---------------------------------------------------------------------------------------------
// Per-thread scratch: one slot per team member, carved from one buffer that the calling thread
// allocates before the parallel region (an allocation failure is reported as a Status, never thrown
// inside the region). The buffer is kept for the next call while it is at most
// kAttentionScratchKeepBytesPerThread per thread of the team, released after the call otherwise; a
// call whose scratch would exceed attention_scratch_limit_bytes() runs on fewer threads or is
// refused (see sdkern/attention.h).
// ---------------------------------------------------------------------------------------------
struct Scratch {
  float *kp = nullptr, *vp = nullptr;  // packed K (panels) and V (rows) of one (batch, head)
  float *q = nullptr, *o = nullptr;    // (kBM, D) scaled q, (kBM, Dvp) accumulators
  float* s = nullptr;                  // (kR, kBN) scores / probabilities
  // bf16 dot-product path (AVX512-BF16, bf16 I/O): element pairs packed as uint16 [2].
  uint16_t *kp2 = nullptr, *vp2 = nullptr, *q2 = nullptr, *p2 = nullptr;
  int64_t b = -1, h = -1;  // which (b, h) the packed K, V belong to (this call only)
};

// Bytes of one thread's slot, every array rounded up to 64 bytes.
struct SlotLayout {
  int64_t kp = 0, vp = 0, q = 0, o = 0, s = 0, kp2 = 0, vp2 = 0, q2 = 0, p2 = 0;  // element counts
  int64_t bytes = 0;
};

inline int64_t pad64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// Keys row r of a query block starting at s0 sees: all Sk, or (causal) s0 + r + Sk - Sq + 1. Padding
// rows (r >= rows) take the last real row's limit, so they never see an empty row.
inline int64_t key_limit(const AttentionArgs& a, int64_t s0, int64_t r, int64_t rows) {
  if (!a.causal) return a.Sk;
  return std::min(a.Sk, s0 + std::min(r, rows - 1) + (a.Sk - a.Sq) + 1);
}

// Per-row valid key counts of one tile starting at key j0 for rows [r0, r0 + kR).
inline void tile_valid(const AttentionArgs& a, int64_t s0, int64_t r0, int64_t rows, int64_t j0, int64_t nkp,
                       int64_t* nvalid) {
  for (int r = 0; r < kR; ++r) nvalid[r] = std::min(nkp, key_limit(a, s0, r0 + r, rows) - j0);
}

}  // namespace attn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
