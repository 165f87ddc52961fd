// The whole backward on tensor cores for hidden 20 x 2 layers in float32 (L2L_FAST_CUDA_BACKWARD=mma,
// gate_variant.h): backward_body.h's per-coordinate products (the gate recompute z = W x + b of each layer and
// d inputs = W^T dz) become warp GEMMs on mma.m16n8k8 TF32 in 3xTF32, next to backward_mma.h's weight-gradient
// GEMM. Torch-free; the CPU emulation runs this code.
//
// Why not forward_mma_body.h's register layout: the backward's cell update and cell backward stay one thread per
// coordinate (backward_body.h's structure, its NaN / inactive handling and its staging for the weight gradients),
// and the staging rows it already has, [coordinate][value] in shared memory, are exactly the A operands:
//   gates:  Z[32 coords, 80] = X[32, K] W^T[K, 80] + b   A = the staged x rows, C stored over the dz rows
//   inputs: DX[32, K]        = DZ[32, 80] W[80, K]        A = the dz rows,      C stored over the x rows
// Each warp multiplies the 32 rows of its own threads (2 m-tiles), so the exchange between a thread's values and
// the fragments is warp-local (__syncwarp); only the weight gradients (a sum over the block's coordinates) keep
// the block barriers. Rows of inactive coordinates are staged as zeros, a poisoned row's NaN stays in its row (a
// D row depends on its own A row), and a non-finite weight poisons every coordinate anyway (its poison check).
// B (the weights) is read from the packed weights in shared memory (backward_body.h's stage_weights) and split on
// the fly: regrouped fragments of both products would take ~85 KB per block, past 2 blocks per SM.
// Fragment layouts: forward_mma_body.h / warp_mma.h (PTX ISA). For lane = 4 g + tig:
//   gates, k-tile kt, n-tile nt: a_i = x[row g + 8 (i % 2)][8 kt + tig + 4 (i / 2)],
//     b_i = W[gate 8 nt + g][input 8 kt + tig + 4 i] (0 for input >= K),
//     c_i -> z[row g + 8 (i / 2)][8 nt + 2 tig + i % 2]
//   inputs: a_i = dz[row ...][gate 8 kt + tig + 4 (i / 2)], b_i = W[gate 8 kt + tig + 4 i][input 8 nt + g],
//     c_i -> dx[row][input 8 nt + 2 tig + i % 2] (columns K .. 8 NT - 1 come out 0: their B columns are 0)
// (W[j][k] is packed at layer_offset + ((j / 4) K + k) 4 + j % 4; gate j = 4 unit + gate, lstm_layout.h.)
//
// Error analysis (what 3xTF32 adds; both operands split with lo unrounded, backward_mma.h's split):
//   each product drops at most 5.01 * 2^-22 |w x| (backward_mma.h), and every product and the bias go into one
//   float32 accumulator (as forward_mma_body.h's gates): 3K + 1 roundings of at most u = 2^-24 of the running sum
//   (2^-23 if the tensor cores truncate). So
//     z:  |z_mma - z| <= (1.2e-6 + (3K + 1) u) sum_k |w_k x_k| + |b|-terms; layer 1 (K = 40): 8.4e-6 of it,
//         against the FFMA loop's (K + 1) u = 2.4e-6 (the forward mma's bound, mma_tf32.h, plus B's lo unrounded);
//     dx: |dx_mma - dx| <= (1.2e-6 + 3 * 80 u) sum_j |w_jk dz_j| = 1.55e-5 sum |w dz| (FFMA: 80 u = 4.8e-6).
//   The roundings are random-signed: typically sqrt(3K) u, i.e. ~1.5e-7 of sum |w x|, the FFMA loop's ~sqrt(K) u
//   times 1.7. Why the float32 ELEMENTWISE tolerance (5e-5 of the tensor's largest entry, tests/tolerances.py)
//   still holds: the cell maps z through slopes <= 1 (sigmoid 1/4, tanh 1), d state and d grad are sums of
//   dx entries through the same slopes, and for this net sum |w x| / max |z| and sum |w dz| / max |dx| stay
//   O(1..10) (random weights of scale 1/sqrt(K): the worst case above times 10 is still 1.6e-4 of sum |w dz|, and
//   typical errors are 100x smaller). The WEIGHT_GRAD rule (2x PyTorch float32's error + a floor) sees dz and x
//   through the same few-1e-7 relative perturbation, far below the float32 sums' own rounding over the tile
//   (backward_mma.h). Measured in the emulation (tests/test_cuda_mma_backward_emulated.py, the tolerances
//   unchanged): see csrc/cuda/NOTES.md, "The mma backward".
#pragma once
#include <type_traits>

#include "cuda/backward_body.h"
#include "cuda/backward_mma.h"
#include "cuda/mma_tf32.h"

namespace l2l_fast {
namespace cuda {

// The net the tensor-core gate products of the backward are written for: hidden 20, 2 layers, any features
// (the first layer's K = inputs + 20 <= 26: at most 4 k-tiles; layer 1: K = 40, 5 k-tiles).
struct MmaBackwardNet {
  static constexpr int kH = 20, kLayers = 2;
  static constexpr int kGateTiles = 4 * kH / 8;  // n-tiles of the gates, k-tiles of the inputs' product
  static constexpr int kMaxInputTiles = 5;       // n-tiles of d inputs: ceil(K / 8) <= 5
  static constexpr int kWarpRows = 32;           // coordinates per warp: 2 m-tiles
  // BackwardSmem::plan's row strides for this net, compile-time constants so that every A / C element of a
  // fragment is an immediate offset from one lane pointer: x rows staging_stride(max K + 1) (max K = 40:
  // layer 1's, since inputs <= 20), dz rows staging_stride(80).
  static constexpr int kSx = staging_stride(2 * kH + 1), kSdz = staging_stride(4 * kH);
};

L2L_HD bool mma_backward_supports(const PackedLayout& layout) {
  return layout.hidden == MmaBackwardNet::kH && layout.layers == MmaBackwardNet::kLayers &&
         layout.inputs <= MmaBackwardNet::kH;
}

// Weight of gate row j and layer input k (0 for k >= K, the padding of the last k- or n-tile).
L2L_DEVICE float gate_weight(const float* w_l, int K, int j, int k) {
  return k < K ? w_l[(int64_t(j >> 2) * K + k) * 4 + (j & 3)] : 0.0f;
}

L2L_DEVICE void split_b(float v0, float v1, FragB& hi, FragB& lo) {
  const Tf32Split s0 = split_tf32_lo_unrounded(v0), s1 = split_tf32_lo_unrounded(v1);
  hi = FragB{{s0.hi, s1.hi}};
  lo = FragB{{s0.lo, s1.lo}};
}

// The A fragment (split) of 16 staged rows of stride S; p: the lane's element (row g, column col0 + tig).
template <int S>
L2L_DEVICE void load_rows_a(const float* p, FragA& hi, FragA& lo) {
  const float v[4] = {p[0], p[8 * S], p[4], p[8 * S + 4]};
  split_frag(v, hi, lo);
}

L2L_DEVICE void store_pair(float* p, float a, float b) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
#else
  p[0] = a;
  p[1] = b;
#endif
}

// A C fragment into 16 rows of stride S (even); p: the lane's first element (row g, column col0 + 2 tig).
template <int S>
L2L_DEVICE void store_rows_c(float* p, const FragA& c) {
  store_pair(p, c.v[0], c.v[1]);
  store_pair(p + 8 * S, c.v[2], c.v[3]);
}

// z rows = x rows W_l^T + b_l for the warp's 32 coordinates: x from the warp's first staged row (stride SX;
// columns K .. 8 ceil(K / 8) - 1 finite: the bias column's 1 and zeros), z into 80 columns of its rows (stride SZ).
// Every lane of the warp calls it.
// KC: K when known at compile time (0: run-time K), which folds the B operand's offsets and its padding test.
template <int KC, int SX, int SZ, class Ctx>
L2L_DEVICE void warp_gates(const Ctx& ctx, const float* w_l, const float* b_l, int k_size, const float* x, float* z) {
  constexpr int M = 2, NT = MmaBackwardNet::kGateTiles;
  const int K = KC ? KC : k_size;
  const int lane = ctx.lane(), g = lane / 4, tig = lane % 4;
  FragA acc[M][NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float b0 = b_l[8 * nt + 2 * tig], b1 = b_l[8 * nt + 2 * tig + 1];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m][nt] = FragA{{b0, b1, b0, b1}};
  }
  const int KT = (K + 7) / 8;
  // by pointer steps of one k-tile: the lane's A element (row g, column 8 kt + tig) and its B element
  // W[gate g][input 8 kt + tig] (packed: gate j, input k at ((j / 4) K + k) 4 + j % 4; gate 8 nt + g is
  // 2 nt K 4 further, input k + 4 16 further)
  const float* xa = x + g * SX + tig;
  const float* wb = w_l + ((g >> 2) * K + tig) * 4 + (g & 3);
  int k = tig;  // the B element's input (the padding test)
  const auto k_step = [&] {
    FragA a_hi[M], a_lo[M];
#pragma unroll
    for (int m = 0; m < M; ++m) load_rows_a<SX>(xa + 16 * m * SX, a_hi[m], a_lo[m]);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float* b = wb + 8 * nt * K;
      FragB b_hi, b_lo;
      split_b(k < K ? b[0] : 0.0f, k + 4 < K ? b[16] : 0.0f, b_hi, b_lo);
#pragma unroll
      for (int m = 0; m < M; ++m) mma_3xtf32(ctx, acc[m][nt], a_hi[m], a_lo[m], b_hi, b_lo);
    }
    xa += 8;
    wb += 32;
    k += 8;
  };
  // k-tile 0 outside the loop: its first mma reads the bias as C (no copies into the loop's accumulators)
  k_step();
#pragma unroll 1
  for (int kt = 1; kt < KT; ++kt) k_step();
  float* zc = z + g * SZ + 2 * tig;
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) store_rows_c<SZ>(zc + 16 * m * SZ + 8 * nt, acc[m][nt]);
}

// dx rows [0, 8 ceil(K / 8)) = dz rows W_l for the warp's 32 coordinates (dz: 80 columns, stride SDZ; dx stride
// SDX). Every lane of the warp calls it.
template <int KC, int SDZ, int SDX, class Ctx>
L2L_DEVICE void warp_input_grads(const Ctx& ctx, const float* w_l, int k_size, const float* dz, float* dx) {
  constexpr int M = 2, KT = MmaBackwardNet::kGateTiles, kMaxNT = MmaBackwardNet::kMaxInputTiles;
  const int K = KC ? KC : k_size;
  const int lane = ctx.lane(), g = lane / 4, tig = lane % 4;
  const int NT = (K + 7) / 8;
  FragA acc[M][kMaxNT];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int nt = 0; nt < kMaxNT; ++nt) acc[m][nt] = FragA{{0.0f, 0.0f, 0.0f, 0.0f}};
  // by pointer steps of one k-tile (8 gates): the lane's A element (row g, gate 8 kt + tig) and its B element
  // W[gate 8 kt + tig][input g] (packed at ((j / 4) K + k) 4 + j % 4: input 8 nt + g is 32 nt further,
  // gate + 4 4 K further, the next k-tile 8 K)
  const float* dza = dz + g * SDZ + tig;
  const float* wb = w_l + g * 4 + tig;
#pragma unroll 1
  for (int kt = 0; kt < KT; ++kt, dza += 8, wb += 8 * K) {
    FragA a_hi[M], a_lo[M];
#pragma unroll
    for (int m = 0; m < M; ++m) load_rows_a<SDZ>(dza + 16 * m * SDZ, a_hi[m], a_lo[m]);
#pragma unroll
    for (int nt = 0; nt < kMaxNT; ++nt) {
      if (nt >= NT) break;  // the same for the whole warp
      const bool real = 8 * nt + g < K;
      const float* b = wb + 32 * nt;
      FragB b_hi, b_lo;
      split_b(real ? b[0] : 0.0f, real ? b[4 * K] : 0.0f, b_hi, b_lo);
#pragma unroll
      for (int m = 0; m < M; ++m) mma_3xtf32(ctx, acc[m][nt], a_hi[m], a_lo[m], b_hi, b_lo);
    }
  }
  float* dxc = dx + g * SDX + 2 * tig;
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int nt = 0; nt < kMaxNT; ++nt)
      if (nt < NT) store_rows_c<SDX>(dxc + 16 * m * SDX + 8 * nt, acc[m][nt]);
}

// Stages layer l's inputs of coordinate c in its row my_x: x, the bias column's 1, zeros up to the 4-wide
// loads of the weight gradients and the gate product's last k-tile (all zeros for an inactive coordinate).
template <class Dims>
L2L_DEVICE void stage_layer_inputs(const BackwardArgs<float>& a, Dims dims, int l, int64_t c,
                                   const CoordinateInputs<float>& in, bool active, float* my_x) {
  const int K = a.net.layout.k_size(l);
  const int end = (K + 4) / 4 * 4 > (K + 7) / 8 * 8 ? (K + 4) / 4 * 4 : (K + 7) / 8 * 8;
  int k = 0;
  if (active) {
    layer_inputs(a, dims, l, c, in, my_x);
    my_x[K] = 1.0f;
    k = K + 1;
  }
  for (; k < end; ++k) my_x[k] = 0.0f;
}

// Stages layer 1's inputs of coordinate c in its row my_x after layer 0's new h (columns 0 .. H - 1): its old h,
// the bias column's 1, zeros up to the 4-wide loads of the weight gradients and the gate product's last k-tile
// (all zeros for an inactive coordinate).
L2L_DEVICE void stage_top_inputs(const BackwardArgs<float>& a, int64_t c, bool active, float* my_x) {
  constexpr int H = MmaBackwardNet::kH, K = 2 * H;
  constexpr int end = (K + 4) / 4 * 4 > (K + 7) / 8 * 8 ? (K + 4) / 4 * 4 : (K + 7) / 8 * 8;  // as stage_layer_inputs
  int k = 0;
  if (active) {
    const float* h_p = a.state + state_row(a.net.layout, 1, 0, 0) * a.n + c;
#pragma unroll
    for (int u = 0; u < H; ++u, h_p += a.n) my_x[H + u] = *h_p;
    my_x[2 * H] = 1.0f;
    k = 2 * H + 1;
  }
  for (; k < end; ++k) my_x[k] = 0.0f;
}

// The float `bytes` bytes after p (a byte offset shared by arrays of the same shape).
L2L_DEVICE const float& at_offset(const float* p, int64_t bytes) {
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(p) + bytes);
}
L2L_DEVICE float& at_offset(float* p, int64_t bytes) {
  return *reinterpret_cast<float*>(reinterpret_cast<char*>(p) + bytes);
}

// h of a unit from its gate pre-activations z (4 values of a dz row) and its old c.
L2L_DEVICE float unit_h(float c_old, const float* z4) {
  const Quad<float> z = load_quad(z4);
  float i, f, gg, o, c_new, tanh_c, h;
  cell_forward<Activations<float>>(z.v[0], z.v[1], z.v[2], z.v[3], c_old, i, f, gg, o, c_new, tanh_c, h);
  return h;
}

// The cell backward of layer l for an active coordinate from its gate pre-activations z (its dz row, replaced by
// dz): d c of the layer into grad_state, the top layer's h into h_top (when not null).
L2L_DEVICE void cell_backward_row(const BackwardArgs<float>& a, int l, int64_t c, const float (&dh)[MmaBackwardNet::kH],
                                  float* my_dz, float* h_top) {
  // the unit's cells by steps of one byte offset (one add per array and unit, none to scale an index): unit
  // u + 1's cell is one state row (n values) after unit u's
  const int64_t row_bytes = a.n * int64_t(sizeof(float));
  int64_t off = (state_row(a.net.layout, l, 1, 0) * a.n + c) * int64_t(sizeof(float));
#pragma unroll 1
  for (int u = 0; u < MmaBackwardNet::kH; ++u, off += row_bytes) {
    const float c_old = at_offset(a.state, off), dc_new = at_offset(a.grad_new_state, off);
    const Quad<float> z = load_quad(my_dz);
    float i, f, gg, o, c_new, tanh_c, h;
    cell_forward<Activations<float>>(z.v[0], z.v[1], z.v[2], z.v[3], c_old, i, f, gg, o, c_new, tanh_c, h);
    if (h_top) h_top[u] = h;
    Quad<float> dzq;
    float dc;
    cell_backward(dh[u], dc_new, i, f, gg, o, c_old, tanh_c, dzq.v[0], dzq.v[1], dzq.v[2], dzq.v[3], dc);
    at_offset(a.grad_state, off) = dc;
    store_quad(my_dz, dzq);
    my_dz += 4;
  }
}

// Layer l's K when known at compile time: layer 1's always (2 H), layer 0's for the fixed dims; else 0.
template <class Dims, int l>
L2L_HD constexpr int compile_time_k() {
  if constexpr (l == 1) return 2 * MmaBackwardNet::kH;
  else if constexpr (Dims::kFixed) return Dims::kInputs + MmaBackwardNet::kH;
  else return 0;
}

// One tile's layer: the staged x rows of the warp -> gate pre-activations over its dz rows.
template <int l, class Dims, class Ctx>
L2L_DEVICE void tile_gates(const Ctx& ctx, const BackwardArgs<float>& a, Dims, const float* w, const BackwardSmem& plan,
                           float* warp_x, float* warp_dz) {
  const PackedLayout& lay = a.net.layout;
  ctx.sync_warp();  // the warp's x rows are staged
  warp_gates<compile_time_k<Dims, l>(), MmaBackwardNet::kSx, MmaBackwardNet::kSdz>(
      ctx, w + lay.layer_offset(l), w + lay.bias_offset(l), lay.k_size(l), warp_x, warp_dz);
  ctx.sync_warp();  // its z rows are in
}

// After the cell backward of layer l: its weight gradients (block-wide), then d inputs over the warp's x rows.
template <int l, class Dims, class Ctx>
L2L_DEVICE void tile_layer_grads(const Ctx& ctx, const BackwardArgs<float>& a, Dims dims, const float* w,
                                 const BackwardSmem& plan, float* smem, double* partial, float* warp_x,
                                 const float* warp_dz) {
  ctx.sync();
  layer_weight_grads<true>(ctx, a, dims, l, plan, smem, partial);
  ctx.sync();  // every warp has read the x rows: they take d inputs now
  warp_input_grads<compile_time_k<Dims, l>(), MmaBackwardNet::kSdz, MmaBackwardNet::kSx>(
      ctx, w + a.net.layout.layer_offset(l), a.net.layout.k_size(l), warp_dz, warp_x);
  ctx.sync_warp();
}

template <class Dims, class Ctx>
L2L_DEVICE void backward_block_mma(const Ctx& ctx, const BackwardArgs<float>& a, Dims dims, unsigned char* smem_bytes) {
  constexpr int H = MmaBackwardNet::kH;
  const PackedLayout& lay = a.net.layout;
  const int tile = ctx.threads(), tid = ctx.thread(), warp_row = tid / 32 * 32;
  const int64_t n = a.n;
  float* smem = reinterpret_cast<float*>(smem_bytes);
  const BackwardSmem plan = BackwardSmem::plan(lay, tile, Dims::kFixed || a.weights_in_smem != 0);
  const float* w = stage_weights<Dims>(ctx, a.net.weights, lay.size(), a.weights_in_smem != 0, smem + plan.weights);
  float* my_x = smem + plan.x + int64_t(tid) * plan.sx;
  float* my_dz = smem + plan.dz + int64_t(tid) * plan.sdz;
  float* my_h_top = smem + plan.h_top + int64_t(tid) * plan.sh;
  float* warp_x = smem + plan.x + int64_t(warp_row) * plan.sx;
  float* warp_dz = smem + plan.dz + int64_t(warp_row) * plan.sdz;
  double* partial = a.partials + int64_t(ctx.block()) * lay.size();
  const float* out_w = w + lay.out_weight_offset();
  const int I0 = lay.inputs;

  for (int64_t base = int64_t(ctx.block()) * tile; base < n; base += int64_t(ctx.blocks()) * tile) {
    const int64_t c = base + tid;
    CoordinateInputs<float> in{c < n ? a.grad[c] : 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const bool active = c < n && is_finite(in.grad);
    float poison = 0.0f;  // NaN: poisoned (as backward_block)
    if (active) poison = coordinate_poison(a, dims, c, in);
    // layer 0's forward: its h_new straight into layer 1's x row, columns 0 .. H - 1 (the warp has read the x
    // rows: tile_gates' last warp barrier), not parked in global memory as backward_body.h parks it
    stage_layer_inputs(a, dims, 0, c, in, active, my_x);
    tile_gates<0>(ctx, a, dims, w, plan, warp_x, warp_dz);
    if (active) {  // the old c by pointer steps (cell_backward_row)
      const float* c_old_p = a.state + state_row(lay, 0, 1, 0) * n + c;
#pragma unroll 1
      for (int u = 0; u < H; ++u, c_old_p += n) my_x[u] = unit_h(*c_old_p, my_dz + 4 * u);
    }

    // layer 1 (the top): gates, the output's derivative, the cell backward
    stage_top_inputs(a, c, active, my_x);
    tile_gates<1>(ctx, a, dims, w, plan, warp_x, warp_dz);
    float dh[H];
    float gu = 0.0f;
    if (active) {
      float y = 0.0f;
      if (a.net.output == kTanhOutput) {  // y = out_w . h_top + out_b, summed as recompute_output sums it
        y = w[lay.out_bias_offset()];
        const float* c_old_p = a.state + state_row(lay, 1, 1, 0) * n + c;
#pragma unroll 1
        for (int u = 0; u < H; ++u, c_old_p += n) y += out_w[u] * unit_h(*c_old_p, my_dz + 4 * u);
      }
      gu = output_grad(a.net, poison != poison ? poison : a.grad_update[c], y);
      for (int u = 0; u < H; ++u) dh[u] = gu * out_w[u] + a.grad_new_state[state_row(lay, 1, 0, u) * n + c];
      cell_backward_row(a, 1, c, dh, my_dz, my_h_top);
      my_h_top[H] = 1.0f;
      for (int k = H + 1; k < (H + 4) / 4 * 4; ++k) my_h_top[k] = 0.0f;
    } else {  // inactive coordinates add nothing to the weight gradients
      for (int k = 0; k < (H + 4) / 4 * 4; ++k) my_h_top[k] = 0.0f;
      for (int k = 0; k < 4 * H; ++k) my_dz[k] = 0.0f;
    }
    smem[plan.gu + tid] = gu;
    tile_layer_grads<1>(ctx, a, dims, w, plan, smem, partial, warp_x, warp_dz);
    if (active) {
      for (int u = 0; u < H; ++u) {
        a.grad_state[state_row(lay, 1, 0, u) * n + c] = my_x[H + u];
        dh[u] = my_x[u] + a.grad_new_state[state_row(lay, 0, 0, u) * n + c];
      }
    }

    // layer 0's backward (its gates recomputed, as backward_body.h does)
    stage_layer_inputs(a, dims, 0, c, in, active, my_x);
    tile_gates<0>(ctx, a, dims, w, plan, warp_x, warp_dz);
    if (active) {
      cell_backward_row(a, 0, c, dh, my_dz, nullptr);
    } else {
      for (int k = 0; k < 4 * H; ++k) my_dz[k] = 0.0f;
    }
    tile_layer_grads<0>(ctx, a, dims, w, plan, smem, partial, warp_x, warp_dz);
    if (active) {
      for (int u = 0; u < H; ++u) a.grad_state[state_row(lay, 0, 0, u) * n + c] = my_x[I0 + u];
      a.grad_grad[c] = features_backward<ScalarMath<float>>(dims.features(), in, a.net.features, my_x).grad;
    }

    apply_nonfinite_policy(a, dims, c, active, poison);
  }
}

}  // namespace cuda
}  // namespace l2l_fast
