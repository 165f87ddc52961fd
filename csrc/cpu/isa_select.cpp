#include "cpu/isa_select.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// The float gate products: 'float32' (default), 'bf16' (kernel_avx512_bf16.cpp) or AMX tiles with a 2- or 3-piece
// bf16 split (kernel_avx512_amx.cpp); csrc/cpu/PRODUCTS.md.
enum Products { kFloat32, kBf16, kAmxBf16x3, kAmxBf16x6 };
const char* const kProductNames[] = {"float32", "bf16", "amx-bf16x3", "amx-bf16x6"};

int parse_products(const std::string& products) {
  for (int i = 0; i < 4; ++i)
    if (products == kProductNames[i]) return i;
  TORCH_CHECK_VALUE(false, "products: expected 'float32' or 'bf16' (or on AMX tiles 'amx-bf16x3', 'amx-bf16x6'), got '", products, "'");
}

// read once, like the activations: the products of every table chosen afterwards (until set_cpu_products)
std::atomic<int>& products_choice() {
  static std::atomic<int> choice{[] {
    const char* env = std::getenv("L2L_FAST_CPU_PRODUCTS");
    return parse_products(env ? env : "float32");
  }()};
  return choice;
}

// The test switch: the AMX products on the emulated tiles (amx_tiles.h), on any CPU with AVX-512 and
// AVX512_BF16. Read at every choice, so that a test can turn it on and off.
bool amx_emulated() {
  const char* env = std::getenv("L2L_FAST_CPU_AMX_EMULATE");
  return env != nullptr && std::string(env) == "1";
}

bool cpu_has_amx() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

// Linux hands out the tile data state (XFEATURE_XTILEDATA, 18) only on request, once per process
// (ARCH_REQ_XCOMP_PERM, 0x1023); "" when granted, else why not.
const std::string& amx_permission_error() {
  static const std::string error = [] {
#if defined(__linux__) && defined(__x86_64__)
    if (syscall(SYS_arch_prctl, 0x1023, 18) == 0) return std::string();
    return std::string("the kernel refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: ") +
           std::strerror(errno) + ")";
#else
    return std::string("AMX tiles need Linux on x86-64");
#endif
  }();
  return error;
}

const CpuKernels* kernels_named(const std::string& isa) {
  const bool want_precise = precise().load();
  if (isa == "generic") return &generic::kernels;
  if (isa == "avx2") return want_precise ? &avx2_precise::kernels : &avx2::kernels;
  if (isa == "avx512") {
    switch (products_choice().load()) {
      case kBf16: return &avx512_bf16::kernels;
      case kAmxBf16x3: return amx_emulated() ? &avx512_amx::bf16x3_emulated : &avx512_amx::bf16x3;
      case kAmxBf16x6: return amx_emulated() ? &avx512_amx::bf16x6_emulated : &avx512_amx::bf16x6;
      default: return want_precise ? &avx512_precise::kernels : &avx512::kernels;
    }
  }
  return nullptr;
}

// bf16 and AMX products exist in one build each (AVX-512, fast activations): anything else is refused, never
// silently run with float32 products; so are AMX products where the CPU or OS has no tiles (unless emulated).
void check_products_choice(const std::string& isa) {
  const int choice = products_choice().load();
  if (choice == kFloat32) return;
  const std::string name = kProductNames[choice];
  TORCH_CHECK(isa == "avx512", "products: '", name, "' runs on the avx512 kernels only, not '", isa,
              "' (set_cpu_products('float32') first to use them)");
  TORCH_CHECK(!precise().load(), "products: '", name, "' is built with the fast activations only "
              "(set_cpu_products('float32') first to use the precise ones)");
  TORCH_CHECK(cpu_supports("avx512"), "products: '", name, "' needs AVX-512 (avx512f/dq/vl/bw), which this CPU lacks");
  TORCH_CHECK(cpu_has_bf16(), "products: '", name, "' needs a CPU with AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16), "
              "which this one lacks");
  if (choice == kBf16) {
    TORCH_CHECK(avx512_bf16::kernels.forward_f32 != nullptr, "products: this build has no bf16 kernels");
    return;
  }
  TORCH_CHECK(avx512_amx::bf16x3.forward_f32 != nullptr, "products: this build has no AMX kernels");
  if (amx_emulated()) return;
  TORCH_CHECK(cpu_has_amx(), "products: '", name, "' needs AMX tiles (CPUID AMX-TILE and AMX-BF16), which this CPU "
              "lacks (L2L_FAST_CPU_AMX_EMULATE=1 runs them on emulated tiles, for tests only)");
  const std::string& refused = amx_permission_error();
  TORCH_CHECK(refused.empty(), "products: '", name, "' needs AMX tiles: ", refused);
}

const CpuKernels* best_supported() {
  if (products_choice().load() != kFloat32) {
    check_products_choice("avx512");
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
  check_products_choice(isa);
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
template <typename Flag>
void reselect(std::atomic<Flag>& flag, Flag value) {
  const Flag before = flag.exchange(value);
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
  reselect(products_choice(), parse_products(products));
  return active_products_name();
}

}  // namespace cpu
}  // namespace l2l_fast
