// The Python module l2l_fast._C: importing it runs the op registrations; it also exposes
// which kernels this build has, their table of input features and the CPU output cache's controls.
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/isa_select.h"
#include "cpu/output_cache.h"
#include "input_features.h"
#include "packed_cache.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", &l2l_fast::cpu::active_isa_name, "Instruction set of the CPU kernels in use");
  m.def("set_cpu_isa", &l2l_fast::cpu::select_isa,
        "Use the CPU kernels built for `isa` ('generic', 'avx2', 'avx512' or 'auto'); returns the one in use");
  m.def("cpu_activations", &l2l_fast::cpu::active_activations_name,
        "Float sigmoid/tanh of the CPU kernels in use: 'fast' or 'precise' (csrc/cpu/ACTIVATIONS.md)");
  m.def("set_cpu_activations", &l2l_fast::cpu::select_activations,
        "Use the 'fast' or 'precise' float activations in the AVX2 / AVX-512 kernels (the generic ones are always "
        "precise); returns the ones in use");
  m.def("cpu_products", &l2l_fast::cpu::active_products_name,
        "Operands of the float gate products of the CPU kernels in use: 'float32', 'bf16', 'amx-bf16x3' or 'amx-bf16x6', "
        "the AMX ones followed by ' (emulated)' on emulated tiles (csrc/cpu/PRODUCTS.md)");
  m.def("set_cpu_products", &l2l_fast::cpu::select_products,
        "Use 'float32', 'bf16', 'amx-bf16x3' or 'amx-bf16x6' products for the float gates of the CPU kernels (keeps the instruction set "
        "and activations; 'bf16' needs the avx512 kernels, the fast activations and a CPU with AVX512_BF16, else "
        "raises); returns the products in use");
  m.def("_amx_emulated_dpbf16ps", [](const torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& b) {
    TORCH_CHECK_VALUE(c.scalar_type() == torch::kFloat32 && c.sizes() == torch::IntArrayRef({16, 16}) && c.is_contiguous() &&
                      a.scalar_type() == torch::kInt16 && a.sizes() == torch::IntArrayRef({16, 32}) && a.is_contiguous() &&
                      b.scalar_type() == torch::kInt16 && b.sizes() == torch::IntArrayRef({16, 32}) && b.is_contiguous(),
                      "expected c [16, 16] float32, a and b [16, 32] int16 (bf16 bits), contiguous CPU tensors");
    torch::Tensor out = c.clone();
    l2l_fast::cpu::avx512_amx::emulated_dpbf16ps(out.data_ptr<float>(), reinterpret_cast<const uint16_t*>(a.data_ptr<int16_t>()),
                                                 reinterpret_cast<const uint16_t*>(b.data_ptr<int16_t>()));
    return out;
  }, py::arg("c"), py::arg("a"), py::arg("b"),
        "Test only: the AMX emulator's TDPBF16PS (csrc/cpu/amx_tiles.h) on one full tile: c + a . b with b's rows "
        "bf16 pairs (VNNI layout); needs AVX-512 with AVX512_BF16");
  m.def("cpu_activation_f32", [](const torch::Tensor& x, const std::string& which) {
    TORCH_CHECK_VALUE(which == "sigmoid" || which == "tanh", "which: expected 'sigmoid' or 'tanh', got '", which, "'");
    TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 1 && x.is_contiguous(),
                      "x: expected a contiguous 1-D float32 CPU tensor");
    torch::Tensor y = torch::empty_like(x);
    l2l_fast::cpu::active_kernels().activation_f32(which == "tanh", x.data_ptr<float>(), y.data_ptr<float>(),
                                                   x.numel());
    return y;
  }, py::arg("x"), py::arg("which"),
        "The CPU kernels' own float32 sigmoid or tanh (instruction set and activations in use) of x [n]: a new "
        "tensor, for the accuracy tests and scripts/scan_activations.py");
  m.def("cpu_activation_scan", [](const std::string& which, int64_t first_bits, int64_t count) {
    TORCH_CHECK_VALUE(which == "sigmoid" || which == "tanh", "which: expected 'sigmoid' or 'tanh', got '", which, "'");
    TORCH_CHECK_VALUE(count >= 0, "count: expected >= 0");
    const bool tanh = which == "tanh";
    constexpr int64_t kBlock = 4096;
    std::vector<float> x(kBlock), y(kBlock);
    double worst = 0, worst_x = 0;
    bool nan_ok = true, in_range = true;
    for (int64_t at = 0; at < count; at += kBlock) {
      const int64_t m = std::min(kBlock, count - at);
      for (int64_t j = 0; j < m; ++j) {
        const uint32_t bits = uint32_t(first_bits + at + j);
        std::memcpy(&x[j], &bits, sizeof(float));
      }
      l2l_fast::cpu::active_kernels().activation_f32(tanh, x.data(), y.data(), m);
      for (int64_t j = 0; j < m; ++j) {
        const double xd = x[j], yd = y[j];
        if (std::isnan(xd)) {
          nan_ok = nan_ok && std::isnan(yd);
          continue;
        }
        const double exact = tanh ? std::tanh(xd) : 1.0 / (1.0 + std::exp(-xd));
        const double err = std::fabs(yd - exact);
        in_range = in_range && (tanh ? yd >= -1.0 : yd >= 0.0) && yd <= 1.0;
        if (!(err <= worst)) {  // a NaN error (NaN output for a non-NaN input) is the worst there is
          worst = std::isnan(err) ? INFINITY : err;
          worst_x = xd;
        }
      }
    }
    return std::make_tuple(worst, worst_x, nan_ok, in_range);
  }, py::arg("which"), py::arg("first_bits"), py::arg("count"),
        "Scan of the CPU kernels' own float32 sigmoid or tanh over `count` consecutive bit patterns from "
        "`first_bits` (as uint32): (max |f - exact| over non-NaN inputs, the input there, every NaN input gave "
        "NaN, every output in the function's range); exact: libm in double. For scripts/scan_activations.py");
  m.def("empty_cpu_cache", &l2l_fast::cpu::release_cached_outputs,
        "Give the unused blocks of the CPU output cache back to the system; returns the bytes released");
  m.def("cpu_cache_bytes", &l2l_fast::cpu::cached_output_bytes, "Bytes held in unused CPU output cache blocks");
  m.def("feature_table", [] {
    std::vector<std::tuple<std::string, int64_t, int64_t, bool>> table;
    for (const l2l_fast::FeatureInfo& f : l2l_fast::kFeatureTable)
      table.emplace_back(f.name, f.bit, f.width, f.reads_moments);
    return table;
  }, "The kernels' input features as (name, bit, width, reads_moments), in bit order (l2l_fast.features mirrors "
     "it)");
  m.def("packed_cache_stats", [] {
    const l2l_fast::PackedCacheStats s = l2l_fast::packed_cache_stats();
    return std::map<std::string, int64_t>{{"hits", s.hits},         {"misses", s.misses},   {"stale", s.stale},
                                          {"bypassed", s.bypassed}, {"entries", s.entries}, {"capacity", s.capacity}};
  }, "Counters of the cache of packed weights (csrc/packed_cache.h)");
  m.def("clear_packed_cache", &l2l_fast::clear_packed_cache,
        "Drop every cached packing of the weights (needed after writes to CUDA weights that bypass the version "
        "counter, e.g. through w.data)");
  m.def("set_packed_cache_capacity", &l2l_fast::set_packed_cache_capacity, py::arg("entries"),
        "Weight versions kept packed at most (0 turns the cache off); returns the previous capacity");
  m.def("has_cuda_kernels", [] {
#ifdef L2L_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
