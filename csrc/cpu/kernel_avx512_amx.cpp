// AVX-512 build whose float gate products run on AMX tiles from split bf16 operands (csrc/cpu/PRODUCTS.md,
// "AMX tiles"), with the fast activations: selected by L2L_FAST_CPU_PRODUCTS or set_cpu_products as "amx-bf16x3"
// or "amx-bf16x6"; on the real tiles where the CPU and OS have them, on the emulated ones where the test switch
// L2L_FAST_CPU_AMX_EMULATE=1 asks (isa_select.cpp). Its float64 kernels are the avx512 build's.
#include "cpu/kernel_prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,avx2,fma,amx-tile,amx-bf16")
#include "cpu/amx_gates.h"
#include "cpu/amx_split.h"
#define L2L_ISA avx512_amx
#define L2L_ISA_NAME "avx512"
#define L2L_VEC_BYTES 64
#define L2L_X86_RCP 1
#define L2L_TILE_VECTORS 4
#define L2L_AMX_PRODUCTS 1
#include "cpu/kernel_body.inc"

namespace l2l_fast {
namespace cpu {
namespace avx512_amx {
namespace {

// One set of tiles per thread and range: the hardware backend configures them here and releases them after.
template <class Tiles>
void amx_forward(const StepParams<float>& p, int64_t begin, int64_t end) {
  Tiles tiles;
  TileKernel<float, L2L_TILE_VECTORS> kernel(p, false);
  kernel.use_tiles(&tiles);
  kernel.forward(begin, end);
}

template <class Tiles>
void amx_forward_bf16_state(const StepParams<float>& p, const uint16_t* state, uint16_t* new_state, int64_t begin,
                            int64_t end) {
  Tiles tiles;
  TileKernel<float, L2L_TILE_VECTORS, uint16_t> kernel(p, false, state, new_state);
  kernel.use_tiles(&tiles);
  kernel.forward(begin, end);
}

template <class Tiles>
void amx_backward(const StepParams<float>& p, int64_t begin, int64_t end, double* d_weights) {
  Tiles tiles;
  TileKernel<float, L2L_TILE_VECTORS> kernel(p, true);
  kernel.use_tiles(&tiles);
  kernel.backward(begin, end, d_weights);
}

template <class Tiles>
constexpr CpuKernels amx_table(const char* products) {
  return CpuKernels{L2L_ISA_NAME,          &amx_forward<Tiles>,
                    &forward_range<double>, &amx_backward<Tiles>,
                    &backward_range<double>, TileKernel<float, L2L_TILE_VECTORS>::B,
                    TileKernel<double, L2L_TILE_VECTORS>::B, L2L_ACTIVATIONS_NAME,
                    &activation_f32,        products,
                    &amx_forward_bf16_state<Tiles>};
}

}  // namespace

extern const CpuKernels bf16x3 = amx_table<amx::SplitGateTiles<amx::HardwareTiles, 2>>("amx-bf16x3");
extern const CpuKernels bf16x6 = amx_table<amx::SplitGateTiles<amx::HardwareTiles, 3>>("amx-bf16x6");
extern const CpuKernels bf16x3_emulated = amx_table<amx::SplitGateTiles<amx::EmulatedTiles, 2>>("amx-bf16x3 (emulated)");
extern const CpuKernels bf16x6_emulated = amx_table<amx::SplitGateTiles<amx::EmulatedTiles, 3>>("amx-bf16x6 (emulated)");

void emulated_dpbf16ps(float* c, const uint16_t* a, const uint16_t* b) { amx::EmulatedTiles::dpbf16ps_on(c, a, b); }

}  // namespace avx512_amx
}  // namespace cpu
}  // namespace l2l_fast
#else
namespace l2l_fast { namespace cpu { namespace avx512_amx {
extern const CpuKernels kernels{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "fast", nullptr, "float32"};
extern const CpuKernels bf16x3{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "fast", nullptr, "amx-bf16x3"};
extern const CpuKernels bf16x6{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "fast", nullptr, "amx-bf16x6"};
extern const CpuKernels bf16x3_emulated{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "fast", nullptr, "amx-bf16x3 (emulated)"};
extern const CpuKernels bf16x6_emulated{"unavailable", nullptr, nullptr, nullptr, nullptr, 0, 0, "fast", nullptr, "amx-bf16x6 (emulated)"};
void emulated_dpbf16ps(float*, const uint16_t*, const uint16_t*) {}
} } }
#endif
