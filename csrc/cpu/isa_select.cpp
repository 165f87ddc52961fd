#include "cpu/isa_select.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace l2l_fast {
namespace cpu {
namespace {

bool cpu_supports(const std::string& isa) {
  if (isa == "generic") return true;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#endif
  return false;
}

const CpuKernels* kernels_named(const std::string& isa) {
  if (isa == "generic") return &generic::kernels;
  if (isa == "avx2") return &avx2::kernels;
  if (isa == "avx512") return &avx512::kernels;
  return nullptr;
}

const CpuKernels* best_supported() {
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_supports(isa)) return kernels_named(isa);
  return &generic::kernels;
}

const CpuKernels* choose(const std::string& isa) {
  if (isa == "auto" || isa.empty()) return best_supported();
  const CpuKernels* table = kernels_named(isa);
  TORCH_CHECK_VALUE(table != nullptr, "isa: expected 'generic', 'avx2', 'avx512' or 'auto', got '", isa, "'");
  TORCH_CHECK(cpu_supports(isa) && table->forward_f32 != nullptr, "isa: this CPU or build cannot run the '", isa,
              "' kernels");
  return table;
}

std::atomic<const CpuKernels*>& current() {
  static std::atomic<const CpuKernels*> table{[] {
    const char* env = std::getenv("L2L_FAST_CPU_ISA");
    return choose(env ? env : "auto");
  }()};
  return table;
}

}  // namespace

const CpuKernels& active_kernels() { return *current().load(); }

std::string active_isa_name() { return active_kernels().name; }

std::string select_isa(const std::string& isa) {
  current().store(choose(isa));
  return active_isa_name();
}

}  // namespace cpu
}  // namespace l2l_fast
