// AVX-512 build: 16 float lanes, 32 registers (tile of 4 vectors x 4 gates).
#include "cpu/kernel_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define L2L_ISA avx512
#define L2L_ISA_NAME "avx512"
#define L2L_VEC_BYTES 64
// #pragma GCC target does not define __AVX512F__ / __AVX__ for the preprocessor
#define L2L_X86_RCP 1
#define L2L_TILE_VECTORS 4
#include "cpu/kernel_body.inc"
#else
namespace l2l_fast { namespace cpu { namespace avx512 { extern const CpuKernels kernels{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "fast", nullptr}; } } }
#endif
