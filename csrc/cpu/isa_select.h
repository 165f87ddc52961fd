// Run-time choice of the CPU kernels' instruction set: the best one the CPU supports, or the one
// named by the environment variable L2L_FAST_CPU_ISA or set_cpu_isa (tests use it to check each);
// and of their float activations: "fast" (default) or "precise" (L2L_FAST_CPU_ACTIVATIONS or
// set_cpu_activations; the generic build has only the precise ones).
#pragma once
#include <string>

#include "cpu/cpu_kernels.h"

namespace l2l_fast {
namespace cpu {

const CpuKernels& active_kernels();
std::string active_isa_name();
// 'generic', 'avx2', 'avx512' or 'auto'; raises if the CPU cannot run it. Returns the one in use.
std::string select_isa(const std::string& isa);
// 'fast' or 'precise' for the AVX2 / AVX-512 kernels; returns the activations now in use.
std::string select_activations(const std::string& activations);
std::string active_activations_name();

}  // namespace cpu
}  // namespace l2l_fast
