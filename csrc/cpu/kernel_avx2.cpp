// AVX2 + FMA build: 8 float lanes, 16 registers (tile of 2 vectors x 4 gates).
#include "cpu/kernel_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#define L2L_ISA avx2
#define L2L_ISA_NAME "avx2"
#define L2L_VEC_BYTES 32
// #pragma GCC target does not define __AVX512F__ / __AVX__ for the preprocessor
#define L2L_X86_RCP 1
#define L2L_TILE_VECTORS 2
#include "cpu/kernel_body.inc"
#else
namespace l2l_fast { namespace cpu { namespace avx2 { extern const CpuKernels kernels{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "fast", nullptr}; } } }
#endif
