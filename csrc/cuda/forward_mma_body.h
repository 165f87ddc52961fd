// Forward / in-place step on tensor cores, for the compiled-in net (hidden 20, 2 layers, float32 math,
// first-layer inputs <= 4): the body of forward_mma_kernel, written against an execution context with
// a warp-wide ctx.mma_tf32 so that the CPU emulation (tests/cuda_emulation) runs this very code.
//
// A warp takes Tiles m-tiles of 16 coordinates (2: L2L_FAST_CUDA_GATES=mma, 1: mma16) and computes each
// layer's gates as
//   Z[16 coords, 80] = X[16, K] W^T[K, 80] + bias       (mma.m16n8k8 TF32, 3xTF32 split: mma_tf32.h)
// Fragment layouts (PTX ISA, mma.m16n8k8 with .tf32; lane = 4 groupID + tig, tig = threadID_in_group):
//   A: a0 (row groupID, col tig), a1 (row groupID + 8, col tig), a2 (groupID, tig + 4), a3 (groupID + 8, tig + 4)
//   B: b0 (k tig, n groupID), b1 (k tig + 4, n groupID)
//   C: c0, c1 (row groupID, cols 2 tig, 2 tig + 1), c2, c3 (row groupID + 8, the same cols)
// Rows are coordinates, so a thread works on the two coordinates groupID and groupID + 8 of each m-tile.
//
// The permutations that keep the gates in the thread's own registers (no shuffles, no gate buffer):
//   N (gate columns): n-tiles 2p and 2p + 1 (p < 5) hold units 4p .. 4p + 3; column 2t, 2t + 1 of tile 2p
//     are gates i, f of unit 4p + t, of tile 2p + 1 its g, o. Thread tig so holds all four gates of
//     units 4p + tig, p < 5, for its two coordinates, and runs their cell update in registers.
//   K (layer inputs): a thread's "slot" s is column tig + 4 (s % 2) of k-tile s / 2, i.e. a_{2 (s%2)} and
//     a_{2 (s%2) + 1} of that k-tile for its two rows. Slot s < 5 of layer 1 is the h of unit 4s + tig of
//     layer 0, which is exactly the h this thread has just computed; slots 5 .. 9 are layer 1's own old h
//     (loaded, units 4 (s - 5) + tig). Layer 0: slots 0 .. 4 its old h, slot 5 the features (feature tig
//     for tig < inputs, else 0): 3 k-tiles, K = 24 (22 inputs for the paper's features, the rest zero weights).
//     Layer 1: 5 k-tiles.
//   Output: y = out_b + out_w . h_top on FFMA: lane tig sums its units 4p + tig of each row (5 FFMA, from its
//     poison: 0 or NaN for a non-finite state, moment or weight it read), then the group's 4 lanes add their
//     sums by 2 butterfly shuffles, so every lane gets y of its rows and a NaN of any lane reaches all.
//     Error: 5 + 2 + 1 roundings of 2^-24, at most 8 * 2^-24 (sum_u |w_u h_u| + |out_b|) (the FFMA kernel's
//     sum: (H + 1) 2^-24 = 21 * 2^-24; the 3xTF32 product this replaces: 3.01 * 2^-22 + 73 * 2^-24). All four
//     lanes get the same bits (IEEE addition commutes: (s0 + s1) + (s2 + s3) in every lane).
// Each thread reads and writes only the state cells (units 4p + tig, its two coordinates) it owns.
//
// The weights are regrouped into B fragments once per block, while they are copied to shared memory:
// for layer l, k-tile kt, n-tile nt and lane, one 16-byte entry (b0_hi, b1_hi, b0_lo, b1_lo), so a lane
// fetches a B fragment pair of 3xTF32 with one LDS.128: 42 KB in all.
#pragma once
#include <type_traits>

#include "cuda/device_math.h"
#include "cuda/forward_body.h"
#include "cuda/kernel_args.h"
#include "cuda/mma_tf32.h"
#include "input_features.h"
#include "lstm_cell.h"

namespace l2l_fast {
namespace cuda {

// The net the mma kernel is compiled for, and its shared-memory plan (in floats).
struct MmaNet {
  static constexpr int kH = 20, kLayers = 2;
  static constexpr int kUnits = kH / 4;        // units per thread: 4p + tig, p < kUnits
  static constexpr int kNTiles = 4 * kH / 8;    // 10
  static constexpr int kMaxInputs = 4;          // first-layer inputs: slot 5's four columns tig
  static constexpr int kKTiles0 = 3, kKTiles1 = 5;  // layer 0: slots 0 .. 5; layer 1: slots 0 .. 9
  static constexpr int kEntry = 4;              // floats per (k-tile, n-tile, lane): b0_hi, b1_hi, b0_lo, b1_lo
  static constexpr int64_t kLayer1Offset = int64_t(kKTiles0) * kNTiles * 32 * kEntry;
  static constexpr int64_t kOutOffset = kLayer1Offset + int64_t(kKTiles1) * kNTiles * 32 * kEntry;
  // [l][u][8]: unit u's C fragments (i, f, i, f) and (g, o, g, o), so each initial accumulator is one
  // LDS.128 that the first mma reads as its C (no register moves to build it)
  static constexpr int64_t kBiasOffset = kOutOffset + kH;  // after out_w [20], as packed
  static constexpr int kBiasEntry = 8;
  static constexpr int64_t kSize = kBiasOffset + int64_t(kLayers) * kH * kBiasEntry;
  static constexpr int64_t kSmemBytes = kSize * int64_t(sizeof(float));
  L2L_HD static constexpr int k_tiles(int l) { return l == 0 ? kKTiles0 : kKTiles1; }
  L2L_HD static constexpr int64_t layer_offset(int l) { return l == 0 ? 0 : kLayer1Offset; }
};

// Whether the mma kernel computes this net (else the FFMA kernel does).
L2L_HD bool mma_supports(const PackedLayout& layout) {
  return layout.hidden == MmaNet::kH && layout.layers == MmaNet::kLayers && layout.inputs <= MmaNet::kMaxInputs;
}

// Coordinates per m-tile. m-tiles per warp (Tiles): two make each B fragment load feed 6 mma and take 12%
// fewer instructions per coordinate than one, but 168 registers (12 warps / SM) instead of 96 (20 warps):
// both are built until a GPU says which is faster (NOTES.md).
constexpr int kMmaRows = 16;

// The weight in column c of k-tile kt (B's row) and column n of n-tile nt of layer l's B = W^T, from the
// packed weights w (lstm_layout.h); 0 for the padding.
L2L_HD float mma_layer_weight(const float* w, const PackedLayout& lay, int l, int kt, int c, int nt, int n) {
  const int tig = c % 4, s = 2 * kt + c / 4;
  const int u = 4 * (nt / 2) + n / 2, gate = n % 2 + 2 * (nt % 2);
  const int I = lay.input_size(l), K = lay.k_size(l);
  int k;  // the layer input (lstm_layout.h's order: the layer's inputs, then its own h)
  if (l == 0) {
    if (s < MmaNet::kUnits) k = I + 4 * s + tig;
    else if (tig < I) k = tig;  // slot 5: the features
    else return 0.0f;
  } else {
    k = s < MmaNet::kUnits ? 4 * s + tig : I + 4 * (s - MmaNet::kUnits) + tig;
  }
  return w[lay.layer_offset(l) + (int64_t(u) * K + k) * 4 + gate];
}

L2L_HD void store_entry(float* e, float w0, float w1) {
  const Tf32Split s0 = split_tf32(w0), s1 = split_tf32(w1);
  e[0] = s0.hi;
  e[1] = s1.hi;
  e[2] = s0.lo;
  e[3] = s1.lo;
}

// Regroups the packed weights (global memory) into the B fragments in shared memory; every thread of the
// block calls it (it ends with a barrier).
template <class Ctx>
L2L_DEVICE void stage_mma_weights(const Ctx& ctx, const float* w, const PackedLayout& lay, float* smem) {
  for (int l = 0; l < MmaNet::kLayers; ++l) {
    const int entries = MmaNet::k_tiles(l) * MmaNet::kNTiles * 32;
    for (int e = ctx.thread(); e < entries; e += ctx.threads()) {
      const int lane = e % 32, nt = (e / 32) % MmaNet::kNTiles, kt = e / (32 * MmaNet::kNTiles);
      const int g = lane / 4, tig = lane % 4;
      store_entry(smem + MmaNet::layer_offset(l) + int64_t(e) * MmaNet::kEntry,
                  mma_layer_weight(w, lay, l, kt, tig, nt, g), mma_layer_weight(w, lay, l, kt, tig + 4, nt, g));
    }
  }
  for (int u = ctx.thread(); u < MmaNet::kH; u += ctx.threads())
    smem[MmaNet::kOutOffset + u] = w[lay.out_weight_offset() + u];
  for (int l = 0; l < MmaNet::kLayers; ++l)
    for (int q = ctx.thread(); q < MmaNet::kH * MmaNet::kBiasEntry; q += ctx.threads()) {
      const int u = q / MmaNet::kBiasEntry, j = q % MmaNet::kBiasEntry;  // gate 2 (j / 4) + j % 2 of unit u
      smem[MmaNet::kBiasOffset + l * MmaNet::kH * MmaNet::kBiasEntry + q] =
          w[lay.bias_offset(l) + u * 4 + 2 * (j / 4) + j % 2];
    }
  ctx.sync();
}

// B fragments (hi, lo) of one 16-byte entry.
struct FragB2 {
  FragB hi, lo;
};

L2L_DEVICE FragB2 load_frag_b(const float* e) {
  const Quad<float> q = load_quad(e);
  return FragB2{{{q.v[0], q.v[1]}}, {{q.v[2], q.v[3]}}};
}

// A fragment of k-tile kt from a thread's slot values x[row][slot] (row 0: groupID, 1: groupID + 8), split
// with lo unrounded (mma_tf32.h): a NaN input stays NaN in every gate it enters, also one the coordinate's
// poison does not know of (layer 0's h after an Inf - Inf in its gate sum).
template <int Slots>
L2L_DEVICE void split_a(const float (&x)[2][Slots], int kt, FragA& hi, FragA& lo) {
  const float v[4] = {x[0][2 * kt], x[1][2 * kt], x[0][2 * kt + 1], x[1][2 * kt + 1]};
  split_frag(v, hi, lo);
}

// Whether k-tile kt of a layer with KT k-tiles holds only TF32 values: the old h a bf16 state stores (8
// significant bits; TF32 keeps 11) in slots 0 .. 3 of layer 0 (k-tiles 0, 1) and 6 .. 9 of layer 1 (k-tiles 3,
// 4), or 0 for rows not stepped. Such an A needs no split: its lo part is 0 (mma_2xtf32).
template <typename S, int KT>
L2L_HD constexpr bool tf32_exact_k_tile(int kt) {
  static_assert(KT == MmaNet::kKTiles0 || KT == MmaNet::kKTiles1, "layer 0 or 1");
  return std::is_same<S, bf16>::value && (KT == MmaNet::kKTiles0 ? kt < 2 : kt >= 3);
}

// What a thread knows of one of its coordinates.
struct MmaRow {
  int64_t c;      // state column
  bool valid;     // c < end
  bool active;    // valid and a finite gradient: the coordinate is stepped
  float poison;   // 0, or NaN when a weight or a value the thread read of it is not finite
};

// A thread's coordinates lie at fixed distances from its first one, c0 = base + groupID: row r of m-tile m
// at c0 + 16 m + 8 r. So one 64-bit address per state row (that of c0) serves all of them, with the
// distances as the loads' and stores' immediate offsets.
L2L_HD constexpr int coord_offset(int m, int r) { return m * 16 + 8 * r; }

// Old c of the thread's coordinates from their state row (c0's cell at src; 0 for those not stepped).
template <int Tiles, typename S>
L2L_DEVICE void load_c_old(const S* src, const MmaRow (&rows)[Tiles][2], float (&c)[Tiles][2]) {
#pragma unroll
  for (int m = 0; m < Tiles; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) c[m][r] = rows[m][r].active ? load_value<float>(src + coord_offset(m, r)) : 0.0f;
}

// One LSTM layer for the warp's Tiles x 16 coordinates: gates on tensor cores from the slot values x
// (row, slot), then the cell update of the thread's units; h_out[m][row][p] = new h of unit 4p + tig.
template <int Tiles, int KT, typename S, class Ctx>
L2L_DEVICE void mma_layer(const Ctx& ctx, const ForwardArgs<float, S>& a, const float* sw, int l, int64_t c0,
                          const float (&x)[Tiles][2][2 * KT], MmaRow (&rows)[Tiles][2],
                          float (&h_out)[Tiles][2][MmaNet::kUnits]) {
  const int lane = ctx.lane(), tig = lane % 4;
  const PackedLayout& lay = a.net.layout;
  const int64_t cols = a.columns;
  // c0's cells of unit tig, moved on by 4 units per iteration (64-bit pointer steps: any column count)
  const int64_t unit_step = 4 * cols;
  const S* c_src = a.state + state_row(lay, l, 1, tig) * cols + c0;
  S* h_dst = a.new_state + state_row(lay, l, 0, tig) * cols + c0;
  S* c_dst = a.new_state + state_row(lay, l, 1, tig) * cols + c0;
  FragA a_hi[Tiles][KT], a_lo[Tiles][KT];
#pragma unroll
  for (int m = 0; m < Tiles; ++m)
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      if (tf32_exact_k_tile<S, KT>(kt)) {
        a_hi[m][kt] = FragA{{x[m][0][2 * kt], x[m][1][2 * kt], x[m][0][2 * kt + 1], x[m][1][2 * kt + 1]}};
        a_lo[m][kt] = FragA{};  // unused: mma_2xtf32
      } else {
        split_a(x[m], kt, a_hi[m][kt], a_lo[m][kt]);
      }
    }
  // this lane's B entry of k-tile 0, n-tile 2p, and unit u's bias fragments: both step with p, so every other
  // offset is an immediate (and the lane's shared-memory address is not recomputed per unit)
  const float* w_p = sw + MmaNet::layer_offset(l) + lane * MmaNet::kEntry;
  const float* bias = sw + MmaNet::kBiasOffset + (l * MmaNet::kH + tig) * MmaNet::kBiasEntry;
  // With 2 m-tiles (12 warps per SM), c of the next unit is loaded one iteration ahead: its latency hides
  // behind this unit's products (the compiler cannot hoist it over the stores, which may alias the state;
  // they are other cells). With one m-tile (20 warps per SM) the 4 registers this takes would spill.
  constexpr bool kAhead = Tiles > 1;
  float c_next[Tiles][2];
  if (kAhead) load_c_old(c_src, rows, c_next);
  // not unrolled, like the FFMA kernel's unit loop: its body is the hot code (unrolled only to count the
  // instructions of a warp tile, scripts/check_cuda_build.sh)
#if defined(L2L_MMA_COUNT_UNROLLED)
#pragma unroll
#else
#pragma unroll 1
#endif
  for (int p = 0; p < MmaNet::kUnits; ++p) {
    float c_olds[Tiles][2];
    if (kAhead) {
#pragma unroll
      for (int m = 0; m < Tiles; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r) c_olds[m][r] = c_next[m][r];
      if (p + 1 < MmaNet::kUnits) load_c_old(c_src + unit_step, rows, c_next);
    } else {
      load_c_old(c_src, rows, c_olds);
    }
    const Quad<float> bias_if = load_quad(bias), bias_go = load_quad(bias + 4);
    FragA z_if[Tiles], z_go[Tiles];  // tiles 2p (i, f) and 2p + 1 (g, o)
#pragma unroll
    for (int m = 0; m < Tiles; ++m) {
      z_if[m] = FragA{{bias_if.v[0], bias_if.v[1], bias_if.v[2], bias_if.v[3]}};
      z_go[m] = FragA{{bias_go.v[0], bias_go.v[1], bias_go.v[2], bias_go.v[3]}};
    }
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const FragB2 b_if = load_frag_b(w_p + kt * MmaNet::kNTiles * 32 * MmaNet::kEntry);
      const FragB2 b_go = load_frag_b(w_p + (kt * MmaNet::kNTiles + 1) * 32 * MmaNet::kEntry);
#pragma unroll
      for (int m = 0; m < Tiles; ++m) {
        if (tf32_exact_k_tile<S, KT>(kt)) {
          mma_2xtf32(ctx, z_if[m], a_hi[m][kt], b_if.hi, b_if.lo);
          mma_2xtf32(ctx, z_go[m], a_hi[m][kt], b_go.hi, b_go.lo);
        } else {
          mma_3xtf32(ctx, z_if[m], a_hi[m][kt], a_lo[m][kt], b_if.hi, b_if.lo);
          mma_3xtf32(ctx, z_go[m], a_hi[m][kt], a_lo[m][kt], b_go.hi, b_go.lo);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < Tiles; ++m)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        MmaRow& row = rows[m][r];
        const float c_old = c_olds[m][r];
        if (row.active) row.poison += c_old * 0.0f;  // see load_old_h
        float i, f, g, o, c_new, tanh_c, h;
        cell_forward<Activations<float>>(z_if[m].v[2 * r], z_if[m].v[2 * r + 1], z_go[m].v[2 * r],
                                         z_go[m].v[2 * r + 1], c_old, i, f, g, o, c_new, tanh_c, h);
        // h_out[m][r][p] with p a loop variable would put h_out in local memory: the slots shift down one
        // per unit (4 moves; a select per slot took 5 and a compare), so after the loop slot p holds unit p's h
#pragma unroll
        for (int q = 0; q + 1 < MmaNet::kUnits; ++q) h_out[m][r][q] = h_out[m][r][q + 1];
        h_out[m][r][MmaNet::kUnits - 1] = h;
        if (row.active) {
          store_value(h_dst + coord_offset(m, r), h);
          store_value(c_dst + coord_offset(m, r), c_new);
        }
      }
    c_src += unit_step;
    h_dst += unit_step;
    c_dst += unit_step;
    w_p += 2 * 32 * MmaNet::kEntry;
    bias += 4 * MmaNet::kBiasEntry;
  }
}

// Old h of the thread's units of layer l (c0's cells at src, unit tig) into slots [first, first + 5) of x
// (0 for rows not stepped).
template <int Tiles, int Slots, typename S>
L2L_DEVICE void load_old_h(const S* src, int64_t unit_step, int first, MmaRow (&rows)[Tiles][2],
                           float (&x)[Tiles][2][Slots]) {
#pragma unroll
  for (int p = 0; p < MmaNet::kUnits; ++p, src += unit_step)
#pragma unroll
    for (int m = 0; m < Tiles; ++m)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float v = 0.0f;
        if (rows[m][r].active) {
          v = load_value<float>(src + coord_offset(m, r));
          // 0 (+-0 for finite v) or NaN: one FFMA where v - v and the add take two
          rows[m][r].poison += v * 0.0f;
        }
        x[m][r][first + p] = v;
      }
}

// The moments of coordinate c the features read: this step's (lstm_step), or advanced with g (the in-place
// steps, which store them back: only the coordinate's owner lane reads them, see forward_mma_tile).
template <typename S>
L2L_DEVICE CoordinateInputs<float> step_moments(const ForwardArgs<float, S>& a, int64_t c, float g) {
  CoordinateInputs<float> in{g, 0.0f, 0.0f, 0.0f, 0.0f};
  load_moments(a.moments, a.columns, c, in);
  if (a.new_moments) advance_moments<ScalarMath<float>>(in, a.net.features);
  return in;
}

// The first layer's inputs x[0 .. 4) of coordinate c (finite gradient g; 0 past the features' width) and
// the moments they read (advanced by the in-place steps, for the caller to store back).
template <uint32_t Features, typename S>
L2L_DEVICE CoordinateInputs<float> coordinate_features(const ForwardArgs<float, S>& a, int64_t c, float g,
                                                       float (&x)[MmaNet::kMaxInputs]) {
  static_assert(input_width(Features) <= MmaNet::kMaxInputs, "features wider than slot 5's four columns");
  CoordinateInputs<float> in{g, 0.0f, 0.0f, 0.0f, 0.0f};
  if (reads_moments(Features)) in = step_moments(a, c, g);
  compute_features<ScalarMath<float>>(Features, in, a.net.features, x);
  return in;
}

// x[k] for a run-time k < 4 without a dynamically indexed (local-memory) array.
L2L_DEVICE float pick(const float (&x)[MmaNet::kMaxInputs], int k) {
  return k == 0 ? x[0] : k == 1 ? x[1] : k == 2 ? x[2] : x[3];
}

// The state cells a thread owns of coordinate c: fn(row index) for h and c of its units of every layer, rows
// 4 k + tig (state_row(l, which, 4 p + tig) with k = (2 l + which) 5 + p). Only the cold paths (a coordinate
// not stepped, a poisoned one) take them: a rolled loop keeps their code small.
template <typename Fn>
L2L_DEVICE void for_own_cells(int tig, Fn&& fn) {
  static_assert(MmaNet::kUnits * 4 == MmaNet::kH, "rows 4 k + tig cover a layer's units");
#pragma unroll 1
  for (int k = 0; k < MmaNet::kLayers * 2 * MmaNet::kUnits; ++k) fn(int64_t(4 * k + tig));
}

// The step of the warp's coordinates [base, base + Tiles * 16) (those below a.end).
//
// What is per coordinate rather than per cell (the gradient, the features and moments, the update, the
// parameter) is done once per coordinate: the four lanes of a group share the 2 Tiles coordinates (rows)
// they hold, and lane tig owns row tig % (2 Tiles) (m = row / 2, r = row % 2). The owner computes the row's
// features; each lane then needs feature tig of every row (slot 5), which a rotation of shuffles delivers:
// in round k lane tig sends its feature (tig + k) % 4 and receives from lane (tig - k) % 4 that lane's row's
// feature tig. With one m-tile lanes tig and tig + 2 own the same row; only tig < 2 stores its values.
template <int Tiles, uint32_t Features, typename S, class Ctx>
L2L_DEVICE void forward_mma_tile(const Ctx& ctx, const ForwardArgs<float, S>& a, const float* sw, int64_t base) {
  constexpr int kRows = 2 * Tiles;
  const int lane = ctx.lane(), tig = lane % 4, group = lane / 4;
  const PackedLayout& lay = a.net.layout;
  const int64_t cols = a.columns;
  const float weight_poison = a.net.weights[lay.poison_offset()];
  const int64_t c0 = base + group;  // rows[m][r].c = c0 + coord_offset(m, r)
  const int own = tig % kRows;
  const bool stores = tig < kRows;  // the lane that stores the owned row's values
  const int64_t c_own = c0 + coord_offset(own / 2, own % 2);
  float g_own = 0.0f;
  if (c_own < a.end) {
    const TensorSlot& slot = a.slots[find_slot(a, c_own)];
    g_own = load_elem<float>(slot.grad, slot.grad_type, c_own - slot.begin);
  }
  const bool active_own = c_own < a.end && is_finite(g_own);
  float f[MmaNet::kMaxInputs] = {0.0f, 0.0f, 0.0f, 0.0f};
  float moments_poison_own = 0.0f;
  CoordinateInputs<float> in{};
  if (active_own) {
    in = coordinate_features<Features>(a, c_own, g_own, f);
    if (reads_moments(Features)) moments_poison_own = moments_poison(in);
  }
  const uint32_t active_bits = ctx.ballot(active_own);
  if (reads_moments(Features) && a.new_moments) {
    ctx.sync_warp();  // with one m-tile lanes tig and tig + 2 read the same moments: both have read them
    if (active_own && stores) store_moments(a.new_moments, cols, c_own, in);
  }

  MmaRow rows[Tiles][2];
  float x0[Tiles][2][2 * MmaNet::kKTiles0];
#pragma unroll
  for (int m = 0; m < Tiles; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      MmaRow& row = rows[m][r];
      row.c = c0 + coord_offset(m, r);
      row.valid = row.c < a.end;
      row.active = (active_bits >> (4 * group + 2 * m + r)) & 1u;
      // the moments' poison in the owner's row only: the output's sum over the lanes carries it to the others
      row.poison = weight_poison + (2 * m + r == own ? moments_poison_own : 0.0f);
      x0[m][r][MmaNet::kUnits] = 0.0f;
    }
  // slot 5: feature tig of every row (0 for rows not stepped: the owner's f is 0 then)
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    const float sent = pick(f, (tig + k) % 4);
    const float got = k == 0 ? sent : ctx.shfl(sent, 4 * group + (tig - k + 4) % 4);
    const int from = (tig - k + 4) % 4 % kRows;
#pragma unroll
    for (int m = 0; m < Tiles; ++m)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (2 * m + r == from) x0[m][r][MmaNet::kUnits] = got;
  }
  load_old_h(a.state + state_row(lay, 0, 0, tig) * cols + c0, 4 * cols, 0, rows, x0);
  float h0[Tiles][2][MmaNet::kUnits] = {};
  mma_layer<Tiles, MmaNet::kKTiles0>(ctx, a, sw, 0, c0, x0, rows, h0);

  float x1[Tiles][2][2 * MmaNet::kKTiles1];
#pragma unroll
  for (int m = 0; m < Tiles; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int p = 0; p < MmaNet::kUnits; ++p) x1[m][r][p] = h0[m][r][p];
  load_old_h(a.state + state_row(lay, 1, 0, tig) * cols + c0, 4 * cols, MmaNet::kUnits, rows, x1);
  float h1[Tiles][2][MmaNet::kUnits] = {};
  mma_layer<Tiles, MmaNet::kKTiles1>(ctx, a, sw, 1, c0, x1, rows, h1);

  // y = out_b + out_w . h1 (see the top): this lane's units from its poison, then the group's 4 lanes
  float w_out[MmaNet::kUnits];
#pragma unroll
  for (int p = 0; p < MmaNet::kUnits; ++p) w_out[p] = sw[MmaNet::kOutOffset + 4 * p + tig];
  const float out_b = a.net.weights[lay.out_bias_offset()];
  float y[Tiles][2];
#pragma unroll
  for (int m = 0; m < Tiles; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = rows[m][r].poison;
#pragma unroll
      for (int p = 0; p < MmaNet::kUnits; ++p) sum = fmaf(w_out[p], h1[m][r][p], sum);
      sum += ctx.shfl(sum, lane ^ 1);
      sum += ctx.shfl(sum, lane ^ 2);
      y[m][r] = out_b + sum;
    }

  // every lane: its own cells of each row; the owner's row's poisoned update, kept with its y
  float out_own = 0.0f, poison_own = 0.0f;
#pragma unroll
  for (int m = 0; m < Tiles; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const MmaRow& row = rows[m][r];
      const float out = y[m][r];
      const float poison = row.poison + (out - out);
      if (2 * m + r == own) {
        out_own = out;
        poison_own = poison;
      }
      if (!row.valid) continue;
      if (!row.active) {  // the documented policy (rule 1): no update, state and moments kept bit for bit
        if (a.new_state != a.state)
          for_own_cells(tig, [&](int64_t q) { a.new_state[q * cols + row.c] = a.state[q * cols + row.c]; });
        continue;
      }
      if (poison != poison)  // poisoned: NaN update and new state
        for_own_cells(tig, [&](int64_t q) { store_value(a.new_state + q * cols + row.c, poison); });
    }
  // the owned coordinate's update and parameter (its moments were stored with its features)
  if (stores && c_own < a.end) {
    float update = 0.0f;
    if (active_own) update = poison_own != poison_own ? poison_own : update_of(a.net, out_own);
    if (a.update) a.update[c_own] = update;
    if (active_own) {
      const TensorSlot& slot = a.slots[find_slot(a, c_own)];
      const int64_t j = c_own - slot.begin;
      if (slot.param)
        store_elem(slot.param, slot.param_type, j, load_elem<float>(slot.param, slot.param_type, j) + update);
    }
  }
}

// One block's share of the launch: the weights regrouped into shared memory, then its warps walk tiles of
// Tiles x 16 consecutive columns, grid-stride. Control flow is uniform over each warp (mma.sync).
template <int Tiles, uint32_t Features, typename S, class Ctx>
L2L_DEVICE void forward_mma_block(const Ctx& ctx, const ForwardArgs<float, S>& a, unsigned char* smem) {
  float* sw = reinterpret_cast<float*>(smem);
  stage_mma_weights(ctx, a.net.weights, a.net.layout, sw);
  const int64_t tile = int64_t(Tiles) * kMmaRows;
  const int warps = ctx.threads() / 32;
  const int64_t step = int64_t(ctx.blocks()) * warps * tile;
  for (int64_t base = a.begin + (int64_t(ctx.block()) * warps + ctx.thread() / 32) * tile; base < a.end; base += step)
    forward_mma_tile<Tiles, Features>(ctx, a, sw, base);
}

// Calls fn(std::integral_constant<uint32_t, mask>) for the feature masks the mma kernel is compiled for
// (every mask of at most kMaxInputs inputs); false for any other.
template <typename Fn>
bool dispatch_mma_features(uint32_t mask, Fn&& fn) {
  static_assert(kAllFeatures == 7, "a new feature: add its masks here");
  switch (mask) {  // 7 (every feature) has six inputs
    case 1: fn(std::integral_constant<uint32_t, 1>{}); return true;
    case 2: fn(std::integral_constant<uint32_t, 2>{}); return true;
    case 3: fn(std::integral_constant<uint32_t, 3>{}); return true;
    case 4: fn(std::integral_constant<uint32_t, 4>{}); return true;
    case 5: fn(std::integral_constant<uint32_t, 5>{}); return true;
    case 6: fn(std::integral_constant<uint32_t, 6>{}); return true;
    default: return false;
  }
}

}  // namespace cuda
}  // namespace l2l_fast
