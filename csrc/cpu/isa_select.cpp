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

bool parse_precise(const std::string& activations) {
  TORCH_CHECK_VALUE(activations == "fast" || activations == "precise",
                    "activations: expected 'fast' or 'precise', got '", activations, "'");
  return activations == "precise";
}

// read once: the activations of every table chosen afterwards (until set_cpu_activations)
std::atomic<bool>& precise() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("L2L_FAST_CPU_ACTIVATIONS");
    return parse_precise(env ? env : "fast");
  }()};
  return flag;
}

const CpuKernels* kernels_named(const std::string& isa) {
  const bool want_precise = precise().load();
  if (isa == "generic") return &generic::kernels;
  if (isa == "avx2") return want_precise ? &avx2_precise::kernels : &avx2::kernels;
  if (isa == "avx512") return want_precise ? &avx512_precise::kernels : &avx512::kernels;
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

std::string active_activations_name() { return active_kernels().activations; }

std::string select_activations(const std::string& activations) {
  const bool want_precise = parse_precise(activations);
  const std::string isa = active_isa_name();  // keep the instruction set, change the activations
  precise().store(want_precise);
  current().store(choose(isa));
  return active_activations_name();
}

}  // namespace cpu
}  // namespace l2l_fast
