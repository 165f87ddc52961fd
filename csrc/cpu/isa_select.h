// Run-time choice of the CPU kernels' instruction set: the best one the CPU supports, or the one
// named by the environment variable L2L_FAST_CPU_ISA or set_cpu_isa (tests use it to check each);
// and of their float activations: "fast" (default) or "precise" (L2L_FAST_CPU_ACTIVATIONS or
// set_cpu_activations; the generic build has only the precise ones); and of their float gate products:
// "float32" (default), "bf16", "amx-bf16x3" or "amx-bf16x6" (L2L_FAST_CPU_PRODUCTS or set_cpu_products; AVX-512 with
// AVX512_BF16 and the fast activations only, and AMX tiles for the amx ones unless L2L_FAST_CPU_AMX_EMULATE=1 runs
// them on emulated tiles: other choices are refused while one is on, csrc/cpu/PRODUCTS.md).
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
// 'float32', 'bf16', 'amx-bf16x3' or 'amx-bf16x6'; raises if the CPU, the build or the instruction set in use cannot. Returns the products now in use.
std::string select_products(const std::string& products);
// the products in use; an AMX one run on the emulated tiles says so: 'amx-bf16x3 (emulated)'
std::string active_products_name();

}  // namespace cpu
}  // namespace l2l_fast
