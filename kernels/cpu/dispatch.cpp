// Runtime ISA dispatch for the CPU kernels: validates arguments once, then calls the variant of
// the kernel compiled for the best instruction set this CPU supports (or the one forced by
// SDKERN_CPU_ISA / set_active_isa).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "isa.h"
#include "sdkern/attention.h"
#include "sdkern/group_norm.h"
#include "sdkern/bias_add.h"
#include "sdkern/bias_split_gelu.h"
#include "sdkern/skip_layer_norm.h"
#include "sdkern/winograd.h"

// Which levels were compiled (set by CMake).
#ifndef SDKERN_HAVE_AVX2
#define SDKERN_HAVE_AVX2 0
#endif
#ifndef SDKERN_HAVE_AVX512
#define SDKERN_HAVE_AVX512 0
#endif
#ifndef SDKERN_HAVE_AVX512BF16
#define SDKERN_HAVE_AVX512BF16 0
#endif

#define SDKERN_CPU_OPS(X)                 \
  X(group_norm, GroupNormArgs)            \
  X(skip_group_norm, GroupNormArgs)       \
  X(bias_split_gelu, BiasSplitGeluArgs)   \
  X(skip_layer_norm, SkipLayerNormArgs)   \
  X(bias_add, BiasAddArgs)                \
  X(attention, AttentionArgs)             \
  X(winograd_input, WinogradInputArgs)    \
  X(winograd_output, WinogradOutputArgs)

#define SDKERN_DECLARE(op, Args) Status op(const Args& a);

namespace sdkern {
namespace cpu {
namespace baseline { SDKERN_CPU_OPS(SDKERN_DECLARE) }
#if SDKERN_HAVE_AVX2
namespace avx2 { SDKERN_CPU_OPS(SDKERN_DECLARE) }
#endif
#if SDKERN_HAVE_AVX512
namespace avx512 { SDKERN_CPU_OPS(SDKERN_DECLARE) }
#endif
#if SDKERN_HAVE_AVX512BF16
namespace avx512bf16 { SDKERN_CPU_OPS(SDKERN_DECLARE) }
#endif

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return "baseline";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

bool isa_built(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return true;
    case Isa::kAvx2: return SDKERN_HAVE_AVX2;
    case Isa::kAvx512: return SDKERN_HAVE_AVX512;
    case Isa::kAvx512Bf16: return SDKERN_HAVE_AVX512BF16;
  }
  return false;
}

static bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kBaseline: return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::kAvx512Bf16:
      return cpu_supports(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

Isa best_isa_supported() {
  for (int i = 3; i > 0; --i) {
    Isa isa = static_cast<Isa>(i);
    if (isa_built(isa) && cpu_supports(isa)) return isa;
  }
  return Isa::kBaseline;
}

static Isa initial_isa() {
  Isa best = best_isa_supported();
  if (const char* env = std::getenv("SDKERN_CPU_ISA")) {
    for (int i = 0; i <= 3; ++i) {
      Isa isa = static_cast<Isa>(i);
      if (std::strcmp(env, isa_name(isa)) == 0 && isa_built(isa) && cpu_supports(isa)) return isa;
    }
  }
  return best;
}

static std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
  if (!isa_built(isa) || !cpu_supports(isa)) return false;
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

}  // namespace cpu

size_t attention_scratch_limit_bytes() {
  static const size_t limit = [] {
    size_t mb = 1024;
    if (const char* env = std::getenv("SDKERN_ATTENTION_SCRATCH_MB")) {
      char* end = nullptr;
      const unsigned long long v = std::strtoull(env, &end, 10);
      if (end != env && *end == '\0' && v > 0 && v < (size_t{1} << 40)) mb = static_cast<size_t>(v);
    }
    return mb << 20;
  }();
  return limit;
}

// Public entry points: validate, then the active ISA's variant.
#define SDKERN_CASE(ns, op) return cpu::ns::op(a);
#if SDKERN_HAVE_AVX2
#define SDKERN_CASE_AVX2(op) case cpu::Isa::kAvx2: SDKERN_CASE(avx2, op)
#else
#define SDKERN_CASE_AVX2(op)
#endif
#if SDKERN_HAVE_AVX512
#define SDKERN_CASE_AVX512(op) case cpu::Isa::kAvx512: SDKERN_CASE(avx512, op)
#else
#define SDKERN_CASE_AVX512(op)
#endif
#if SDKERN_HAVE_AVX512BF16
#define SDKERN_CASE_AVX512BF16(op) case cpu::Isa::kAvx512Bf16: SDKERN_CASE(avx512bf16, op)
#else
#define SDKERN_CASE_AVX512BF16(op)
#endif

#define SDKERN_DEFINE_ENTRY(op, Args, ...)             \
  Status op##_cpu(const Args& a) {                     \
    Status st = validate(a __VA_ARGS__);               \
    if (!st.ok()) return st;                           \
    switch (cpu::active_isa()) {                       \
      SDKERN_CASE_AVX512BF16(op)                       \
      SDKERN_CASE_AVX512(op)                           \
      SDKERN_CASE_AVX2(op)                             \
      default: SDKERN_CASE(baseline, op)               \
    }                                                  \
  }

SDKERN_DEFINE_ENTRY(group_norm, GroupNormArgs, , false)
SDKERN_DEFINE_ENTRY(skip_group_norm, GroupNormArgs, , true)
SDKERN_DEFINE_ENTRY(bias_split_gelu, BiasSplitGeluArgs)
SDKERN_DEFINE_ENTRY(skip_layer_norm, SkipLayerNormArgs)
SDKERN_DEFINE_ENTRY(bias_add, BiasAddArgs)
SDKERN_DEFINE_ENTRY(attention, AttentionArgs)
SDKERN_DEFINE_ENTRY(winograd_input, WinogradInputArgs)
SDKERN_DEFINE_ENTRY(winograd_output, WinogradOutputArgs)

}  // namespace sdkern
