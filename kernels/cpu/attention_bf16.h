// Attention on CPU, bf16 I/O on AVX512-BF16 CPUs (attention.cpp): q k^T and P V with vdpbf16ps.
// Included by attention.cpp only; below the avx512bf16 ISA level it only defines kBf16Dot = false.
#pragma once

#include <cstring>

#include "attention_tiles.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace attn {

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// ---------------------------------------------------------------------------------------------
// bf16 I/O on AVX512-BF16: q k^T and P V with vdpbf16ps (two bf16 products per fp32 lane).
// q, k, v are used exactly as given (bf16 products are exact in fp32); only P is rounded to bf16
// for the P V product, as bf16 GEMM-based attention does. Softmax, sums and O stay fp32.
// Layouts (uint16 elements, pairs read as one 32-bit lane):
//   kp2[panel][D2][W][2]  pair (k[j][2i], k[j][2i+1]) of key j = panel*W + w, D2 = ceil(D/2)
//   vp2[Skp/2][Dvp][2]    pair (v[2i][c], v[2i+1][c])
//   q2[kBM][D2][2], p2[kR][kBN]
// ---------------------------------------------------------------------------------------------
inline __m512i bcast_pair(const uint16_t* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
  return _mm512_set1_epi32(static_cast<int32_t>(u));
}
inline __m512 dp(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// s[r][p*W + w] = qscale * sum_d q[r][d] k[key][d] for kR rows, NP panels.
//   q2: (kR, D2) pairs; kp2: NP panels of (D2, W) pairs; s: (kR, ldS) fp32
template <int NP>
inline void qk_block_bf16(const uint16_t* q2, const uint16_t* kp2, float* s, int64_t D2, int64_t ldS, float qscale) {
  V acc[kR][NP];
  for (int r = 0; r < kR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = vzero();
  for (int64_t i = 0; i < D2; ++i) {
    __m512i kv[NP];
    for (int p = 0; p < NP; ++p) kv[p] = _mm512_loadu_si512(kp2 + ((p * D2 + i) * W) * 2);
    for (int r = 0; r < kR; ++r) {
      const __m512i qb = bcast_pair(q2 + (r * D2 + i) * 2);
      for (int p = 0; p < NP; ++p) acc[r][p] = dp(acc[r][p], qb, kv[p]);
    }
  }
  const V sc = vbcast(qscale);
  for (int r = 0; r < kR; ++r)
    for (int p = 0; p < NP; ++p) vstore(s + r * ldS + p * W, vmul(acc[r][p], sc));
}

// o[r][c*W..] = o * alpha[r] + sum_j p[r][j] v[j][c*W..] over n keys (n even) for kR rows, CB vectors.
//   o: (kR, ldO) fp32; p2: (kR, ldP) bf16; vp2: (n/2, ldV, 2) bf16 pairs (offset to the first vector)
template <int CB>
inline void pv_block_bf16(float* o, int64_t ldO, const uint16_t* p2, int64_t ldP, const uint16_t* vp2, int64_t ldV,
                          int64_t n, const float* alpha) {
  V acc[kR][CB];
  for (int r = 0; r < kR; ++r) {
    const V a = vbcast(alpha[r]);
    for (int c = 0; c < CB; ++c) acc[r][c] = vmul(vload(o + r * ldO + c * W), a);
  }
  for (int64_t j2 = 0; j2 < n / 2; ++j2) {
    __m512i vv[CB];
    for (int c = 0; c < CB; ++c) vv[c] = _mm512_loadu_si512(vp2 + (j2 * ldV + c * W) * 2);
    for (int r = 0; r < kR; ++r) {
      const __m512i pb = bcast_pair(p2 + r * ldP + 2 * j2);
      for (int c = 0; c < CB; ++c) acc[r][c] = dp(acc[r][c], pb, vv[c]);
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < CB; ++c) vstore(o + r * ldO + c * W, acc[r][c]);
}

inline void pack_kv_bf16(const AttentionArgs& a, int64_t b, int64_t h, Scratch& sc) {
  const uint16_t* k = static_cast<const uint16_t*>(a.k) + b * a.k_sb + h * a.k_sh;  // (Sk, D) rows k_ss apart
  const uint16_t* v = static_cast<const uint16_t*>(a.v) + b * a.v_sb + h * a.v_sh;  // (Sk, Dv) rows v_ss apart
  const int64_t Sk = a.Sk, D = a.D, Dv = a.Dv, D2 = (D + 1) / 2;
  const int64_t Skp = round_up(Sk, W), Dvp = round_up(Dv, W);
  uint16_t* kp = sc.kp2;
  uint16_t* vp = sc.vp2;
  for (int64_t j = 0; j < Skp; ++j) {
    uint16_t* kdst = kp + ((j / W) * D2 * W + (j % W)) * 2;  // lane j%W of panel j/W
    uint16_t* vdst = vp + ((j / 2) * Dvp) * 2 + (j % 2);     // element j%2 of the key pair j/2
    if (j < Sk) {
      const uint16_t* kr = k + j * a.k_ss;
      const uint16_t* vr = v + j * a.v_ss;
      for (int64_t d = 0; d < D; ++d) kdst[(d / 2) * W * 2 + (d % 2)] = kr[d];
      if (D % 2) kdst[(D / 2) * W * 2 + 1] = 0;
      for (int64_t c = 0; c < Dv; ++c) vdst[c * 2] = vr[c];
      for (int64_t c = Dv; c < Dvp; ++c) vdst[c * 2] = 0;
    } else {
      for (int64_t d = 0; d < 2 * D2; ++d) kdst[(d / 2) * W * 2 + (d % 2)] = 0;
      for (int64_t c = 0; c < Dvp; ++c) vdst[c * 2] = 0;
    }
  }
}

inline void attention_block_bf16(const AttentionArgs& a, int64_t b, int64_t h, int64_t s0, int64_t rows, Scratch& sc) {
  const int64_t D = a.D, Dv = a.Dv, D2 = (D + 1) / 2;
  const int64_t Dvp = round_up(Dv, W), nvec = Dvp / W;
  const int64_t rows_p = round_up(rows, kR);
  const float qscale = a.scale * 1.4426950408889634f;  // log2(e): softmax via exp2

  const uint16_t* q = static_cast<const uint16_t*>(a.q) + b * a.q_sb + h * a.q_sh + s0 * a.q_ss;
  uint16_t* q2 = sc.q2;
  for (int64_t r = 0; r < rows_p; ++r) {
    uint16_t* dst = q2 + r * D2 * 2;
    if (r < rows) {
      std::memcpy(dst, q + r * a.q_ss, D * sizeof(uint16_t));
      if (D % 2) dst[D] = 0;
    } else {
      std::memset(dst, 0, D2 * 2 * sizeof(uint16_t));
    }
  }
  float* o = sc.o;
  float m[kBM], l[kBM];
  start_rows(o, rows_p, Dvp, m, l);

  float* s = sc.s;
  uint16_t* p2 = sc.p2;
  const uint16_t* kp = sc.kp2;
  const uint16_t* vp = sc.vp2;
  const int64_t kend = key_limit(a, s0, rows - 1, rows);  // keys any row of the block sees
  for (int64_t j0 = 0; j0 < kend; j0 += kBN) {
    const int64_t nkp = std::min(kBN, round_up(kend - j0, W));  // multiple of W (even)
    const int64_t np = nkp / W;
    const uint16_t* kt = kp + (j0 / W) * D2 * W * 2;
    const uint16_t* vt = vp + (j0 / 2) * Dvp * 2;
    for (int64_t r0 = 0; r0 < rows_p; r0 += kR) {
      const uint16_t* qr = q2 + r0 * D2 * 2;
      int64_t p = 0;
      for (; p + kNP <= np; p += kNP) qk_block_bf16<kNP>(qr, kt + p * D2 * W * 2, s + p * W, D2, kBN, qscale);
      for (; p < np; ++p) qk_block_bf16<1>(qr, kt + p * D2 * W * 2, s + p * W, D2, kBN, qscale);
      float alpha[kR];
      int64_t nvalid[kR];
      tile_valid(a, s0, r0, rows, j0, nkp, nvalid);
      softmax_rows(s, kBN, nkp, nvalid, m + r0, l + r0, alpha);
      // P -> bf16 (round to nearest even), 16 keys at a time.
      for (int r = 0; r < kR; ++r)
        for (int64_t j = 0; j < nkp; j += W)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(p2 + r * kBN + j),
                              (__m256i)_mm512_cvtneps_pbh(vload(s + r * kBN + j)));
      int64_t c = 0;
      float* orow = o + r0 * Dvp;
      for (; c + kCB <= nvec; c += kCB) pv_block_bf16<kCB>(orow + c * W, Dvp, p2, kBN, vt + c * W * 2, Dvp, nkp, alpha);
      if (nvec - c == 1) pv_block_bf16<1>(orow + c * W, Dvp, p2, kBN, vt + c * W * 2, Dvp, nkp, alpha);
      if (nvec - c == 2) pv_block_bf16<2>(orow + c * W, Dvp, p2, kBN, vt + c * W * 2, Dvp, nkp, alpha);
    }
  }

  finish_rows<bf16_t>(a, b, h, s0, rows, o, Dvp, l);
}
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

}  // namespace attn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
