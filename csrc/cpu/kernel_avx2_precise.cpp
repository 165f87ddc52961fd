// AVX2 + FMA build with the precise float activations (Cephes-style exp, the kernels' only ones before
// 2026-12-06), selected by L2L_FAST_CPU_ACTIVATIONS=precise: today's and the previous kernel side by side.
#include "cpu/kernel_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#define L2L_ISA avx2_precise
#define L2L_ISA_NAME "avx2"
#define L2L_VEC_BYTES 32
#define L2L_X86_RCP 1
#define L2L_TILE_VECTORS 2
#define L2L_PRECISE_ACTIVATIONS 1
#include "cpu/kernel_body.inc"
#else
namespace l2l_fast { namespace cpu { namespace avx2_precise { extern const CpuKernels kernels{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "precise", nullptr}; } } }
#endif
