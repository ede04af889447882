// Parallel helpers of the CPU kernels: one team of threads per call, from the host pool installed on
// the calling thread (sdkern/host_pool.h: ONNX Runtime's pool inside libsdkern_ort) or else from
// OpenMP; usable without OpenMP (then: one thread).
//
// Kernels write their parallel work as parallel(nt, f) (f runs once per team member and splits its
// work with thread_range) or parallel_for(total, worth, body). Work is split statically and the same
// way on both backends, so results do not depend on which one ran them. A barrier exists only inside
// an OpenMP team; a kernel that needs one runs its phases as consecutive parallel() calls on a host
// pool (group_norm_impl.h).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstdint>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "isa.h"
#include "sdkern/host_pool.h"

namespace sdkern {
namespace cpu {
inline namespace SDKERN_ISA_NS {

// max_threads: the team size a parallel() started here would get at most; thread_id / num_threads:
// this thread's number and the size of the current team (0 and 1 outside one).
inline int max_threads() {
  if (const HostPool* p = host_pool()) return std::max(1, p->threads);
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
  const HostSlot& s = host_slot();
  if (s.size > 0) return s.id;
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int num_threads() {
  const HostSlot& s = host_slot();
  if (s.size > 0) return s.size;
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// True when parallel() runs on a host pool (no barriers inside a team).
inline bool on_host_pool() { return host_pool() != nullptr; }

// This thread's contiguous share [begin, end) of `total` work items (an even static split over the
// current team; the split OpenMP's schedule(static) makes).
inline void thread_range(int64_t total, int64_t& begin, int64_t& end) {
  const int64_t nt = num_threads(), t = thread_id();
  const int64_t q = total / nt, r = total % nt;
  begin = t * q + std::min(t, r);
  end = begin + q + (t < r ? 1 : 0);
}

namespace detail {
// Makes the calling thread member `id` of a team of `size` while it lives (restores the previous slot).
class SlotGuard {
 public:
  SlotGuard(int id, int size) : slot_(host_slot()), saved_(slot_) { slot_ = HostSlot{id, size}; }
  ~SlotGuard() { slot_ = saved_; }
  SlotGuard(const SlotGuard&) = delete;
  SlotGuard& operator=(const SlotGuard&) = delete;

 private:
  HostSlot& slot_;
  const HostSlot saved_;
};

// One member's run of f, as the host pool calls it (noexcept: an exception ends the process here
// instead of unwinding through the host's threads).
template <typename F>
struct HostTask {
  F* f;
  int size;
  std::atomic<int> ran{0};
  static void run(void* arg, size_t i) noexcept {
    auto* task = static_cast<HostTask*>(arg);
    task->ran.fetch_add(1, std::memory_order_relaxed);
    const SlotGuard member(static_cast<int>(i), task->size);
    (*task->f)();
  }
};
}  // namespace detail

// Runs f() once on every member of a team of nt threads (nt <= 1: on the calling thread, as a team
// of one, also inside an enclosing OpenMP region). f must not throw.
template <typename F>
inline void parallel(int nt, F&& f) {
  using Fn = std::remove_reference_t<F>;
  if (nt <= 1) {
    const detail::SlotGuard member(0, 1);
    f();
    return;
  }
  if (const HostPool* p = host_pool()) {
    detail::HostTask<Fn> task{&f, nt};
    if (!p->parallel_for(p->host, &detail::HostTask<Fn>::run, static_cast<size_t>(nt), &task)) {
      // The host refused the call: nothing may have run (a member that ran would have run twice).
      if (task.ran.load(std::memory_order_relaxed) != 0) std::abort();
      for (int i = 0; i < nt; ++i) detail::HostTask<Fn>::run(&task, static_cast<size_t>(i));
    }
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
  f();
#else
  f();
#endif
}

// body(begin, end) over an even static split of [0, total) across a team of max_threads() (one
// thread when !worth: too little work to pay for waking a team).
template <typename F>
inline void parallel_for(int64_t total, bool worth, F&& body) {
  const int64_t nt = worth ? std::min<int64_t>(max_threads(), total) : 1;
  if (nt <= 1) {
    if (total > 0) body(int64_t{0}, total);
    return;
  }
  parallel(static_cast<int>(nt), [&] {
    int64_t begin, end;
    thread_range(total, begin, end);
    if (begin < end) body(begin, end);
  });
}

}  // namespace SDKERN_ISA_NS
}  // namespace cpu
}  // namespace sdkern
