// OpenMP helpers of the CPU kernels, usable with and without OpenMP (then: one thread).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "isa.h"

namespace sdkern {
namespace cpu {
inline namespace SDKERN_ISA_NS {

// max_threads: the threads a parallel region started here would get; thread_id / num_threads: this
// thread's number and the size of the current team (0 and 1 outside a parallel region).
#if defined(_OPENMP)
inline int max_threads() { return omp_get_max_threads(); }
inline int thread_id() { return omp_get_thread_num(); }
inline int num_threads() { return omp_get_num_threads(); }
#else
inline int max_threads() { return 1; }
inline int thread_id() { return 0; }
inline int num_threads() { return 1; }
#endif

// This thread's contiguous share [begin, end) of `total` work items (an even static split over the
// current team).
inline void thread_range(int64_t total, int64_t& begin, int64_t& end) {
  const int64_t nt = num_threads(), t = thread_id();
  const int64_t q = total / nt, r = total % nt;
  begin = t * q + std::min(t, r);
  end = begin + q + (t < r ? 1 : 0);
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
