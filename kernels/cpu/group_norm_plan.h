// GroupNorm on CPU: the plan of one call (shapes, strides, traversal, work split, scratch) and what
// every phase shares: the fp32 values v = (x + skip) + bias of a pixel row or a channel row, the
// AVX-512 row-kernel input combinations (NhwcMode) and the per-thread scratch.
// Phases: group_norm_stats.h (pivots, shifted sums), group_norm_merge.h (Chan combine, per-channel
// scale and shift), group_norm_normalise.h (y); group_norm_impl.h runs them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "sdkern/group_norm.h"
#include "simd.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace gn {

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

// Scratch owned by the calling thread, reused across calls (grows, never shrinks): no allocation
// on the steady-state path. Shared with the team through the pointer.
inline float* scratch(size_t floats) {
  static thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}
inline double* scratch_f64(size_t doubles) {
  static thread_local std::vector<double> buf;
  if (buf.size() < doubles) buf.resize(doubles);
  return buf.data();
}

// (count, mean, M2) of a block of values; mean relative to the block's pivot K.
struct Moments64 {
  double n, mean, m2;
};

// Which inputs an AVX-512 NHWC row kernel combines, as compile-time bits: a runtime test of a
// loop-invariant pointer in the innermost loop is expensive there, so each combination that occurs is
// its own instantiation (SDKERN_GN_MODES lists them).
enum NhwcMode : int {
  kFullSkip = 1,   // + skip (N, C, P) (channels contiguous)
  kBcastSkip = 2,  // + skip (N, C) broadcast over the pixels (fp32 copy in bsk)
  kBias = 4,       // + bias [C] (fp32 copy)
  kWriteS = 8,     // statistics pass also writes s = (x + skip) + bias
  kFromS = 16,     // normalise pass reads v from s (fp32 with a full skip: one stream instead of two)
};

// The mode combinations that are instantiated (those the two ops produce). The plan takes the row
// kernels only when has_mode() holds for both passes, so with_mode() never sees another one.
#define SDKERN_GN_MODES(X)                                                                               \
  X(0)                                                                                                  \
  X(kFullSkip) X(kFullSkip | kBias) X(kFullSkip | kWriteS) X(kFullSkip | kBias | kWriteS) X(kBcastSkip) \
  X(kBcastSkip | kBias) X(kBcastSkip | kWriteS) X(kBcastSkip | kBias | kWriteS) X(kFullSkip | kFromS)  \
  X(kFullSkip | kBias | kFromS)

inline bool has_mode(int mode) {
  switch (mode) {
#define SDKERN_GN_CASE(M) case (M):
    SDKERN_GN_MODES(SDKERN_GN_CASE)
#undef SDKERN_GN_CASE
    return true;
    default:
      return false;
  }
}

// Call f(std::integral_constant<int, mode>{}) for the runtime mode bits.
template <typename F>
inline void with_mode(int mode, F&& f) {
  switch (mode) {
#define SDKERN_GN_CASE(M) \
  case (M):               \
    return f(std::integral_constant<int, (M)>{});
    SDKERN_GN_MODES(SDKERN_GN_CASE)
#undef SDKERN_GN_CASE
    default:
      return;  // excluded by has_mode() in make_plan()
  }
}

// One GroupNorm / SkipGroupNorm call. Built once by make_plan(); the phases read it (the scratch
// arrays are written through its pointers).
template <typename T>
struct Plan {
  const T* x = nullptr;     // (N, C, P) strides xsn/xsc/xsp
  const T* skip = nullptr;  // (N, C, P) strides ksn/ksc/ksp, or (N, C) broadcast (ksp = 0); null: none
  T* y = nullptr;           // (N, C, P) strides of x
  T* s = nullptr;           // optional (N, C, P) strides of x: (x + skip) + bias
  const void* bias = nullptr;   // [C], dtype bias_dtype (has_bias)
  const void* gamma = nullptr;  // [C], dtype param_dtype
  const void* beta = nullptr;   // [C], dtype param_dtype
  DType bias_dtype = DType::kFloat32, param_dtype = DType::kFloat32;
  int64_t N = 0, C = 0, P = 0, G = 0, cpg = 0;
  int64_t xsn = 0, xsc = 0, xsp = 0, ksn = 0, ksc = 0, ksp = 0;
  float eps = 0.0f;
  bool silu = false;
  bool has_bias = false, bcast = false, full_skip = false;
  bool nhwc = false;      // channels contiguous: pixel rows of C values; else channel rows of P values
  bool flat = false;      // NCHW fused pass per (n, group) (flat_groups in group_norm_impl.h)
  bool reread_s = false;  // the normalise pass reads v from s (fp32 storage with a full skip)
  bool blocked = false;   // NHWC through the AVX-512 row kernels (stats_mode / norm_mode)
  int stats_mode = 0, norm_mode = 0;
  int nt = 1;  // team size (parallel.h)
  int64_t rows_per_chunk = 1, nchunks = 1;  // NHWC: pixels per work item, chunks per image
  int64_t units = 1;                        // partial moments per (n, group)
  int64_t row_len = 0, per_thread = 0;      // per-thread row buffer length and slot size (floats)
  // Scratch (scratch(), scratch_f64()):
  float* pivot = nullptr;  // [N, C]: K of the channel's group (after the merge: K2, its mean in fp32)
  float* bsk = nullptr;    // [N, C]: broadcast skip values (bcast)
  float* scale = nullptr;  // [N, C]: a = gamma * rstd
  float* shift = nullptr;  // [N, C]: b = beta - (mean - K2) * a
  float* biasf = nullptr;  // [C]: bias in fp32 (has_bias)
  float* tbuf = nullptr;   // [nt, per_thread]: per-thread row buffers and accumulators
  Moments64* part = nullptr;  // [N, G, units]: (count, mean - K, M2) of each chunk (NHWC) or channel
};

// Scratch layout of a plan whose shapes and traversal are set.
template <typename T>
inline void carve_scratch(Plan<T>& pl) {
  const int64_t NC = pad16(pl.N * pl.C);
  pl.row_len = pl.nhwc ? pad16(pl.C) : pad16(pl.P);
  pl.per_thread = pl.nhwc ? 4 * pl.row_len : 2 * pl.row_len;
  float* base = scratch(static_cast<size_t>(NC * 4 + pad16(pl.C) + pl.per_thread * pl.nt));
  pl.pivot = base;
  pl.bsk = pl.pivot + NC;
  pl.scale = pl.bsk + NC;
  pl.shift = pl.scale + NC;
  pl.biasf = pl.shift + NC;
  pl.tbuf = pl.biasf + pad16(pl.C);
  pl.part = reinterpret_cast<Moments64*>(scratch_f64(static_cast<size_t>(pl.N * pl.G * pl.units * 3)));
}

template <typename T>
inline Plan<T> make_plan(const GroupNormArgs& a, bool with_skip) {
  Plan<T> pl;
  pl.N = a.N, pl.C = a.C, pl.P = a.P, pl.G = a.groups, pl.cpg = a.C / a.groups;
  pl.x = static_cast<const T*>(a.x);
  pl.skip = with_skip ? static_cast<const T*>(a.skip) : nullptr;
  pl.y = static_cast<T*>(a.y);
  pl.s = with_skip ? static_cast<T*>(a.s) : nullptr;
  pl.bias = a.bias, pl.gamma = a.gamma, pl.beta = a.beta;
  pl.bias_dtype = a.bias_dtype, pl.param_dtype = a.param_dtype;
  pl.has_bias = with_skip && a.bias != nullptr;
  pl.bcast = pl.skip != nullptr && a.skip_sp == 0;  // skip is one value per (n, c)
  pl.full_skip = pl.skip != nullptr && !pl.bcast;
  pl.xsn = a.x_sn, pl.xsc = a.x_sc, pl.xsp = a.x_sp;
  pl.ksn = a.skip_sn, pl.ksc = a.skip_sc, pl.ksp = a.skip_sp;
  pl.eps = a.eps, pl.silu = a.silu;

  // NHWC traversal when channels are contiguous (rows of C); channel rows otherwise (also for C == 1).
  pl.nhwc = pl.xsc == 1 && (pl.xsp != 1 || pl.P == 1);
  const int max_nt = max_threads();
  pl.nt = pl.N * pl.C * pl.P < 32768 ? 1 : max_nt;  // tiny problems: the fork costs more than the work

  // The chunks of one image depend on P and the thread budget only, never on N or on nt (which does):
  // an image's statistics are then summed in the same order whatever batch it is in, so batched
  // results equal solo results bit for bit (sdkern serve batches requests on that).
  if (pl.nhwc) {
    const int64_t want = std::max<int64_t>((pl.P + 63) / 64, 4 * static_cast<int64_t>(max_nt));
    pl.nchunks = std::min<int64_t>(pl.P, want);
    pl.rows_per_chunk = (pl.P + pl.nchunks - 1) / pl.nchunks;
    pl.nchunks = (pl.P + pl.rows_per_chunk - 1) / pl.rows_per_chunk;
  }
  pl.units = pl.nhwc ? pl.nchunks : pl.cpg;

  // s holds v exactly (fp32 storage) and reading it is cheaper than re-reading x and a full skip.
  pl.reread_s = std::is_same_v<T, float> && pl.s != nullptr && pl.full_skip;
  const int in_mode = (pl.full_skip ? kFullSkip : 0) | (pl.bcast ? kBcastSkip : 0) | (pl.has_bias ? kBias : 0);
  pl.stats_mode = in_mode | (pl.s != nullptr ? kWriteS : 0);
  pl.norm_mode = pl.reread_s ? (in_mode | kFromS) : in_mode;
#if defined(SDKERN_SIMD_AVX512)
  pl.blocked = pl.nhwc && (!pl.full_skip || pl.ksc == 1) && has_mode(pl.stats_mode) && has_mode(pl.norm_mode);
#endif
  // NCHW with contiguous channel rows and groups that give every thread work: one pass per (n, group).
  pl.flat = !pl.nhwc && pl.xsp == 1 && pl.xsc == pl.P && (!pl.full_skip || (pl.ksp == 1 && pl.ksc == pl.P)) &&
            pl.N * pl.G >= 2 * pl.nt;
  carve_scratch(pl);
  return pl;
}

// v of element (n, c, p) = (x + skip) + bias in fp32 (the order of the reference).
template <typename T>
inline float value_at(const Plan<T>& pl, int64_t n, int64_t c, int64_t p) {
  float v = to_f32(pl.x[n * pl.xsn + c * pl.xsc + p * pl.xsp]);
  if (pl.full_skip) v = v + to_f32(pl.skip[n * pl.ksn + c * pl.ksc + p * pl.ksp]);
  if (pl.bcast) v = v + pl.bsk[n * pl.C + c];
  if (pl.has_bias) v = v + pl.biasf[c];
  return v;
}

// v of one NHWC pixel row (n, p): C values, into b0 (b1: second input buffer; both [row_len] floats);
// the input itself when nothing is added to contiguous fp32.
template <typename T>
inline const float* pixel_values(const Plan<T>& pl, int64_t n, int64_t p, float* b0, float* b1) {
  const int64_t C = pl.C;
  const float* v = row_f32(pl.x + n * pl.xsn + p * pl.xsp, 1, b0, C);
  if (!pl.skip && !pl.has_bias) return v;
  if (pl.full_skip) {
    const float* k = row_f32(pl.skip + n * pl.ksn + p * pl.ksp, pl.ksc, b1, C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) b0[c] = v[c] + k[c];
  } else if (pl.bcast) {
    const float* k = pl.bsk + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) b0[c] = v[c] + k[c];
  } else if (v != b0) {
    std::memcpy(b0, v, C * sizeof(float));
  }
  if (pl.has_bias) {
    const float* bias = pl.biasf;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) b0[c] += bias[c];
  }
  return b0;
}

// v of one channel row (n, c): P values, into b0 (b1: second input buffer; both [row_len] floats);
// the input itself when nothing is added to contiguous fp32.
template <typename T>
inline const float* channel_values(const Plan<T>& pl, int64_t n, int64_t c, float* b0, float* b1) {
  const int64_t P = pl.P;
  const float* v = row_f32(pl.x + n * pl.xsn + c * pl.xsc, pl.xsp, b0, P);
  if (!pl.skip && !pl.has_bias) return v;
  if (pl.full_skip) {
    const float* k = row_f32(pl.skip + n * pl.ksn + c * pl.ksc, pl.ksp, b1, P);
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) b0[p] = v[p] + k[p];
  } else {
    const float k = pl.bcast ? pl.bsk[n * pl.C + c] : 0.0f;
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) b0[p] = v[p] + k;
  }
  if (pl.has_bias) {
    const float bb = pl.biasf[c];
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) b0[p] += bb;
  }
  return b0;
}

#if defined(SDKERN_SIMD_AVX512)
// Inputs of one (n, pixel-chunk) work item of the AVX-512 NHWC row kernels.
template <typename T, int kMode>
struct NhwcRows {
  const T* x;      // x + n*x_sn: row p at x + p*x_sp, channels contiguous
  const T* skip;   // full skip (channels contiguous), row p at skip + p*skip_sp (kFullSkip)
  int64_t xsp, ksp;
  const float* bsk;   // [C] broadcast skip of this n (kBcastSkip)
  const float* bias;  // [C] (kBias)
  T* s;               // output rows, strides of x (kWriteS); input rows (kFromS)

  // v = (x + skip) + bias for the 16 channels at c (lanes in m), or v read back from s.
  inline __m512 value(int64_t p, int64_t c, __mmask16 m) const {
    if constexpr ((kMode & kFromS) != 0) return load16(s + p * xsp + c, m);
    __m512 v = load16(x + p * xsp + c, m);
    if constexpr ((kMode & kFullSkip) != 0) v = _mm512_add_ps(v, load16(skip + p * ksp + c, m));
    if constexpr ((kMode & kBcastSkip) != 0) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bsk + c));
    if constexpr ((kMode & kBias) != 0) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + c));
    return v;
  }
};

// The row-kernel inputs of image n, with s as output (write_s) or input (read_s) or unused.
template <typename T, int kMode>
inline NhwcRows<T, kMode> nhwc_rows(const Plan<T>& pl, int64_t n, bool with_s) {
  return NhwcRows<T, kMode>{pl.x + n * pl.xsn,
                            pl.full_skip ? pl.skip + n * pl.ksn : nullptr,
                            pl.xsp,
                            pl.ksp,
                            pl.bcast ? pl.bsk + n * pl.C : nullptr,
                            pl.has_bias ? pl.biasf : nullptr,
                            with_s ? pl.s + n * pl.xsn : nullptr};
}

// f(p, c, lane mask) for every 16-channel piece of the pixel rows [p0, p1), in address order.
template <typename F>
inline void for_each_row_piece(int64_t C, int64_t p0, int64_t p1, F&& f) {
  const int64_t cfull = C / 16 * 16;
  const __mmask16 tail = lane_mask(C - cfull);
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t c = 0; c < cfull; c += 16) f(p, c, static_cast<__mmask16>(0xffff));
    if (cfull < C) f(p, cfull, tail);
  }
}
#endif

}  // namespace gn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
