// CPU ISA levels. Every kernels/cpu/<op>.cpp is compiled once per level with SDKERN_ISA_NS set to
// the level's namespace and the matching -m flags (setup_tools/cmake/SdkernCpu.cmake); the public
// <op>_cpu() entry points in dispatch.cpp pick the best level the running CPU supports.
#pragma once

#ifndef SDKERN_ISA_NS
#define SDKERN_ISA_NS baseline
#endif

namespace sdkern {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

const char* isa_name(Isa isa);
Isa best_isa_supported();  // what this CPU can run among the levels that were built
Isa active_isa();          // what the dispatcher uses now (best, or forced)
// Force a level (tests run every built path); returns false if it was not built or the CPU lacks it.
bool set_active_isa(Isa isa);
bool isa_built(Isa isa);

}  // namespace cpu
}  // namespace sdkern
