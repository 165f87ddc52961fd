// The CPU kernels' entry points, one table per instruction set (generic, AVX2, AVX-512).
// Each table is compiled in its own translation unit with its own target flags
// (kernel_<isa>.cpp); the binding picks one at run time from what the CPU supports. AVX2 and AVX-512
// are built twice: with the fast float activations (the default) and with the precise ones
// (kernel_<isa>_precise.cpp), chosen at run time too. AVX-512 has a third build whose float gate products
// take bf16 operands (kernel_avx512_bf16.cpp, csrc/cpu/PRODUCTS.md), an explicit run-time option, and a fourth
// whose float gate products run on AMX tiles (kernel_avx512_amx.cpp), another.
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
  const char* activations;  // the float sigmoid/tanh: "fast" or "precise" (csrc/cpu/ACTIVATIONS.md)
  void (*activation_f32)(int which, const float* x, float* y, int64_t n);  // 0 sigmoid, 1 tanh; for tests
  const char* products;  // the float gate products: "float32", "bf16", "amx-bf16x3" or "amx-bf16x6" (" (emulated)"
                         // on emulated tiles; csrc/cpu/PRODUCTS.md); float64 is exact
  // forward_f32 on a bfloat16 state, its words read (widened) and written (rounded to nearest even, NaN ->
  // 0x7FC0) by the kernel itself; p.state and p.new_state are not read. The same bits as forward_f32 on the
  // state widened to float32 and rounded back.
  void (*forward_f32_bf16_state)(const StepParams<float>& p, const uint16_t* state, uint16_t* new_state,
                                 int64_t begin, int64_t end);
};

namespace generic { extern const CpuKernels kernels; }
namespace avx2 { extern const CpuKernels kernels; }
namespace avx512 { extern const CpuKernels kernels; }
// the same instruction sets with the precise activations (L2L_FAST_CPU_ACTIVATIONS=precise), for A/B runs
namespace avx2_precise { extern const CpuKernels kernels; }
namespace avx512_precise { extern const CpuKernels kernels; }
// AVX-512 with single-bf16 gate products (L2L_FAST_CPU_PRODUCTS=bf16), fast activations
namespace avx512_bf16 { extern const CpuKernels kernels; }
// AVX-512 with the gate products on AMX tiles from split bf16 operands (L2L_FAST_CPU_PRODUCTS=amx-bf16x3 or
// amx-bf16x6), fast activations: on the real tiles, or on the emulated ones (tests on CPUs without AMX)
namespace avx512_amx {
extern const CpuKernels bf16x3, bf16x6, bf16x3_emulated, bf16x6_emulated;
// the emulator's TDPBF16PS on memory: c [16][16] fp32 += a [16][32 bf16] . b [16 pair rows][32 bf16]; for its tests
void emulated_dpbf16ps(float* c, const uint16_t* a, const uint16_t* b);
}  // namespace avx512_amx

}  // namespace cpu
}  // namespace l2l_fast
