// The Python module l2l_fast._C: importing it runs the op registrations; it also exposes
// which kernels this build has and the CPU output cache's controls.
#include <torch/extension.h>

#include "cpu/isa_select.h"
#include "cpu/output_cache.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", &l2l_fast::cpu::active_isa_name, "Instruction set of the CPU kernels in use");
  m.def("set_cpu_isa", &l2l_fast::cpu::select_isa,
        "Use the CPU kernels built for `isa` ('generic', 'avx2', 'avx512' or 'auto'); returns the one in use");
  m.def("empty_cpu_cache", &l2l_fast::cpu::release_cached_outputs,
        "Give the unused blocks of the CPU output cache back to the system; returns the bytes released");
  m.def("cpu_cache_bytes", &l2l_fast::cpu::cached_output_bytes, "Bytes held in unused CPU output cache blocks");
  m.def("has_cuda_kernels", [] {
#ifdef L2L_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
