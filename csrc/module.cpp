// The Python module l2l_fast._C: importing it runs the op registrations; it also exposes
// which kernels this build has.
#include <torch/extension.h>

#include "cpu/isa_select.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", &l2l_fast::cpu::active_isa_name, "Instruction set of the CPU kernels in use");
  m.def("set_cpu_isa", &l2l_fast::cpu::select_isa,
        "Use the CPU kernels built for `isa` ('generic', 'avx2', 'avx512' or 'auto'); returns the one in use");
  m.def("has_cuda_kernels", [] {
#ifdef L2L_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
