// The backward's weight-gradient reduction on tensor cores (L2L_FAST_CUDA_BACKWARD=mma_wgrad or mma, gate_variant.h):
// step 3 of backward_body.h, dW[rows, K + 1] += dz^T x over one staged tile, as warp-wide mma.m16n8k8 TF32
// in 3xTF32 instead of reduce_weight_grads' FFMA loop. Torch-free; the CPU emulation runs this code.
//   M: the gate rows (4H of an LSTM layer, 1 of the output layer), m-tiles of 16;
//   N: the K + 1 inputs (the last one the bias column, staged as 1), n-tiles of 8;
//   k: the tile's coordinates, 8 per mma (a tile is 32, 64 or 128; inactive coordinates are staged as zeros
//      in both x and dz, so they add exactly 0).
// Work items (one m-tile, up to kMmaGradChunk n-tiles) go round-robin to the block's warps; each C entry of an
// item is one lane's, and each partial entry one C entry's: every partial entry is added to by exactly one lane,
// so the sums and their order do not depend on timing (no atomics).
// Fragment layouts: mma_tf32.h / forward_mma_body.h (PTX ISA). Permutation (free: it only relabels D's rows):
//   row r of m-tile m is gate 16 m + 2 (r % 8) + r / 8, so a lane's a0, a1 (rows g, g + 8) are the adjacent
//   gates 16 m + 2 g, + 1 of coordinate tig (one 8-byte load), a2, a3 the same of coordinate tig + 4.
// Padding: rows >= `rows` and columns > K read whatever lies there (in bounds: the staging's next row or the
// next staging array, BackwardSmem); a D entry depends on its own A row and B column only, and those are never
// stored.
//
// Error analysis (what 3xTF32 over a tile of T coordinates adds; a = dz, b = x, S = sum over the tile |a b|):
//   split: a = a_hi + a_lo, a_hi = rna_tf32(a) (integer rounding), a_lo = a - a_hi exact in float32,
//     |a_lo| <= 2^-11 |a|, handed to the mma unrounded: it reads a_lo' with |a_lo - a_lo'| < 2^-10 |a_lo|
//     <= 2^-21 |a| (truncation to TF32, the worst the tensor core can do with the low 13 bits: it ignores them;
//     ptxas relies on it too, feeding the HMMA hi = bits + 0x1000 before the mask, and so do CUTLASS's TF32
//     converters). Dropped of each product:
//       a_hi (b_lo - b_lo') + (a_lo - a_lo') b_hi + a_lo b_lo, at most (4 (1 + 2^-11) + 1) 2^-22 |a b|
//     < 5.01 * 2^-22 |a b| = 1.2e-6 |a b| (mma_tf32.h's forward, whose B is split once with
//     both parts rounded: 4.01 * 2^-22).
//   sums: a_hi b_hi goes into its own accumulator, the two small products into another. The big one adds T
//     products, like the FFMA loop's T roundings: at most T u S (u = 2^-24 rounding to nearest as the CPU model,
//     2^-23 if the hardware truncates); the small one adds 2T products of at most 2^-10 |a b| each: 2 T u 2^-10 S.
//     Their float32 sum rounds once more (u S), and the tiles add up in float64.
//   So a tile's weight gradient is within (1.2e-6 + (T + 1) u (1 + 2^-9)) S of exact, where the FFMA loop's bound
//   is T u S: T = 128, u = 2^-24: 8.8e-6 S against 7.6e-6 S (1.16x; 2.2x if the tensor cores truncate).
// The float32 WEIGHT_GRAD rule of tests/tolerances.py (at most 2x plain PyTorch float32's error from the float64
// reference, plus 3e-6 of the largest weight gradient) is not a worst-case bound for either kernel: their
// rounding errors are random-signed and grow like sqrt(T) per tile, and so do the split's dropped terms
// (a_lo, b_lo are signed independently of a, b): 2.4e-7 |a b| rms per product against the big accumulator's
// ~u sqrt(T / 6) |partial sum| per tile, which the split adds to in quadrature (~1.3x the FFMA loop's typical
// error at T = 128). PyTorch's float32 sums run over all n coordinates, the kernels' restart in float64 every T,
// so the margin grows with n; at the tests' n <= a few tiles the floor covers the rest. Measured in the emulation
// (tests/test_cuda_mma_backward_emulated.py, NOTES.md "The mma backward"): within the same rule, unloosened.
#pragma once

#include "cuda/device_math.h"
#include "cuda/kernel_args.h"
#include "cuda/mma_tf32.h"

namespace l2l_fast {
namespace cuda {

// n-tiles per work item: 2 x 3 x 4 = 24 accumulator registers; 3 balances the paper's top layer (5 m-tiles x 2
// chunks + 1 output item over 4 warps: 3, 3, 3, 2 items) at 10 loaded values per 9 mma.
constexpr int kMmaGradChunk = 3;

// Each staged value is split by mma_tf32.h's split_frag (lo unrounded: see the analysis above). A NaN stays NaN
// (hi = -0, lo = NaN: a poisoned coordinate's dz poisons every sum it enters); +-Inf becomes NaN (lo = Inf - Inf),
// which only a poisoned coordinate stages.

// Two adjacent staged values (8-byte aligned: even offsets in a staging array of 16-byte rows).
struct Pair {
  float v[2];
};

L2L_DEVICE Pair load_pair(const float* p) {
#if defined(__CUDA_ARCH__)
  const float2 q = *reinterpret_cast<const float2*>(p);
  return Pair{{q.x, q.y}};
#else
  return Pair{{p[0], p[1]}};
#endif
}

// A fragment (gate rows of m-tile m, coordinates t0 + tig and t0 + tig + 4) from dz [coordinate][sdz]: for G == 4
// the permuted gates 16 m + 2 g, + 1; for G == 1 (the output layer, one row) the same value in every row.
template <int G>
L2L_DEVICE void load_a(const float* dz, int sdz, int m, int t0, int lane, FragA& hi, FragA& lo) {
  const int g = lane / 4, t = t0 + lane % 4;
  static_assert(G == 4 || G == 1, "an LSTM layer (4 gates) or the output layer (1)");
  float v[4];
  if constexpr (G == 4) {
    const Pair p0 = load_pair(dz + t * sdz + 16 * m + 2 * g);
    const Pair p1 = load_pair(dz + (t + 4) * sdz + 16 * m + 2 * g);
    v[0] = p0.v[0], v[1] = p0.v[1], v[2] = p1.v[0], v[3] = p1.v[1];
  } else {
    v[0] = v[1] = dz[t * sdz];
    v[2] = v[3] = dz[(t + 4) * sdz];
  }
  split_frag(v, hi, lo);
}

// partial += one n-tile's accumulators (big + small): a lane's c_i is gate j0 + i / 2 (j0 = 16 m + 2 g, even: j0 and
// j0 + 1 are gates of one unit when G == 4; for G == 1 only j0 == 0 exists) and input k0 + i % 2 (k0 = 8 n + 2 tig),
// stored where they exist (gate < rows, input <= K; input K is the bias column).
template <int G>
L2L_DEVICE void add_fragment(const GradTarget& to, int j0, int k0, const FragA& big, const FragA& small,
                             double* partial) {
  const int u = int(unsigned(j0) / G), gate = int(unsigned(j0) % G);
  double* w = partial + to.weights + (int64_t(u) * to.K * G + gate);  // input k, gate + d at w[k G + d]
  double* b = partial + to.bias + (int64_t(u) * G + gate);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int d = i / 2, k = k0 + i % 2;
    if (j0 + d >= to.units * G || k > to.K) continue;
    double* at = k < to.K ? w + k * G + d : b + d;
    *at += double(big.v[i] + small.v[i]);
  }
}

// partial[target] += sum over the tile of dz[t][u G + g] * x[t][k] (x[t][K] == 1: the bias), as reduce_weight_grads
// (backward_body.h) with the same staging, on tensor cores. `skew` rotates the items over the warps (the previous
// call's item count, so that the output layer's item goes to a warp with fewer); returns this call's item count.
// Every thread of the block calls it (whole warps, converged).
template <int G, class Ctx>
L2L_DEVICE int mma_weight_grads(const Ctx& ctx, const float* x, int sx, const float* dz, int sdz, const GradTarget& to,
                                double* partial, int skew = 0) {
  constexpr int C = kMmaGradChunk;
  const int lane = ctx.lane(), g = lane / 4, tig = lane % 4;
  const int m_tiles = (to.units * G + 15) / 16, n_tiles = (to.K + 1 + 7) / 8;
  const int items = m_tiles * ((n_tiles + C - 1) / C);
  const int warps = ctx.threads() / 32, tile = ctx.threads();
  for (int item = (ctx.thread() / 32 + warps - skew % warps) % warps; item < items; item += warps) {
    const int m = item % m_tiles, n0 = item / m_tiles * C;  // m fastest: the warps share a chunk's B values
    FragA big[C], small[C];
#pragma unroll
    for (int j = 0; j < C; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) big[j].v[i] = small[j].v[i] = 0.0f;
#pragma unroll 1
    for (int t0 = 0; t0 < tile; t0 += 8) {
      FragA a_hi, a_lo;
      load_a<G>(dz, sdz, m, t0, lane, a_hi, a_lo);
#pragma unroll
      for (int j = 0; j < C; ++j) {
        if (n0 + j >= n_tiles) break;  // the same for the whole warp
        const int col = 8 * (n0 + j) + g;
        const Tf32Split b0 = split_tf32_lo_unrounded(x[(t0 + tig) * sx + col]);
        const Tf32Split b1 = split_tf32_lo_unrounded(x[(t0 + tig + 4) * sx + col]);
        const FragB b_hi{{b0.hi, b1.hi}}, b_lo{{b0.lo, b1.lo}};
        ctx.mma_tf32(small[j], a_lo, b_hi);
        ctx.mma_tf32(small[j], a_hi, b_lo);
        ctx.mma_tf32(big[j], a_hi, b_hi);
      }
    }
#pragma unroll
    for (int j = 0; j < C; ++j) {
      if (n0 + j >= n_tiles) break;
      add_fragment<G>(to, 16 * m + 2 * g, 8 * (n0 + j) + 2 * tig, big[j], small[j], partial);
    }
  }
  return items;
}

}  // namespace cuda
}  // namespace l2l_fast
