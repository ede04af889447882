// Attention on CPU: o = softmax(q k^T * scale) v per (batch, head), flash-attention style.
//
// Work split: one OpenMP task per (batch, head, block of kBM query rows), dynamic schedule in
// chunks of consecutive query blocks, so a thread mostly stays on one head; problems under a few
// MFLOP run on the calling thread. Per head, each thread packs K and V once into its slot of fp32
// scratch (allocated by the calling thread before the parallel region, bounded and released when
// large: see "Per-thread scratch" below and sdkern/attention.h):
//   K as panels of W keys transposed, kp[panel][d][W] (W = SIMD width), keys past Sk zero;
//   V row-major, vp[key][Dvp] with Dv padded to a multiple of W with zeros.
// Per query block: q is converted to fp32 and pre-multiplied by scale*log2(e) (so softmax uses
// exp2), then for each tile of kBN keys and each group of kR query rows:
//   S = q k^T      register-blocked micro-kernel (kR rows x kNP panels of W keys, FMA over D);
//   online softmax row max m, running sum l, P = exp2(S - m) with a vectorised polynomial;
//   O = O*alpha + P V  register-blocked micro-kernel (kR rows x kCB vectors of Dv, FMA over keys).
// Finally o = O / l converted to the I/O dtype. All accumulation is fp32.
// Causal (a.causal): row i sees keys j < key_limit(i) = i + (Sk - Sq) + 1. A query block stops at the
// last key its last row sees (later tiles and panels, fully masked, are neither computed nor read),
// and softmax_rows masks each row's keys past its own limit; nothing extra is allocated.
// With bf16 I/O on AVX512-BF16 CPUs, q k^T and P V use vdpbf16ps on bf16 pairs instead (q, k, v
// exactly as given; P rounded to bf16 for the P V product), see attention_block_bf16.
//
// The file is compiled once per ISA level: AVX-512 (W=16) and AVX2+FMA (W=8) use intrinsics,
// anything else a portable 4-lane fallback the compiler may vectorise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>

#include "convert.h"
#include "sdkern/attention.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace {

// ---------------------------------------------------------------------------------------------
// Minimal SIMD layer: width W, load/store (aligned or not, full vectors only), broadcast, FMA,
// max, horizontal max/sum and exp2. Private to this file.
// ---------------------------------------------------------------------------------------------

// 2^f on f in [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 7 (relative error < 1e-8).
constexpr float kC1 = 0.6931471805599453f, kC2 = 0.2402265069591007f, kC3 = 0.05550410866482158f,
                kC4 = 0.009618129107628477f, kC5 = 0.0013333558146428443f, kC6 = 1.5403530393381606e-4f,
                kC7 = 1.525273380405984e-5f;
constexpr float kExpLo = -126.0f, kExpHi = 127.0f;  // clamp keeps 2^n a normal float

#if defined(__AVX512F__)
constexpr int W = 16;
using V = __m512;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V x) { _mm512_storeu_ps(p, x); }
inline V vbcast(float x) { return _mm512_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float hmax(V x) { return _mm512_reduce_max_ps(x); }
inline float hsum(V x) { return _mm512_reduce_add_ps(x); }
inline V vexp2(V x) {
  // max/min return their second operand when either is NaN: x second, so NaN stays NaN.
  x = _mm512_min_ps(vbcast(kExpHi), _mm512_max_ps(vbcast(kExpLo), x));
  const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V f = vsub(x, n);
  V p = vfma(vbcast(kC7), f, vbcast(kC6));
  p = vfma(p, f, vbcast(kC5));
  p = vfma(p, f, vbcast(kC4));
  p = vfma(p, f, vbcast(kC3));
  p = vfma(p, f, vbcast(kC2));
  p = vfma(p, f, vbcast(kC1));
  p = vfma(p, f, vbcast(1.0f));
  return _mm512_scalef_ps(p, n);
}
// Register blocking: 32 zmm registers.
constexpr int kR = 8;   // query rows per micro-kernel
constexpr int kNP = 2;  // key panels (of W keys) per q k^T micro-kernel: kR*kNP = 16 accumulators
constexpr int kCB = 3;  // Dv vectors per P V micro-kernel: kR*kCB = 24 accumulators

#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using V = __m256;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V x) { _mm256_storeu_ps(p, x); }
inline V vbcast(float x) { return _mm256_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float hmax(V x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline float hsum(V x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V vexp2(V x) {
  // max/min return their second operand when either is NaN: x second, so NaN stays NaN.
  x = _mm256_min_ps(vbcast(kExpHi), _mm256_max_ps(vbcast(kExpLo), x));
  const V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V f = vsub(x, n);
  V p = vfma(vbcast(kC7), f, vbcast(kC6));
  p = vfma(p, f, vbcast(kC5));
  p = vfma(p, f, vbcast(kC4));
  p = vfma(p, f, vbcast(kC3));
  p = vfma(p, f, vbcast(kC2));
  p = vfma(p, f, vbcast(kC1));
  p = vfma(p, f, vbcast(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return vmul(p, _mm256_castsi256_ps(e));
}
// Register blocking: 16 ymm registers.
constexpr int kR = 4;
constexpr int kNP = 2;  // 8 accumulators
constexpr int kCB = 3;  // 12 accumulators

#else
// Portable fallback: a 4-lane value type; plain loops the compiler may vectorise.
constexpr int W = 4;
struct V {
  float x[W];
};
inline V vzero() { return V{{0.f, 0.f, 0.f, 0.f}}; }
inline V vload(const float* p) {
  V r;
  for (int i = 0; i < W; ++i) r.x[i] = p[i];
  return r;
}
inline void vstore(float* p, V a) {
  for (int i = 0; i < W; ++i) p[i] = a.x[i];
}
inline V vbcast(float s) { return V{{s, s, s, s}}; }
inline V vfma(V a, V b, V c) {
  for (int i = 0; i < W; ++i) c.x[i] += a.x[i] * b.x[i];  // no FMA assumed at this level
  return c;
}
inline V vmul(V a, V b) {
  for (int i = 0; i < W; ++i) a.x[i] *= b.x[i];
  return a;
}
inline V vadd(V a, V b) {
  for (int i = 0; i < W; ++i) a.x[i] += b.x[i];
  return a;
}
inline V vsub(V a, V b) {
  for (int i = 0; i < W; ++i) a.x[i] -= b.x[i];
  return a;
}
inline V vmax(V a, V b) {
  for (int i = 0; i < W; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
  return a;
}
inline float hmax(V a) { return std::max(std::max(a.x[0], a.x[1]), std::max(a.x[2], a.x[3])); }
inline float hsum(V a) { return (a.x[0] + a.x[1]) + (a.x[2] + a.x[3]); }
inline V vexp2(V a) {
  for (int i = 0; i < W; ++i) {
    const float x = std::min(std::max(a.x[i], kExpLo), kExpHi);  // std::max/min keep a NaN first argument
    const float n = std::nearbyint(x);
    const float f = x - n;
    const float p = 1.0f + f * (kC1 + f * (kC2 + f * (kC3 + f * (kC4 + f * (kC5 + f * (kC6 + f * kC7))))));
    const int32_t ni = n == n ? static_cast<int32_t>(n) : 0;  // NaN: p is NaN already; no UB cast
    a.x[i] = p * math::bits_f32(static_cast<uint32_t>(ni + 127) << 23);
  }
  return a;
}
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
    // vexp2 clamps its argument at -126: masked keys get exactly 0 below (not 2^-126), so a key a row
    // must not see contributes nothing at all, whatever its value.
    const int64_t nv = std::min(std::max<int64_t>(nvalid[r], 0), nkp);
    const int64_t jfull = nv / W * W;
    for (int64_t j = 0; j < jfull; j += W) {
      const V e = vexp2(vsub(vload(sr + j), mb));
      vstore(sr + j, e);
      sum = vadd(sum, e);
    }
    for (int64_t j = jfull; j < nkp; j += W) {
      vstore(sr + j, vexp2(vsub(vload(sr + j), mb)));
      for (int64_t t = std::max(j, nv); t < j + W; ++t) sr[t] = 0.f;
      sum = vadd(sum, vload(sr + j));
    }
    l[r] = l[r] * alpha[r] + hsum(sum);
    m[r] = mnew;
  }
}

// ---------------------------------------------------------------------------------------------
// Per-thread scratch: one slot per OpenMP thread, carved from one buffer that the calling thread
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

template <typename T>
void pack_kv(const AttentionArgs& a, int64_t b, int64_t h, Scratch& sc) {
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;  // (Sk, D) rows k_ss apart
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;  // (Sk, Dv) rows v_ss apart
  const int64_t Sk = a.Sk, D = a.D, Dv = a.Dv;
  const int64_t Skp = round_up(Sk, W), Dvp = round_up(Dv, W);
  float* kp = sc.kp;
  float* vp = sc.vp;
  for (int64_t j = 0; j < Skp; ++j) {
    float* kdst = kp + (j / W) * D * W + (j % W);  // column j%W of panel j/W
    float* vdst = vp + j * Dvp;
    if (j < Sk) {
      const T* kr = k + j * a.k_ss;
      const T* vr = v + j * a.v_ss;
      for (int64_t d = 0; d < D; ++d) kdst[d * W] = to_f32(kr[d]);
      for (int64_t d = 0; d < Dv; ++d) vdst[d] = to_f32(vr[d]);
      for (int64_t d = Dv; d < Dvp; ++d) vdst[d] = 0.f;
    } else {
      for (int64_t d = 0; d < D; ++d) kdst[d * W] = 0.f;
      for (int64_t d = 0; d < Dvp; ++d) vdst[d] = 0.f;
    }
  }
}

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

// One task: rows [s0, s0 + rows) of head (b, h).
template <typename T>
void attention_block(const AttentionArgs& a, int64_t b, int64_t h, int64_t s0, int64_t rows, Scratch& sc) {
  const int64_t D = a.D, Dv = a.Dv;
  const int64_t Dvp = round_up(Dv, W), nvec = Dvp / W;
  const int64_t rows_p = round_up(rows, kR);
  const float qscale = a.scale * 1.4426950408889634f;  // log2(e): softmax via exp2

  // q block -> fp32, scaled; padding rows are zero (computed, never stored).
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + s0 * a.q_ss;
  float* qs = sc.q;
  for (int64_t r = 0; r < rows_p; ++r) {
    float* dst = qs + r * D;
    if (r < rows) {
      const T* src = q + r * a.q_ss;
      for (int64_t d = 0; d < D; ++d) dst[d] = to_f32(src[d]) * qscale;
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = 0.f;
    }
  }
  float* o = sc.o;
  std::fill(o, o + rows_p * Dvp, 0.f);
  float m[kBM], l[kBM];
  for (int64_t r = 0; r < rows_p; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.f;

  float* s = sc.s;
  const float* kp = sc.kp;
  const float* vp = sc.vp;
  const int64_t kend = key_limit(a, s0, rows - 1, rows);  // keys any row of the block sees
  for (int64_t j0 = 0; j0 < kend; j0 += kBN) {
    const int64_t nkp = std::min(kBN, round_up(kend - j0, W));  // keys in this tile, multiple of W
    const int64_t np = nkp / W;
    const float* kt = kp + (j0 / W) * D * W;
    for (int64_t r0 = 0; r0 < rows_p; r0 += kR) {
      // S = q k^T for kR rows x nkp keys.
      int64_t p = 0;
      for (; p + kNP <= np; p += kNP) qk_block<kNP>(qs + r0 * D, kt + p * D * W, s + p * W, D, kBN);
      for (; p < np; ++p) qk_block<1>(qs + r0 * D, kt + p * D * W, s + p * W, D, kBN);
      float alpha[kR];
      int64_t nvalid[kR];
      tile_valid(a, s0, r0, rows, j0, nkp, nvalid);
      softmax_rows(s, kBN, nkp, nvalid, m + r0, l + r0, alpha);
      // O = O * alpha + P V.
      pv_rows(o + r0 * Dvp, Dvp, s, kBN, vp + j0 * Dvp, Dvp, nkp, alpha, nvec);
    }
  }

  // o = O / l -> (B, Sq, H, Dv) contiguous output.
  T* out = static_cast<T*>(a.o) + ((b * a.Sq + s0) * a.H + h) * Dv;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / l[r];
    const float* src = o + r * Dvp;
    T* dst = out + r * a.H * Dv;
    for (int64_t d = 0; d < Dv; ++d) dst[d] = from_f32<T>(src[d] * inv);
  }
}

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

void pack_kv_bf16(const AttentionArgs& a, int64_t b, int64_t h, Scratch& sc) {
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

void attention_block_bf16(const AttentionArgs& a, int64_t b, int64_t h, int64_t s0, int64_t rows, Scratch& sc) {
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
  std::fill(o, o + rows_p * Dvp, 0.f);
  float m[kBM], l[kBM];
  for (int64_t r = 0; r < rows_p; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.f;

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

  bf16_t* out = static_cast<bf16_t*>(a.o) + ((b * a.Sq + s0) * a.H + h) * Dv;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / l[r];
    const float* src = o + r * Dvp;
    bf16_t* dst = out + r * a.H * Dv;
    for (int64_t d = 0; d < Dv; ++d) dst[d] = from_f32<bf16_t>(src[d] * inv);
  }
}
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

template <typename T>
constexpr bool uses_bf16_dot() {
  return kBf16Dot && std::is_same<T, bf16_t>::value;
}

template <typename T>
SlotLayout slot_layout(const AttentionArgs& a) {
  const int64_t Skp = round_up(a.Sk, W), Dvp = round_up(a.Dv, W), D2 = (a.D + 1) / 2;
  SlotLayout L;
  L.o = kBM * Dvp;
  L.s = kR * kBN;
  if (!uses_bf16_dot<T>()) {
    L.kp = Skp * a.D, L.vp = Skp * Dvp, L.q = kBM * a.D;
  } else {
    L.kp2 = Skp * D2 * 2, L.vp2 = Skp * Dvp, L.q2 = kBM * D2 * 2, L.p2 = kR * kBN;
  }
  L.bytes = pad64(4 * L.kp) + pad64(4 * L.vp) + pad64(4 * L.q) + pad64(4 * L.o) + pad64(4 * L.s) +
            pad64(2 * L.kp2) + pad64(2 * L.vp2) + pad64(2 * L.q2) + pad64(2 * L.p2) + 64;
  return L;
}

Scratch carve(char* base, const SlotLayout& L) {
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + 63) / 64 * 64);
  Scratch sc;
  auto take = [&p](auto*& dst, int64_t n, int64_t es) {
    using P = std::remove_reference_t<decltype(dst)>;
    dst = n ? reinterpret_cast<P>(p) : nullptr;
    p += pad64(n * es);
  };
  take(sc.kp, L.kp, 4), take(sc.vp, L.vp, 4), take(sc.q, L.q, 4), take(sc.o, L.o, 4), take(sc.s, L.s, 4);
  take(sc.kp2, L.kp2, 2), take(sc.vp2, L.vp2, 2), take(sc.q2, L.q2, 2), take(sc.p2, L.p2, 2);
  return sc;
}

// The calling thread's scratch buffer (shared with its OpenMP team through the pointer). Not
// zero-filled: each thread first touches its own slot (NUMA-local pages, no serial memset).
struct ScratchBuffer {
  std::unique_ptr<char[]> data;
  size_t size = 0;
  void release() { data.reset(), size = 0; }
};
ScratchBuffer& scratch_buffer() {
  static thread_local ScratchBuffer buf;
  return buf;
}

template <typename T>
Status attention_impl(const AttentionArgs& a) {
  const int64_t nqb = (a.Sq + kBM - 1) / kBM;
  const int64_t tasks = a.B * a.H * nqb;
  // Dynamic schedule in chunks of consecutive query blocks: robust to busy or uneven cores, and a
  // thread usually stays on one head (K/V packed once per head and thread).
#if defined(_OPENMP)
  const int64_t threads = omp_get_max_threads();
#else
  const int64_t threads = 1;
#endif
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(4, tasks / (8 * threads)));
  // Small problems run on the calling thread: waking the team costs more than it saves there (and
  // on a busy machine a woken thread can be descheduled for milliseconds before the final barrier).
  const double flops = 2.0 * a.B * a.H * a.Sq * a.Sk * (a.D + a.Dv);
  int64_t nthreads = flops < 4e6 ? 1 : std::min<int64_t>(threads, tasks);

  // Scratch: one slot per thread, within the documented limit (fewer threads if needed).
  const SlotLayout L = slot_layout<T>(a);
  const int64_t limit = static_cast<int64_t>(attention_scratch_limit_bytes());
  if (L.bytes > limit)
    return Status::Unsupported("attention: Sk=" + std::to_string(a.Sk) + " needs " +
                               std::to_string(L.bytes >> 20) + " MiB of K/V scratch per thread, over the limit of " +
                               std::to_string(limit >> 20) + " MiB (SDKERN_ATTENTION_SCRATCH_MB)");
  nthreads = std::max<int64_t>(1, std::min<int64_t>(nthreads, limit / L.bytes));
  ScratchBuffer& buf = scratch_buffer();
  const size_t need = static_cast<size_t>(L.bytes * nthreads);
  if (buf.size < need) {
    buf.release();  // free the old one first: the peak is the new size only
    buf.data.reset(new (std::nothrow) char[need]);
    if (!buf.data)
      return Status::Device("attention: out of memory allocating " + std::to_string(need >> 20) +
                            " MiB of scratch");
    buf.size = need;
  }
  char* const base = buf.data.get();
  (void)chunk;  // unused without OpenMP

#pragma omp parallel num_threads(static_cast<int>(nthreads))
  {
#if defined(_OPENMP)
    const int64_t tid = omp_get_thread_num();
#else
    const int64_t tid = 0;
#endif
    Scratch sc = carve(base + tid * L.bytes, L);
#pragma omp for schedule(dynamic, chunk) nowait  // one barrier (the region end) per call
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / nqb, qb = t % nqb;
      const int64_t b = bh / a.H, h = bh % a.H;
      const int64_t s0 = qb * kBM, rows = std::min(kBM, a.Sq - s0);
      const bool repack = sc.b != b || sc.h != h;
      sc.b = b, sc.h = h;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
      if constexpr (uses_bf16_dot<T>()) {
        if (repack) pack_kv_bf16(a, b, h, sc);
        attention_block_bf16(a, b, h, s0, rows, sc);
        continue;
      }
#endif
      if (repack) pack_kv<T>(a, b, h, sc);
      attention_block<T>(a, b, h, s0, rows, sc);
    }
  }
  // Large (over the keep size per thread of the process's team): give it back.
  if (buf.size > kAttentionScratchKeepBytesPerThread * static_cast<size_t>(threads)) buf.release();
  return Status::Ok();
}

}  // namespace

Status attention(const AttentionArgs& a) {
  if (a.B == 0 || a.Sq == 0 || a.H == 0) return Status::Ok();
  return with_dtype(a.dtype, [&](auto tag) { return attention_impl<decltype(tag)>(a); });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
