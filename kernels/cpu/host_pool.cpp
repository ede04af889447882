// Thread-local host-pool state of the CPU kernels (sdkern/host_pool.h). Compiled once (not per ISA
// level), so every level's kernels see the same pool and slot.
#include "sdkern/host_pool.h"

namespace sdkern {
namespace cpu {

namespace {
thread_local const HostPool* tl_pool = nullptr;
thread_local HostSlot tl_slot;
}  // namespace

const HostPool* host_pool() { return tl_pool; }

ScopedHostPool::ScopedHostPool(const HostPool* pool) : prev_(tl_pool) { tl_pool = pool; }
ScopedHostPool::~ScopedHostPool() { tl_pool = prev_; }

HostSlot& host_slot() { return tl_slot; }

}  // namespace cpu
}  // namespace sdkern
