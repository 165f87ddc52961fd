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

bool cpu_has_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
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

bool parse_bf16(const std::string& products) {
  TORCH_CHECK_VALUE(products == "float32" || products == "bf16", "products: expected 'float32' or 'bf16', got '",
                    products, "'");
  return products == "bf16";
}

// read once, like the activations: the products of every table chosen afterwards (until set_cpu_products)
std::atomic<bool>& bf16() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("L2L_FAST_CPU_PRODUCTS");
    return parse_bf16(env ? env : "float32");
  }()};
  return flag;
}

const CpuKernels* kernels_named(const std::string& isa) {
  const bool want_precise = precise().load();
  if (isa == "generic") return &generic::kernels;
  if (isa == "avx2") return want_precise ? &avx2_precise::kernels : &avx2::kernels;
  if (isa == "avx512")
    return bf16().load() ? &avx512_bf16::kernels : want_precise ? &avx512_precise::kernels : &avx512::kernels;
  return nullptr;
}

// bf16 products exist in one build only (AVX-512, fast activations): anything else is refused, never
// silently run with float32 products.
void check_bf16_choice(const std::string& isa) {
  if (!bf16().load()) return;
  TORCH_CHECK(isa == "avx512", "products: 'bf16' runs on the avx512 kernels only, not '", isa,
              "' (set_cpu_products('float32') first to use them)");
  TORCH_CHECK(!precise().load(), "products: 'bf16' is built with the fast activations only "
              "(set_cpu_products('float32') first to use the precise ones)");
  TORCH_CHECK(cpu_supports("avx512"), "products: 'bf16' needs AVX-512 (avx512f/dq/vl/bw), which this CPU lacks");
  TORCH_CHECK(cpu_has_bf16(), "products: 'bf16' needs a CPU with AVX512_BF16 (vdpbf16ps), which this one lacks");
  TORCH_CHECK(avx512_bf16::kernels.forward_f32 != nullptr, "products: this build has no bf16 kernels");
}

const CpuKernels* best_supported() {
  if (bf16().load()) {
    check_bf16_choice("avx512");
    return kernels_named("avx512");
  }
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_supports(isa)) return kernels_named(isa);
  return &generic::kernels;
}

const CpuKernels* choose(const std::string& isa) {
  if (isa == "auto" || isa.empty()) return best_supported();
  const CpuKernels* table = kernels_named(isa);
  TORCH_CHECK_VALUE(table != nullptr, "isa: expected 'generic', 'avx2', 'avx512' or 'auto', got '", isa, "'");
  check_bf16_choice(isa);
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

// Sets `flag` and chooses the kernels of the instruction set in use again; on failure (a combination that
// has no kernels) the flag and the kernels stay as they were.
void reselect(std::atomic<bool>& flag, bool value) {
  const bool before = flag.exchange(value);
  try {
    const std::string isa = active_isa_name();  // keep the instruction set
    current().store(choose(isa));
  } catch (...) {
    flag.store(before);
    throw;
  }
}

std::string select_activations(const std::string& activations) {
  reselect(precise(), parse_precise(activations));
  return active_activations_name();
}

std::string active_products_name() {
  const char* name = active_kernels().products;
  return name ? name : "float32";
}

std::string select_products(const std::string& products) {
  reselect(bf16(), parse_bf16(products));
  return active_products_name();
}

}  // namespace cpu
}  // namespace l2l_fast
