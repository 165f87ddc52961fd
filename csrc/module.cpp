// The Python module l2l_fast._C: importing it runs the op registrations; it also exposes
// which kernels this build has, their table of input features and the CPU output cache's controls.
#include <torch/extension.h>

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
