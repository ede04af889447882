// GroupNorm on CPU, phase 3: y = (v - K2) * a_c + b_c (+SiLU) with the per-channel constants of the
// merge (group_norm_merge.h). v is recomputed from x (+ skip) (+ bias), or read back from s when s
// holds it exactly (fp32 with a full skip: one stream instead of two).
//
// With AVX-512 the NHWC pass runs row kernels with compile-time input combinations, hardware fp16
// conversion and vm::silu16 (vm::silu16_bf16 for bf16 outputs: rel. error < 1.2e-4, far below bf16
// rounding); other ISA levels and layouts use compiler-vectorised row loops staged through fp32 rows.
#pragma once

#include <cstdint>
#include <type_traits>

#include "group_norm_plan.h"
#include "vec_math.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace gn {

#if defined(SDKERN_SIMD_AVX512)
// out[i] = (v[i] - k[i]) * a[i] + b[i] (+SiLU) over one row (k, a, b per element or broadcast).
template <bool kSilu, bool kPerElem>
inline void normalise_row16(const float* v, const float* k, const float* a, const float* b, float* out, int64_t n) {
  auto op = [&](__mmask16 m, int64_t i) {
    const __m512 vv = _mm512_maskz_loadu_ps(m, v + i);
    const __m512 kk = kPerElem ? _mm512_maskz_loadu_ps(m, k + i) : _mm512_set1_ps(*k);
    const __m512 aa = kPerElem ? _mm512_maskz_loadu_ps(m, a + i) : _mm512_set1_ps(*a);
    const __m512 bb = kPerElem ? _mm512_maskz_loadu_ps(m, b + i) : _mm512_set1_ps(*b);
    __m512 y = _mm512_fmadd_ps(_mm512_sub_ps(vv, kk), aa, bb);
    if (kSilu) y = vm::silu16(y);
    _mm512_mask_storeu_ps(out + i, m, y);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) op(static_cast<__mmask16>(0xffff), i);
  if (i < n) op(static_cast<__mmask16>((1u << (n - i)) - 1u), i);
}

// y = (v - K_c) * a_c + b_c (+SiLU) over pixels [p0, p1); v recomputed from the inputs or read from s
// (kFromS). One pixel row after another (all C channels of pixel p, then p + 1), so every stream is
// read and written in address order and the per-channel constants come from L1 (register-blocked
// tiles with the constants in registers measured slower: benchmarks/results/cpu_kernel_design_notes.md).
template <typename T, bool kSilu, int kMode>
inline void nhwc_norm_rows(const NhwcRows<T, kMode>& r, T* y, int64_t C, int64_t p0, int64_t p1,
                           const float* kp, const float* ap, const float* bp) {
  for_each_row_piece(C, p0, p1, [&](int64_t p, int64_t c, __mmask16 m) {
    const __m512 v = r.value(p, c, m);
    __m512 o = _mm512_fmadd_ps(_mm512_sub_ps(v, _mm512_maskz_loadu_ps(m, kp + c)), _mm512_maskz_loadu_ps(m, ap + c),
                               _mm512_maskz_loadu_ps(m, bp + c));
    if (kSilu) o = vm::silu16_for<T>(o);
    store16(y + p * r.xsp + c, o, m);
  });
}
#endif

// out[i] = (v[i] - k[i]) * a[i] + b[i] (+SiLU) over one row ([n] floats each).
inline void normalise_row(const float* v, const float* k, const float* a, const float* b, float* out, int64_t n,
                          bool silu) {
#if defined(SDKERN_SIMD_AVX512)
  if (silu) {
    normalise_row16<true, true>(v, k, a, b, out, n);
  } else {
    normalise_row16<false, true>(v, k, a, b, out, n);
  }
#else
  if (silu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::silu(vm::fmadd(v[i] - k[i], a[i], b[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::fmadd(v[i] - k[i], a[i], b[i]);
  }
#endif
}

// out[i] = (v[i] - k) * a + b (+SiLU) over one row ([n] floats each).
inline void normalise_row_scalar(const float* v, float k, float a, float b, float* out, int64_t n, bool silu) {
#if defined(SDKERN_SIMD_AVX512)
  if (silu) {
    normalise_row16<true, false>(v, &k, &a, &b, out, n);
  } else {
    normalise_row16<false, false>(v, &k, &a, &b, out, n);
  }
#else
  if (silu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::silu(vm::fmadd(v[i] - k, a, b));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = vm::fmadd(v[i] - k, a, b);
  }
#endif
}

// y of one channel row (n, c) from its values v ([P] floats); obuf: [P] floats for non-fp32 or strided y.
template <typename T>
inline void normalise_channel(const Plan<T>& pl, int64_t n, int64_t c, const float* v, float* obuf) {
  const int64_t nc = n * pl.C + c;
  T* yr = pl.y + n * pl.xsn + c * pl.xsc;
  if (std::is_same_v<T, float> && pl.xsp == 1) {
    normalise_row_scalar(v, pl.pivot[nc], pl.scale[nc], pl.shift[nc], reinterpret_cast<float*>(yr), pl.P, pl.silu);
  } else {
    normalise_row_scalar(v, pl.pivot[nc], pl.scale[nc], pl.shift[nc], obuf, pl.P, pl.silu);
    put_row(obuf, yr, pl.xsp, pl.P);
  }
}

// NHWC: y of chunk ch of image n (b0, b1: input row buffers, b2: output row; [row_len] floats each).
template <typename T>
inline void normalise_nhwc_chunk(const Plan<T>& pl, int64_t n, int64_t ch, float* b0, float* b1, float* b2) {
  const int64_t C = pl.C;
  const int64_t p0 = ch * pl.rows_per_chunk, p1 = std::min(pl.P, p0 + pl.rows_per_chunk);
  const float *kp = pl.pivot + n * C, *ap = pl.scale + n * C, *bp = pl.shift + n * C;
  T* y = pl.y + n * pl.xsn;
#if defined(SDKERN_SIMD_AVX512)
  if (pl.blocked) {
    with_mode(pl.norm_mode, [&](auto mode) {
      const auto rows = nhwc_rows<T, decltype(mode)::value>(pl, n, pl.reread_s);
      if (pl.silu) {
        nhwc_norm_rows<T, true>(rows, y, C, p0, p1, kp, ap, bp);
      } else {
        nhwc_norm_rows<T, false>(rows, y, C, p0, p1, kp, ap, bp);
      }
    });
    return;
  }
#endif
  for (int64_t p = p0; p < p1; ++p) {
    const float* v =
        pl.reread_s ? reinterpret_cast<const float*>(pl.s) + n * pl.xsn + p * pl.xsp : pixel_values(pl, n, p, b0, b1);
    if constexpr (std::is_same_v<T, float>) {
      normalise_row(v, kp, ap, bp, y + p * pl.xsp, C, pl.silu);
    } else {
      normalise_row(v, kp, ap, bp, b2, C, pl.silu);
      store_row(b2, y + p * pl.xsp, C);
    }
  }
}

// NHWC: the same chunks as this team member's statistics, last first: on an OpenMP team the chunks the
// thread read most recently are still in its L2 cache (a host pool may run the member elsewhere). b0, b1: the first two rows of the thread's slot of 4 (the third: output row).
template <typename T>
inline void normalise_nhwc(const Plan<T>& pl, float* b0, float* b1) {
  float* b2 = b1 + pl.row_len;
  int64_t t_begin, t_end;
  thread_range(pl.N * pl.nchunks, t_begin, t_end);
  for (int64_t task = t_end - 1; task >= t_begin; --task)
    normalise_nhwc_chunk(pl, task / pl.nchunks, task % pl.nchunks, b0, b1, b2);
}

// Channel rows, shared among the team. b0, b1: the thread's row buffers.
template <typename T>
inline void normalise_channels(const Plan<T>& pl, float* b0, float* b1) {
  int64_t t_begin, t_end;
  thread_range(pl.N * pl.C, t_begin, t_end);
  for (int64_t nc = t_begin; nc < t_end; ++nc) {
    const int64_t n = nc / pl.C, c = nc % pl.C;
    const float* v = pl.reread_s && pl.xsp == 1 ? reinterpret_cast<const float*>(pl.s) + n * pl.xsn + c * pl.xsc
                                                : channel_values(pl, n, c, b0, b1);
    normalise_channel(pl, n, c, v, b1);
  }
}

}  // namespace gn
}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
