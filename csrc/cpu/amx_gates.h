// The gate products of one group of 4 LSTM units for a 64-coordinate tile on AMX tiles (csrc/cpu/PRODUCTS.md,
// "AMX tiles"): C_v = A B_v for the tile's 4 coordinate blocks v, where
//   A    16 rows (unit 4q + m / 4, gate m % 4) x 32 bf16 inputs of one k-block: the weights, [block][piece] tiles;
//   B_v  16 pair rows j (inputs 2j, 2j + 1 of the block) x the 16 coordinates of block v: the inputs' pair rows;
//   C_v  16 gate rows x 16 coordinates, fp32: row m is one gate of one unit across the block, a vector.
// Each operand is split into bf16 pieces, x = x_0 + x_1 (+ x_2), and the products whose pieces' orders add up to
// at most Pieces - 1 are summed, small ones first: Pieces = 2 is bf16x3 (3 products), Pieces = 3 is bf16x6 (6).
// Tiles: 0-3 the accumulators C_0..C_3, 4-5 weight pieces, 6-7 input pieces.
#pragma once
#include <cstdint>
#include <utility>

#include "cpu/amx_backward.h"
#include "cpu/amx_tiles.h"

namespace l2l_fast {
namespace cpu {
namespace amx {

constexpr int kBlockInputs = 32;                  // inputs per k-block: 16 pairs
constexpr int kWeightTileWords = kRows * kBlockInputs;  // bf16 words of one A tile

class GateTiles {
 public:
  virtual ~GateTiles() = default;
  virtual int pieces() const = 0;
  // c [4][16][16] = A B over `blocks` k-blocks; a: [block][piece] A tiles; pairs: piece p's pair row j at
  // pairs + p * piece_words + j * 64 (64 coordinates a row), the coordinates of block v at word 16 v of a row.
  virtual void gates(const uint16_t* a, const uint32_t* pairs, int64_t piece_words, int blocks, float* c) = 0;
  // The backward's weight gradients (amx_backward.h): c_i = sum over `blocks` of A_i B, i < count <= 4, B shared.
  virtual void products(const TileOperand (&a)[4], const TileOperand& b, int count, int blocks, float* const (&c)[4],
                        int64_t c_row_bytes) = 0;
};

template <class Backend, int Pieces>
class SplitGateTiles final : public GateTiles {
  static_assert(Pieces == 2 || Pieces == 3, "bf16x3 (2 pieces) or bf16x6 (3 pieces)");
  static constexpr int64_t kPairRowBytes = 64 * 4, kWeightRowBytes = kBlockInputs * 2;

 public:
  int pieces() const override { return Pieces; }

  void gates(const uint16_t* a, const uint32_t* pairs, int64_t piece_words, int blocks, float* c) override {
    tiles_.template zero<0>();
    tiles_.template zero<1>();
    tiles_.template zero<2>();
    tiles_.template zero<3>();
    for (int kb = 0; kb < blocks; ++kb) {
      const uint16_t* w = a + int64_t(kb) * Pieces * kWeightTileWords;
      const uint32_t* x = pairs + int64_t(kb) * kRows * 64;
      each_block(w, x, piece_words, std::make_integer_sequence<int, 4>{});
    }
    tiles_.template store<0>(c + 0 * 256, kRowBytes);
    tiles_.template store<1>(c + 1 * 256, kRowBytes);
    tiles_.template store<2>(c + 2 * 256, kRowBytes);
    tiles_.template store<3>(c + 3 * 256, kRowBytes);
  }

  void products(const TileOperand (&a)[4], const TileOperand& b, int count, int blocks, float* const (&c)[4],
                int64_t c_row_bytes) override {
    SharedBProducts<Pieces, Backend>::run(tiles_, a, b, count, blocks, c, c_row_bytes);
  }

 private:
  template <int... V>
  void each_block(const uint16_t* w, const uint32_t* x, int64_t piece_words, std::integer_sequence<int, V...>) {
    if constexpr (Pieces == 2) {
      tiles_.template load<4>(w, kWeightRowBytes);
      tiles_.template load<5>(w + kWeightTileWords, kWeightRowBytes);
    }
    (block<V>(w, x, piece_words), ...);
  }

  template <int V>
  void block(const uint16_t* w, const uint32_t* x, int64_t piece_words) {
    [[maybe_unused]] auto weights = [&](int piece) { return w + piece * kWeightTileWords; };
    auto inputs = [&](int piece) { return x + piece * piece_words + V * 16; };
    if constexpr (Pieces == 2) {  // w1 x0, w0 x1, w0 x0
      tiles_.template load<6>(inputs(0), kPairRowBytes);
      tiles_.template load<7>(inputs(1), kPairRowBytes);
      tiles_.template dpbf16ps<V, 5, 6>();
      tiles_.template dpbf16ps<V, 4, 7>();
      tiles_.template dpbf16ps<V, 4, 6>();
    } else {  // w2 x0, w1 x1, w0 x2, w1 x0, w0 x1, w0 x0
      tiles_.template load<4>(weights(2), kWeightRowBytes);
      tiles_.template load<6>(inputs(0), kPairRowBytes);
      tiles_.template dpbf16ps<V, 4, 6>();
      tiles_.template load<5>(weights(1), kWeightRowBytes);
      tiles_.template load<7>(inputs(1), kPairRowBytes);
      tiles_.template dpbf16ps<V, 5, 7>();
      tiles_.template load<4>(weights(0), kWeightRowBytes);
      tiles_.template load<7>(inputs(2), kPairRowBytes);
      tiles_.template dpbf16ps<V, 4, 7>();
      tiles_.template dpbf16ps<V, 5, 6>();
      tiles_.template load<7>(inputs(1), kPairRowBytes);
      tiles_.template dpbf16ps<V, 4, 7>();
      tiles_.template dpbf16ps<V, 4, 6>();
    }
  }

  Backend tiles_;
};

}  // namespace amx
}  // namespace cpu
}  // namespace l2l_fast
