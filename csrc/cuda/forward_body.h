// Forward and in-place step, one thread per coordinate: the body of the CUDA kernel, written
// against an execution context (thread/block indices, barrier) so that the CPU emulation runs it too.
//
// Each block first copies the packed weights into shared memory (21 KB for hidden 20, 2 layers,
// float32), then walks tiles of blockDim coordinates (grid-stride, so the copy is paid once per
// block, not per tile). State is [L][2][H][columns]: a warp's 32 threads read 32 consecutive values
// of a row, one coalesced access. Per unit, the four gate pre-activations accumulate over the layer
// inputs in registers with one 16-byte shared-memory (broadcast) load per input; the cell update
// follows at once, so no gate tensor is ever stored.
#pragma once

#include "cuda/device_math.h"
#include "cuda/kernel_args.h"
#include "input_features.h"
#include "lstm_cell.h"

namespace l2l_fast {
namespace cuda {

// Copies the packed weights into shared memory when the launch asks for it; returns where to read
// them. Every thread of the block must call it (it ends with a barrier).
template <class Dims, typename T, class Ctx>
L2L_DEVICE const T* stage_weights(const Ctx& ctx, const T* global, int64_t size, bool in_smem, T* smem) {
  if (!Dims::kFixed && !in_smem) return global;
  for (int64_t q = ctx.thread(); q < size; q += ctx.threads()) smem[q] = global[q];
  ctx.sync();
  return smem;
}

// Index of the slot holding state column `column` (the slots tile [begin, end) in order).
template <typename T, typename S>
L2L_DEVICE int find_slot(const ForwardArgs<T, S>& a, int64_t column) {
  int lo = 0, hi = a.slot_count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (a.slots[mid].begin <= column) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// z[g] = bias[g] + sum_k w[k][g] x[k] for the unit whose packed weights start at w.
template <class Dims, typename T>
L2L_DEVICE Quad<T> gate_preactivations(const T* w, const T* bias, const T* x, int K) {
  Quad<T> z = load_quad(bias);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const Quad<T> wk = load_quad(w + 4 * k);
#pragma unroll
    for (int g = 0; g < 4; ++g) z.v[g] += wk.v[g] * x[k];
  }
  return z;
}

// The moments of column c of a [4][stride] array (rows m, v, t, u) into in, and back.
template <typename T>
L2L_DEVICE void load_moments(const T* moments, int64_t stride, int64_t c, CoordinateInputs<T>& in) {
  in.m = moments[c];
  in.v = moments[stride + c];
  in.t = moments[2 * stride + c];
  in.u = moments[3 * stride + c];
}

template <typename T>
L2L_DEVICE void store_moments(T* moments, int64_t stride, int64_t c, const CoordinateInputs<T>& in) {
  moments[c] = in.m;
  moments[stride + c] = in.v;
  moments[2 * stride + c] = in.t;
  moments[3 * stride + c] = in.u;
}

// 0, or NaN when a moment the features read is not finite (the state's poison rule).
template <typename T>
L2L_DEVICE T moments_poison(const CoordinateInputs<T>& in) {
  return (in.m - in.m) + (in.v - in.v) + (in.t - in.t) + (in.u - in.u);
}

// What the features of coordinate c (finite gradient g) read: g and, when the features read moments,
// the moments, advanced with g and stored back by the in-place steps. The condition is a compile-time
// constant for the fixed dims, so the paper's kernel neither loads nor keeps moments.
template <class Dims, typename T, typename S>
L2L_DEVICE CoordinateInputs<T> forward_inputs(const ForwardArgs<T, S>& a, Dims dims, int64_t c, T g) {
  CoordinateInputs<T> in{g, T(0), T(0), T(0), T(0)};
  if (reads_moments(dims.features())) {
    load_moments(a.moments, a.columns, c, in);
    if (a.new_moments) {
      advance_moments<ScalarMath<T>>(in, a.net.features);
      store_moments(a.new_moments, a.columns, c, in);
    }
  }
  return in;
}

// The update of output value y = out_w . h_top + out_b (OutputKind, lstm_layout.h). The bounded kind
// uses the accurate tanh: once per coordinate, and relative accuracy for small y.
template <typename T>
L2L_DEVICE T update_of(const NetConstants<T>& net, T y) {
  return (net.output == kTanhOutput ? accurate_tanh(y) : y) * net.output_scale;
}

// The step of one coordinate (state column c).
template <class Dims, typename T, typename S>
L2L_DEVICE void forward_coordinate(const ForwardArgs<T, S>& a, Dims dims, const T* w, int64_t c) {
  const TensorSlot& slot = a.slots[find_slot(a, c)];
  const int64_t j = c - slot.begin;
  const T g = load_elem<T>(slot.grad, slot.grad_type, j);
  const PackedLayout& lay = a.net.layout;
  const int H = dims.hidden();
  const int L = dims.layers();
  const int64_t cols = a.columns;
  if (!is_finite(g)) {  // the documented policy (rule 1): no update, state and moments kept bit for bit
    if (a.update) a.update[c] = T(0);
    if (a.new_state != a.state)
      for (int64_t r = 0; r < int64_t(L) * 2 * H; ++r) a.new_state[r * cols + c] = a.state[r * cols + c];
    return;
  }
  T x[Dims::kMaxK];     // the layer's inputs: layer input (the features or H values), then its own old h
  T h_new[Dims::kMaxH];  // the layer's new h, the next layer's input
  const CoordinateInputs<T> in = forward_inputs(a, dims, c, g);
  // 0, or NaN when a weight (the packed poison flag), a state value or a moment of the coordinate is not
  // finite: v - v is NaN for NaN and +-Inf, and a NaN survives the sum
  T poison = a.net.weights[lay.poison_offset()];
  if (reads_moments(dims.features())) poison += moments_poison(in);
  compute_features<ScalarMath<T>>(dims.features(), in, a.net.features, x);
  const T* out_w = w + lay.out_weight_offset();
  T out = w[lay.out_bias_offset()];
#pragma unroll
  for (int l = 0; l < L; ++l) {
    const int I = l == 0 ? dims.inputs() : H, K = I + H;
    if (l > 0) {
#pragma unroll
      for (int k = 0; k < H; ++k) x[k] = h_new[k];
    }
    // all old h first: the in-place step overwrites them unit by unit below
#pragma unroll
    for (int k = 0; k < H; ++k) {
      x[I + k] = load_value<T>(a.state + state_row(lay, l, 0, k) * cols + c);
      poison += x[I + k] - x[I + k];
    }
    const T* w_l = w + lay.layer_offset(l);
    const T* b_l = w + lay.bias_offset(l);
    // not unrolled: the unit loop body is the kernel's hot code, unrolled 20x it would not fit the
    // instruction cache
#pragma unroll 1
    for (int u = 0; u < H; ++u) {
      const T c_old = load_value<T>(a.state + state_row(lay, l, 1, u) * cols + c);
      poison += c_old - c_old;
      const Quad<T> z = gate_preactivations<Dims>(w_l + int64_t(u) * K * 4, b_l + 4 * u, x, K);
      T i, f, gg, o, c_new, tanh_c, h;
      cell_forward<Activations<T>>(z.v[0], z.v[1], z.v[2], z.v[3], c_old, i, f, gg, o, c_new, tanh_c, h);
      h_new[u] = h;
      if (l == L - 1) out += out_w[u] * h;
      store_value(a.new_state + state_row(lay, l, 0, u) * cols + c, h);
      store_value(a.new_state + state_row(lay, l, 1, u) * cols + c, c_new);
    }
  }
  T update = update_of(a.net, out);
  if (poison != poison) {  // poisoned: NaN update and new state (every state value has been read by now)
    update = poison;
    for (int64_t r = 0; r < int64_t(L) * 2 * H; ++r) store_value(a.new_state + r * cols + c, poison);
  }
  if (a.update) a.update[c] = update;
  if (slot.param) store_elem(slot.param, slot.param_type, j, load_elem<T>(slot.param, slot.param_type, j) + update);
}

// One block's share of the launch: tiles of ctx.threads() consecutive columns, grid-stride.
template <class Dims, typename T, typename S, class Ctx>
L2L_DEVICE void forward_block(const Ctx& ctx, const ForwardArgs<T, S>& a, Dims dims, unsigned char* smem) {
  const T* w = stage_weights<Dims>(ctx, a.net.weights, a.net.layout.size(), a.weights_in_smem != 0,
                                   reinterpret_cast<T*>(smem));
  const int64_t step = int64_t(ctx.blocks()) * ctx.threads();
  for (int64_t c = a.begin + int64_t(ctx.block()) * ctx.threads() + ctx.thread(); c < a.end; c += step)
    forward_coordinate(a, dims, w, c);
}

}  // namespace cuda
}  // namespace l2l_fast
