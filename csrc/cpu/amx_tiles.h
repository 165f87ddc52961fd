// The AMX tile instructions the gate products use, behind one small interface with two backends:
//   HardwareTiles  the real tiles (<immintrin.h> _tile_* intrinsics): LDTILECFG on construction, TILERELEASE on
//                  destruction, so one object per thread and kernel range;
//   EmulatedTiles  a model of the 8 tile registers and of the SDM's TILELOADD / TILESTORED / TILEZERO / TDPBF16PS,
//                  so that the kernels' index arithmetic, padding and operand split are checked on any AVX-512 CPU.
// Every tile is used at its full shape, 16 rows x 64 bytes (palette 1): 16 x 16 fp32, or 16 x 16 bf16 pairs.
// Torch-free. Included by kernel_avx512_amx.cpp only, after its `#pragma GCC target` (AVX-512 and AMX): the
// emulator is written with AVX-512 intrinsics and the hardware backend with AMX ones.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace l2l_fast {
namespace cpu {
namespace amx {

constexpr int kTiles = 8, kRows = 16, kRowBytes = 64;

// LDTILECFG's 64-byte operand (palette 1): every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved0[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < kTiles; ++t) colsb[t] = kRowBytes, rows[t] = kRows;
  }
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

#if defined(__x86_64__)
class HardwareTiles {
 public:
  HardwareTiles() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  ~HardwareTiles() { _tile_release(); }
  HardwareTiles(const HardwareTiles&) = delete;
  HardwareTiles& operator=(const HardwareTiles&) = delete;
  // gcc's _tile_* macros paste their tile number into the mnemonic, so they take no template parameter: the same
  // instructions here with the number as an immediate operand (AT&T order: sources first).
  template <int T> void load(const void* from, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(from), "r"(stride), "i"(T) : "memory");
  }
  template <int T> void store(void* to, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(to), "r"(stride), "i"(T) : "memory");
  }
  template <int T> void zero() { __asm__ volatile("tilezero %%tmm%c0" ::"i"(T)); }
  template <int C, int A, int B> void dpbf16ps() {
    static_assert(C != A && C != B && A != B, "TDPBF16PS: three different tiles (#UD otherwise)");
    __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
};
#endif

// The SDM's TDPBF16PS, per destination row m (C: 16 x 16 fp32; A: 16 rows of 16 bf16 pairs; B: 16 pair rows k of
// 16 columns n):  for k: for n: c[m][n] = FMA(a[m][2k], b[k][2n], c[m][n]);  c[m][n] = FMA(a[m][2k+1], b[k][2n+1], ..)
// with each FMA rounded to nearest even, bf16 and fp32 input denormals read as 0 (DAZ), fp32 results flushed to 0
// (FTZ), MXCSR ignored. Only the order of the adds is the model's own choice (Intel's intrinsics guide's; the SDM
// also allows the pair's two products to be summed first): the error bound in PRODUCTS.md holds for any order.
class EmulatedTiles {
 public:
  EmulatedTiles() { std::memset(reg_, 0, sizeof(reg_)); }
  template <int T> void load(const void* from, int64_t stride) {
    static_assert(T >= 0 && T < kTiles, "tile index");
    for (int r = 0; r < kRows; ++r) std::memcpy(reg_[T][r], static_cast<const char*>(from) + r * stride, kRowBytes);
  }
  template <int T> void store(void* to, int64_t stride) {
    static_assert(T >= 0 && T < kTiles, "tile index");
    for (int r = 0; r < kRows; ++r) std::memcpy(static_cast<char*>(to) + r * stride, reg_[T][r], kRowBytes);
  }
  template <int T> void zero() {
    static_assert(T >= 0 && T < kTiles, "tile index");
    std::memset(reg_[T], 0, sizeof(reg_[T]));
  }
  template <int C, int A, int B> void dpbf16ps() {
    static_assert(C >= 0 && C < kTiles && A >= 0 && A < kTiles && B >= 0 && B < kTiles, "tile index");
    static_assert(C != A && C != B && A != B, "TDPBF16PS: three different tiles (#UD otherwise)");
    dpbf16ps_rows(reg_[C], reg_[A], reg_[B]);
  }

  // The instruction on memory operands (c [16][16] fp32, a [16][32] bf16, b [16][32] bf16): for the model's tests.
  static void dpbf16ps_on(float* c, const uint16_t* a, const uint16_t* b) {
    alignas(64) uint8_t tc[kRows][kRowBytes], ta[kRows][kRowBytes], tb[kRows][kRowBytes];
    std::memcpy(tc, c, sizeof(tc));
    std::memcpy(ta, a, sizeof(ta));
    std::memcpy(tb, b, sizeof(tb));
    dpbf16ps_rows(tc, ta, tb);
    std::memcpy(c, tc, sizeof(tc));
  }

 private:
  // fp32 bit patterns with a zero exponent (denormals) become a zero of their sign
  static __m512i flush_denormals(__m512i bits) {
    const __m512i exponent = _mm512_and_si512(bits, _mm512_set1_epi32(0x7F800000));
    const __mmask16 denormal = _mm512_cmpeq_epi32_mask(exponent, _mm512_setzero_si512());
    return _mm512_mask_and_epi32(bits, denormal, bits, _mm512_set1_epi32(int(0x80000000u)));
  }
  static float flush_denormal(uint32_t bits) {
    if ((bits & 0x7F800000u) == 0) bits &= 0x80000000u;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }

  static void dpbf16ps_rows(uint8_t (*c)[kRowBytes], const uint8_t (*a)[kRowBytes], const uint8_t (*b)[kRowBytes]) {
    const __m512i high_half = _mm512_set1_epi32(int(0xFFFF0000u));
    __m512 b_even[kRows], b_odd[kRows];  // make_fp32 of each pair's halves, DAZ
    for (int k = 0; k < kRows; ++k) {
      const __m512i pairs = _mm512_loadu_si512(b[k]);
      b_even[k] = _mm512_castsi512_ps(flush_denormals(_mm512_slli_epi32(pairs, 16)));
      b_odd[k] = _mm512_castsi512_ps(flush_denormals(_mm512_and_si512(pairs, high_half)));
    }
    for (int m = 0; m < kRows; ++m) {
      __m512 acc = _mm512_castsi512_ps(flush_denormals(_mm512_loadu_si512(c[m])));
      for (int k = 0; k < kRows; ++k) {
        uint32_t pair;
        std::memcpy(&pair, a[m] + 4 * k, sizeof(pair));
        const __m512 a_even = _mm512_set1_ps(flush_denormal(pair << 16));
        const __m512 a_odd = _mm512_set1_ps(flush_denormal(pair & 0xFFFF0000u));
        acc = _mm512_castsi512_ps(flush_denormals(_mm512_castps_si512(_mm512_fmadd_ps(a_even, b_even[k], acc))));
        acc = _mm512_castsi512_ps(flush_denormals(_mm512_castps_si512(_mm512_fmadd_ps(a_odd, b_odd[k], acc))));
      }
      _mm512_storeu_ps(c[m], acc);
    }
  }

  alignas(64) uint8_t reg_[kTiles][kRows][kRowBytes];
};

}  // namespace amx
}  // namespace cpu
}  // namespace l2l_fast
