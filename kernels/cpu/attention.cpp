// Attention on CPU: o = softmax(q k^T * scale) v per (batch, head), flash-attention style.
//
// Work split: one task per (batch, head, block of kBM query rows), dynamic schedule in
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
// The file is compiled once per ISA level on the SIMD layer (simd.h: W = 16 lanes with AVX-512, 8 with
// AVX2+FMA, a portable 4-lane fallback otherwise; exp2 from vec_math.h). Tiles, scratch layout and the
// fp32 micro-kernels are in attention_tiles.h, the AVX512-BF16 path in attention_bf16.h.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>

#include "attention_bf16.h"
#include "attention_tiles.h"
#include "parallel.h"
#include "sdkern/attention.h"
#include "simd.h"

namespace sdkern {
namespace cpu {
namespace SDKERN_ISA_NS {
namespace attn {
namespace {

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
  float m[kBM], l[kBM];
  start_rows(o, rows_p, Dvp, m, l);

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

  finish_rows<T>(a, b, h, s0, rows, o, Dvp, l);
}

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

// The calling thread's scratch buffer (shared with its team through the pointer). Not
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
  const int64_t threads = max_threads();
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

  // Dynamic schedule: each member takes the next chunk of tasks from a shared counter (one join, at
  // the team's end, per call; the same on OpenMP and on a host pool).
  std::atomic<int64_t> next{0};
  parallel(static_cast<int>(nthreads), [&] {
    Scratch sc = carve(base + thread_id() * L.bytes, L);
    for (;;) {
      const int64_t t0 = next.fetch_add(chunk, std::memory_order_relaxed);
      if (t0 >= tasks) break;
      for (int64_t t = t0; t < std::min(tasks, t0 + chunk); ++t) {
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
  });
  // Large (over the keep size per thread of the process's team): give it back.
  if (buf.size > kAttentionScratchKeepBytesPerThread * static_cast<size_t>(threads)) buf.release();
  return Status::Ok();
}

}  // namespace
}  // namespace attn

Status attention(const AttentionArgs& a) {
  if (a.B == 0 || a.Sq == 0 || a.H == 0) return Status::Ok();
  return with_dtype(a.dtype, [&](auto tag) { return attn::attention_impl<decltype(tag)>(a); });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
