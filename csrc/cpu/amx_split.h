// The split of the AMX products' float operands into bf16 pieces (csrc/cpu/PRODUCTS.md, "AMX tiles", Split), both
// layouts from one conversion: two rows a, b of a tile's 64 coordinates become
//   rows    piece p of a, then of b: 64 bf16 words each (the weight gradients' A tiles, their B's transposes);
//   pairs   piece p's pair row: dword c = (a_p[c] low, b_p[c] high), 64 dwords (the VNNI layout of a B tile).
// vcvtne2ps2bf16 rounds a's (and b's) 32 coordinates of a half at once, which is the row layout; the pair layout
// interleaves the two bf16 rows (vpermt2w), and the remainders x - x_p come from the pairs (shift, mask: the bf16
// value as a float), exact in float32. The same pieces as converting each layout on its own, so the same products.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace l2l_fast {
namespace cpu {
namespace amx {

// a, b: the rows' 4 vectors of 16 coordinates (consumed); piece p's pair row at pairs + p * pair_piece_words; with
// Rows, its row of a at rows + p * row_piece_words and b's 64 words after (a template flag: no test in the loops).
template <int Pieces, bool Rows>
static inline void split_pair_rows(__m512 (&a)[4], __m512 (&b)[4], uint32_t* pairs, int64_t pair_piece_words,
                                   uint16_t* rows, int64_t row_piece_words) {
  // word 2i of a pair row: a's word i of the half, word 2i + 1: b's (index 32 + i picks the second operand)
  static const uint16_t kLow[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  static const uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_loadu_si512(kLow), high = _mm512_loadu_si512(kHigh);
  const __m512i high_half = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int p = 0; p < Pieces; ++p)
    for (int h = 0; h < 2; ++h) {  // coordinates 32 h .. 32 h + 31
      const __m512i ra = (__m512i)_mm512_cvtne2ps_pbh(a[2 * h + 1], a[2 * h]);
      const __m512i rb = (__m512i)_mm512_cvtne2ps_pbh(b[2 * h + 1], b[2 * h]);
      if constexpr (Rows) {
        _mm512_storeu_si512(rows + p * row_piece_words + 32 * h, ra);
        _mm512_storeu_si512(rows + p * row_piece_words + 64 + 32 * h, rb);
      }
      const __m512i pair0 = _mm512_permutex2var_epi16(ra, low, rb), pair1 = _mm512_permutex2var_epi16(ra, high, rb);
      _mm512_storeu_si512(pairs + p * pair_piece_words + 32 * h, pair0);
      _mm512_storeu_si512(pairs + p * pair_piece_words + 32 * h + 16, pair1);
      if (p + 1 < Pieces) {  // the last piece's remainder is not needed
        a[2 * h] = _mm512_sub_ps(a[2 * h], _mm512_castsi512_ps(_mm512_slli_epi32(pair0, 16)));
        b[2 * h] = _mm512_sub_ps(b[2 * h], _mm512_castsi512_ps(_mm512_and_si512(pair0, high_half)));
        a[2 * h + 1] = _mm512_sub_ps(a[2 * h + 1], _mm512_castsi512_ps(_mm512_slli_epi32(pair1, 16)));
        b[2 * h + 1] = _mm512_sub_ps(b[2 * h + 1], _mm512_castsi512_ps(_mm512_and_si512(pair1, high_half)));
      }
    }
}

}  // namespace amx
}  // namespace cpu
}  // namespace l2l_fast
