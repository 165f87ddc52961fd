// AVX-512 build whose float gate products take bf16 operands (vdpbf16ps, AVX512_BF16), with the fast
// activations: selected by L2L_FAST_CPU_PRODUCTS=bf16 or set_cpu_products("bf16") (csrc/cpu/PRODUCTS.md).
// Its float64 kernels are the avx512 build's.
#include "cpu/kernel_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,avx2,fma")
#define L2L_ISA avx512_bf16
#define L2L_ISA_NAME "avx512"
#define L2L_VEC_BYTES 64
#define L2L_X86_RCP 1
#define L2L_TILE_VECTORS 4
#define L2L_BF16_PRODUCTS 1
#define L2L_PRODUCTS_NAME "bf16"
#include "cpu/kernel_body.inc"
#else
namespace l2l_fast { namespace cpu { namespace avx512_bf16 { extern const CpuKernels kernels{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "fast", nullptr, "bf16"}; } } }
#endif
