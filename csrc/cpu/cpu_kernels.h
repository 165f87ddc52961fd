// The CPU kernels' entry points, one table per instruction set (generic, AVX2, AVX-512).
// Each table is compiled in its own translation unit with its own target flags
// (kernel_<isa>.cpp); the binding picks one at run time from what the CPU supports.
#pragma once
#include <cstdint>

#include "lstm_layout.h"

namespace l2l_fast {
namespace cpu {

struct CpuKernels {
  const char* name;
  // Forward / in-place step over coordinates [begin, end): writes update, new_state, param.
  void (*forward_f32)(const StepParams<float>&, int64_t begin, int64_t end);
  void (*forward_f64)(const StepParams<double>&, int64_t begin, int64_t end);
  // Backward over [begin, end): writes grad_grad and grad_state there and adds this range's
  // weight gradients (packed layout, layout.size() values) into `d_weights`.
  void (*backward_f32)(const StepParams<float>&, int64_t begin, int64_t end, double* d_weights);
  void (*backward_f64)(const StepParams<double>&, int64_t begin, int64_t end, double* d_weights);
  int64_t tile_f32;  // coordinates per tile: ranges are best split at multiples of it
  int64_t tile_f64;
};

namespace generic { extern const CpuKernels kernels; }
namespace avx2 { extern const CpuKernels kernels; }
namespace avx512 { extern const CpuKernels kernels; }

}  // namespace cpu
}  // namespace l2l_fast
