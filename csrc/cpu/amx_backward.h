// The backward's own products on AMX tiles (csrc/cpu/PRODUCTS.md, "AMX tiles", Backward), per 64-coordinate tile
// and layer (K inputs, H units, G = 4H gate rows 4u + g, Gp = G rounded up to 32, zero rows past G):
//   d inputs        dZ [K x 64] = W^T [K x Gp] dG [Gp x 64]: GateTiles::gates with A = W^T tiles (16 inputs x 32
//                   gates, packed once per kernel object) and B = the gate gradients' pair rows (gates 2j, 2j + 1 x
//                   64 coordinates): the forward's schedule, the reduction over gate blocks of 32.
//   weight grads    dW [G x K] += dG [G x 64] Z [64 x K]: products below with A_i = dgate rows (16 gates x 32
//                   coordinates: bf16 rows, consecutive coordinates are a pair), B = the layer's inputs paired
//                   along coordinates (pair row j = coordinates 2j, 2j + 1 of a 32-block, 16 inputs: a transpose of
//                   the recompute's input pieces as bf16 rows, transpose16 below), 2 reduction blocks (the tile's 64
//                   coordinates).
// Both operands split into the forward's pieces, the products of order <= Pieces - 1 summed, smallest first.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/amx_tiles.h"

namespace l2l_fast {
namespace cpu {
namespace amx {

// One operand of a tile product: tile (piece p, reduction block r) at `at` + p piece_bytes + r block_bytes, its 16
// rows row_bytes apart.
struct TileOperand {
  const void* at;
  int64_t row_bytes, piece_bytes, block_bytes;
  const void* tile(int piece, int block) const {
    return static_cast<const char*>(at) + piece * piece_bytes + block * block_bytes;
  }
};

// C_i = sum over `blocks` r of the split product A_i[r] B[r], i < count <= 4, B shared by the accumulators (the
// weight gradients: 4 gate blocks x one input block). Tiles: 0-3 C_i, 4-5 A pieces, 6-7 B pieces. Per accumulator
// and block: bf16x3 2 A loads (+ 2 B loads per block, shared) and 3 TDPBF16PS; bf16x6 7 loads and 6 TDPBF16PS (as
// the forward's: 3 pieces of both operands do not fit beside 4 accumulators). c_i: 16 rows c_row_bytes apart.
template <int Pieces, class Backend>
class SharedBProducts {
 public:
  static void run(Backend& t, const TileOperand (&a)[4], const TileOperand& b, int count, int blocks,
                  float* const (&c)[4], int64_t c_row_bytes) {
    t.template zero<0>();
    t.template zero<1>();
    t.template zero<2>();
    t.template zero<3>();
    for (int r = 0; r < blocks; ++r) {
      if constexpr (Pieces == 2) {
        t.template load<6>(b.tile(0, r), b.row_bytes);
        t.template load<7>(b.tile(1, r), b.row_bytes);
      }
      acc<0>(t, a, b, count, r);
      acc<1>(t, a, b, count, r);
      acc<2>(t, a, b, count, r);
      acc<3>(t, a, b, count, r);
    }
    if (count > 0) t.template store<0>(c[0], c_row_bytes);
    if (count > 1) t.template store<1>(c[1], c_row_bytes);
    if (count > 2) t.template store<2>(c[2], c_row_bytes);
    if (count > 3) t.template store<3>(c[3], c_row_bytes);
  }

 private:
  template <int I>
  static void acc(Backend& t, const TileOperand (&a)[4], const TileOperand& b, int count, int r) {
    if (I >= count) return;
    const TileOperand& x = a[I];
    if constexpr (Pieces == 2) {  // a1 b0, a0 b1, a0 b0
      t.template load<4>(x.tile(0, r), x.row_bytes);
      t.template load<5>(x.tile(1, r), x.row_bytes);
      t.template dpbf16ps<I, 5, 6>();
      t.template dpbf16ps<I, 4, 7>();
      t.template dpbf16ps<I, 4, 6>();
    } else {  // a2 b0, a1 b1, a0 b2, a1 b0, a0 b1, a0 b0
      t.template load<4>(x.tile(2, r), x.row_bytes);
      t.template load<6>(b.tile(0, r), b.row_bytes);
      t.template dpbf16ps<I, 4, 6>();
      t.template load<5>(x.tile(1, r), x.row_bytes);
      t.template load<7>(b.tile(1, r), b.row_bytes);
      t.template dpbf16ps<I, 5, 7>();
      t.template load<4>(x.tile(0, r), x.row_bytes);
      t.template load<7>(b.tile(2, r), b.row_bytes);
      t.template dpbf16ps<I, 4, 7>();
      t.template dpbf16ps<I, 5, 6>();
      t.template load<7>(b.tile(1, r), b.row_bytes);
      t.template dpbf16ps<I, 4, 7>();
      t.template dpbf16ps<I, 4, 6>();
    }
  }
};

// r[j] lane n = r[n] lane j before: a 16 x 16 transpose of 32-bit words (16 unpacks of 32, 16 of 64 bits, 32
// 128-bit lane shuffles: 64 shuffles for 256 words, as compiled).
static inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

}  // namespace amx
}  // namespace cpu
}  // namespace l2l_fast
