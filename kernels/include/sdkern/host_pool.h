// sdkern native core: running the CPU kernels on a host framework's thread pool instead of OpenMP.
// Framework-free. libsdkern_ort installs ONNX Runtime's intra-op pool around every kernel it runs, so
// inside ORT sdkern's kernels share ORT's threads: no second team of OpenMP threads spinning next to
// ORT's pool and taking cores from its next op (measured: benchmarks/results/cpu_engine_session12.md).
#pragma once

#include <cstddef>

namespace sdkern {
namespace cpu {

// A host's parallel-for.
struct HostPool {
  // Runs fn(arg, i) for every i in [0, n), in any order and on any of the host's threads (possibly
  // one after another on the caller), and returns once all have finished. Returns false when it ran
  // none of them (the kernels then run them on the calling thread). Must not throw.
  bool (*parallel_for)(void* host, void (*fn)(void* arg, size_t i), size_t n, void* arg) = nullptr;
  void* host = nullptr;  // passed back to parallel_for
  int threads = 1;       // how many items a parallel loop is split into (>= 1; ideally the pool's size)
};

// The pool installed on the calling thread, or nullptr (the kernels use OpenMP).
const HostPool* host_pool();

// Installs `pool` (nullptr: none) on the calling thread while the guard lives; restores the previous.
class ScopedHostPool {
 public:
  explicit ScopedHostPool(const HostPool* pool);
  ~ScopedHostPool();
  ScopedHostPool(const ScopedHostPool&) = delete;
  ScopedHostPool& operator=(const ScopedHostPool&) = delete;

 private:
  const HostPool* prev_;
};

// The member of a host-pool team the calling thread is running as: {id, size}, size 0 when the
// thread runs no host-pool item (kernels then ask OpenMP).
struct HostSlot {
  int id = 0;
  int size = 0;
};
HostSlot& host_slot();

}  // namespace cpu
}  // namespace sdkern
