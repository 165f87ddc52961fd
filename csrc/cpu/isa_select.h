// Run-time choice of the CPU kernels' instruction set: the best one the CPU supports, or the one
// named by the environment variable L2L_FAST_CPU_ISA or set_cpu_isa (tests use it to check each);
// and of their float activations: "fast" (default) or "precise" (L2L_FAST_CPU_ACTIVATIONS or
// set_cpu_activations; the generic build has only the precise ones); and of their float gate products:
// "float32" (default) or "bf16" (L2L_FAST_CPU_PRODUCTS or set_cpu_products; AVX-512 with AVX512_BF16 and the
// fast activations only: other choices are refused while it is on, csrc/cpu/PRODUCTS.md).
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
// 'float32' or 'bf16'; raises if the CPU, the build or the instruction set in use cannot. Returns the products now in use.
std::string select_products(const std::string& products);
std::string active_products_name();

}  // namespace cpu
}  // namespace l2l_fast
