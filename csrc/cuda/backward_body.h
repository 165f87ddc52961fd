// Backward of one step, one thread per coordinate, gates recomputed from the saved (grad, state):
// the body of the CUDA kernel, written against an execution context like forward_body.h.
//
// Per tile of blockDim coordinates:
//   1. forward through layers 0 .. L-2, each thread parking its h_new of those layers in its own
//      columns of grad_state's h rows (written for real later, when that layer's backward runs);
//   2. layer by layer from the top: recompute the gates, run the cell backward, accumulate d inputs
//      in registers, and stage the layer's inputs x (plus a 1 for the bias) and gate gradients dz
//      in shared memory, [coordinate][value];
//   3. after a barrier the block turns into a small GEMM, dW = dz^T x over the tile: each thread owns
//      a unit and 4 inputs (16 weights), sums them over the tile in registers and adds the sums to its
//      block's float64 row of partial sums (global memory, each entry owned by one thread: no atomics);
//      or (Mma, float32) each warp takes tiles of dW on tensor cores (backward_mma.h), each entry one lane's.
// A second kernel adds the rows in block order, so the weight gradients are deterministic.
#pragma once
#include <type_traits>

#include "cuda/backward_mma.h"
#include "cuda/device_math.h"
#include "cuda/forward_body.h"
#include "cuda/kernel_args.h"
#include "input_features.h"
#include "lstm_cell.h"

namespace l2l_fast {
namespace cuda {

// partial[target] += sum over the tile of dz[t][u G + g] * x[t][k] (x[t][K] == 1: the bias).
// Work items are (unit, 4 consecutive inputs); rows are read 16 bytes at a time, and all threads
// of a warp read the same tile row t, so the loads are broadcasts or distinct bank groups.
template <int G, typename T, class Ctx>
L2L_DEVICE void reduce_weight_grads(const Ctx& ctx, const T* x, int sx, const T* dz, int sdz, const GradTarget& to,
                                    double* partial) {
  const int chunks = (to.K + 1 + 3) / 4;
  const int items = to.units * chunks;
  const int tile = ctx.threads();
  for (int item = ctx.thread(); item < items; item += tile) {
    const int u = item / chunks, k0 = 4 * (item % chunks);
    T acc[G][4];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[g][c] = T(0);
#pragma unroll 4
    for (int t = 0; t < tile; ++t) {
      const Quad<T> xq = load_quad(x + int64_t(t) * sx + k0);
      T d[G];
      if (G == 4) {
        const Quad<T> q = load_quad(dz + int64_t(t) * sdz + 4 * u);
#pragma unroll
        for (int g = 0; g < G; ++g) d[g] = q.v[g];
      } else {
#pragma unroll
        for (int g = 0; g < G; ++g) d[g] = dz[int64_t(t) * sdz + G * u + g];
      }
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[g][c] += d[g] * xq.v[c];
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int k = k0 + c;
      if (k > to.K) break;
      const int64_t at = k < to.K ? to.weights + (int64_t(u) * to.K + k) * G : to.bias + int64_t(u) * G;
#pragma unroll
      for (int g = 0; g < G; ++g) partial[at + g] += double(acc[g][c]);
    }
  }
}

// Layer l's inputs of coordinate c into x[0, K): its layer input (the features, or the layer below's
// h_new parked in grad_state) and its own old h.
template <class Dims, typename T>
L2L_DEVICE void layer_inputs(const BackwardArgs<T>& a, Dims dims, int l, int64_t c, const CoordinateInputs<T>& in,
                             T* x) {
  const PackedLayout& lay = a.net.layout;
  const int H = dims.hidden();
  const int I = l == 0 ? dims.inputs() : H;
  const int64_t n = a.n;
  if (l == 0) {
    compute_features<ScalarMath<T>>(dims.features(), in, a.net.features, x);
  } else {
#pragma unroll
    for (int k = 0; k < H; ++k) x[k] = a.grad_state[state_row(lay, l - 1, 0, k) * n + c];
  }
#pragma unroll
  for (int k = 0; k < H; ++k) x[I + k] = a.state[state_row(lay, l, 0, k) * n + c];
}

// Layer l's forward of coordinate c from its inputs x: emit(u, h) receives each unit's new h.
template <class Dims, typename T, class Emit>
L2L_DEVICE void layer_forward(const BackwardArgs<T>& a, Dims dims, const T* w, int l, int64_t c, const T* x,
                              const Emit& emit) {
  const PackedLayout& lay = a.net.layout;
  const int H = dims.hidden();
  const int K = (l == 0 ? dims.inputs() : H) + H;
  const T* w_l = w + lay.layer_offset(l);
  const T* b_l = w + lay.bias_offset(l);
#pragma unroll 1
  for (int u = 0; u < H; ++u) {
    const T c_old = a.state[state_row(lay, l, 1, u) * a.n + c];
    const Quad<T> z = gate_preactivations<Dims>(w_l + int64_t(u) * K * 4, b_l + 4 * u, x, K);
    T i, f, gg, o, c_new, tanh_c, h;
    cell_forward<Activations<T>>(z.v[0], z.v[1], z.v[2], z.v[3], c_old, i, f, gg, o, c_new, tanh_c, h);
    emit(u, h);
  }
}

// The per-coordinate part of layer l's backward (active, finite coordinate c): stages x and dz in
// this thread's rows my_x / my_dz (and h_top / gu for the top layer), writes d state of layer l,
// turns dh into the layer below's (or d grad for layer 0).
template <class Dims, typename T>
L2L_DEVICE void layer_backward(const BackwardArgs<T>& a, Dims dims, const T* w, int l, int64_t c,
                               const CoordinateInputs<T>& in, T (&dh)[Dims::kMaxH], T* my_x, T* my_dz, T* my_h_top) {
  const PackedLayout& lay = a.net.layout;
  const int H = dims.hidden(), L = dims.layers();
  const int I = l == 0 ? dims.inputs() : H, K = I + H;
  const int64_t n = a.n;
  T x[Dims::kMaxK], dx[Dims::kMaxK];
  layer_inputs(a, dims, l, c, in, x);
#pragma unroll
  for (int k = 0; k < K; ++k) dx[k] = T(0);
  const T* w_l = w + lay.layer_offset(l);
  const T* b_l = w + lay.bias_offset(l);
#pragma unroll 1
  for (int u = 0; u < H; ++u) {
    const T c_old = a.state[state_row(lay, l, 1, u) * n + c];
    const T dc_new = a.grad_new_state[state_row(lay, l, 1, u) * n + c];
    const T* w_u = w_l + int64_t(u) * K * 4;
    const Quad<T> z = gate_preactivations<Dims>(w_u, b_l + 4 * u, x, K);
    T i, f, gg, o, c_new, tanh_c, h;
    cell_forward<Activations<T>>(z.v[0], z.v[1], z.v[2], z.v[3], c_old, i, f, gg, o, c_new, tanh_c, h);
    if (l == L - 1) my_h_top[u] = h;
    Quad<T> dzq;
    T dc;
    cell_backward(dh[u], dc_new, i, f, gg, o, c_old, tanh_c, dzq.v[0], dzq.v[1], dzq.v[2], dzq.v[3], dc);
    a.grad_state[state_row(lay, l, 1, u) * n + c] = dc;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const Quad<T> wk = load_quad(w_u + 4 * k);
      T acc = dx[k];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc += wk.v[q] * dzq.v[q];
      dx[k] = acc;
    }
    store_quad(my_dz + 4 * u, dzq);
  }
#pragma unroll
  for (int k = 0; k < K; ++k) my_x[k] = x[k];
  my_x[K] = T(1);
  for (int k = K + 1; k < (K + 4) / 4 * 4; ++k) my_x[k] = T(0);
#pragma unroll
  for (int u = 0; u < H; ++u) a.grad_state[state_row(lay, l, 0, u) * n + c] = dx[I + u];
  if (l > 0) {
#pragma unroll
    for (int u = 0; u < H; ++u) dh[u] = dx[u] + a.grad_new_state[state_row(lay, l - 1, 0, u) * n + c];
  } else {
    a.grad_grad[c] = features_backward<ScalarMath<T>>(dims.features(), in, a.net.features, dx).grad;
  }
}

// Forward through layers 0 .. L-2 of coordinate c, parking each layer's h_new in grad_state.
template <class Dims, typename T>
L2L_DEVICE void park_lower_layers(const BackwardArgs<T>& a, Dims dims, const T* w, int64_t c,
                                  const CoordinateInputs<T>& in) {
  const PackedLayout& lay = a.net.layout;
  const int L = dims.layers();
  T x[Dims::kMaxK];
#pragma unroll
  for (int l = 0; l < L - 1; ++l) {
    layer_inputs(a, dims, l, c, in, x);
    layer_forward(a, dims, w, l, c, x, [&](int u, T h) { a.grad_state[state_row(lay, l, 0, u) * a.n + c] = h; });
  }
}

// The output value y = out_w . h_top + out_b of coordinate c (after park_lower_layers), summed as the
// forward sums it: the bounded output's derivative needs it before the top layer's backward.
template <class Dims, typename T>
L2L_DEVICE T recompute_output(const BackwardArgs<T>& a, Dims dims, const T* w, int64_t c,
                              const CoordinateInputs<T>& in) {
  const PackedLayout& lay = a.net.layout;
  const int L = dims.layers();
  const T* out_w = w + lay.out_weight_offset();
  T x[Dims::kMaxK];
  layer_inputs(a, dims, L - 1, c, in, x);
  T y = w[lay.out_bias_offset()];
  layer_forward(a, dims, w, L - 1, c, x, [&](int u, T h) { y += out_w[u] * h; });
  return y;
}

// d loss / d y from the upstream gradient of the update and the output value y (read for the tanh output only).
template <typename T>
L2L_DEVICE T output_grad(const NetConstants<T>& net, T grad_update, T y) {
  T dy = grad_update * net.output_scale;
  if (net.output == kTanhOutput) {
    const T t = accurate_tanh(y);
    dy *= T(1) - t * t;
  }
  return dy;
}

// d loss / d y from the upstream gradient of the update (OutputKind, lstm_layout.h).
template <class Dims, typename T>
L2L_DEVICE T output_backward(const BackwardArgs<T>& a, Dims dims, const T* w, int64_t c, const CoordinateInputs<T>& in,
                             T grad_update) {
  const T y = a.net.output == kTanhOutput ? recompute_output(a, dims, w, c, in) : T(0);
  return output_grad(a.net, grad_update, y);
}

// NaN when active coordinate c is poisoned (a weight, a state value or a moment not finite), else 0; c's moments
// into `in` when the features read them. The two backward kernels' shared start of the non-finite policy.
template <class Dims, typename T>
L2L_DEVICE T coordinate_poison(const BackwardArgs<T>& a, Dims dims, int64_t c, CoordinateInputs<T>& in) {
  const PackedLayout& lay = a.net.layout;
  const int64_t n = a.n;
  T poison = a.net.weights[lay.poison_offset()];
  for (int64_t r = 0; r < int64_t(dims.layers()) * 2 * dims.hidden(); ++r) poison += a.state[r * n + c] - a.state[r * n + c];
  if (reads_moments(dims.features())) {  // a compile-time false for the fixed dims
    load_moments(a.moments, n, c, in);
    poison += moments_poison(in);
  }
  return poison;
}

// The non-finite policy's outputs of coordinate c, over whatever its derivatives wrote: a non-finite gradient
// (c < n, not active) passes d state through and gets d grad 0; a poisoned one gets NaN everywhere (some
// derivatives may be structurally 0).
template <class Dims, typename T>
L2L_DEVICE void apply_nonfinite_policy(const BackwardArgs<T>& a, Dims dims, int64_t c, bool active, T poison) {
  const int64_t n = a.n, rows = int64_t(dims.layers()) * 2 * dims.hidden();
  if (c < n && !active) {
    a.grad_grad[c] = T(0);
    for (int64_t r = 0; r < rows; ++r) a.grad_state[r * n + c] = a.grad_new_state[r * n + c];
  }
  if (active && poison != poison) {
    a.grad_grad[c] = poison;
    for (int64_t r = 0; r < rows; ++r) a.grad_state[r * n + c] = poison;
  }
}

// Step 3 for layer l (and the output layer for the top one): the FFMA loop, or tensor cores when Mma.
template <bool Mma, class Dims, typename T, class Ctx>
L2L_DEVICE void layer_weight_grads(const Ctx& ctx, const BackwardArgs<T>& a, Dims dims, int l, const BackwardSmem& plan,
                                   const T* smem, double* partial) {
  const PackedLayout& lay = a.net.layout;
  const int H = dims.hidden();
  const GradTarget layer{lay.layer_offset(l), lay.bias_offset(l), (l == 0 ? dims.inputs() : H) + H, 4, H};
  const GradTarget out{lay.out_weight_offset(), lay.out_bias_offset(), H, 1, 1};
  const bool top = l == dims.layers() - 1;
  if constexpr (Mma) {
    static_assert(std::is_same_v<T, float>, "tensor-core weight gradients are float32");
    const int items = mma_weight_grads<4>(ctx, smem + plan.x, plan.sx, smem + plan.dz, plan.sdz, layer, partial);
    if (top) mma_weight_grads<1>(ctx, smem + plan.h_top, plan.sh, smem + plan.gu, 1, out, partial, items);
  } else {
    reduce_weight_grads<4>(ctx, smem + plan.x, plan.sx, smem + plan.dz, plan.sdz, layer, partial);
    if (top) reduce_weight_grads<1>(ctx, smem + plan.h_top, plan.sh, smem + plan.gu, 1, out, partial);
  }
}

template <bool Mma, class Dims, typename T, class Ctx>
L2L_DEVICE void backward_block(const Ctx& ctx, const BackwardArgs<T>& a, Dims dims, unsigned char* smem_bytes) {
  const PackedLayout& lay = a.net.layout;
  const int H = dims.hidden(), L = dims.layers();
  const int tile = ctx.threads(), tid = ctx.thread();
  const int64_t n = a.n;
  T* smem = reinterpret_cast<T*>(smem_bytes);
  const BackwardSmem plan = BackwardSmem::plan(lay, tile, Dims::kFixed || a.weights_in_smem != 0);
  const T* w = stage_weights<Dims>(ctx, a.net.weights, lay.size(), a.weights_in_smem != 0, smem + plan.weights);
  T* my_x = smem + plan.x + int64_t(tid) * plan.sx;
  T* my_dz = smem + plan.dz + int64_t(tid) * plan.sdz;
  T* my_h_top = smem + plan.h_top + int64_t(tid) * plan.sh;
  double* partial = a.partials + int64_t(ctx.block()) * lay.size();
  const T* out_w = w + lay.out_weight_offset();

  for (int64_t base = int64_t(ctx.block()) * tile; base < n; base += int64_t(ctx.blocks()) * tile) {
    const int64_t c = base + tid;
    CoordinateInputs<T> in{c < n ? a.grad[c] : T(0), T(0), T(0), T(0), T(0)};
    const bool active = c < n && is_finite(in.grad);
    T dh[Dims::kMaxH];
    T gu = T(0);
    T poison = T(0);  // NaN: poisoned (a weight, a state value or a moment of the coordinate not finite)
    if (active) {
      poison = coordinate_poison(a, dims, c, in);
      park_lower_layers(a, dims, w, c, in);
      // a poisoned coordinate's upstream is NaN, so that everything downstream is: d state, d grad and
      // the weight gradients
      gu = output_backward(a, dims, w, c, in, poison != poison ? poison : a.grad_update[c]);
      for (int u = 0; u < H; ++u) dh[u] = gu * out_w[u] + a.grad_new_state[state_row(lay, L - 1, 0, u) * n + c];
      my_h_top[H] = T(1);
      for (int k = H + 1; k < (H + 4) / 4 * 4; ++k) my_h_top[k] = T(0);
    } else {
      for (int k = 0; k < (H + 4) / 4 * 4; ++k) my_h_top[k] = T(0);
    }
    smem[plan.gu + tid] = gu;
#pragma unroll
    for (int l = L - 1; l >= 0; --l) {
      const int K = (l == 0 ? dims.inputs() : H) + H;
      if (active) {
        layer_backward(a, dims, w, l, c, in, dh, my_x, my_dz, my_h_top);
      } else {  // inactive coordinates add nothing to the weight gradients
        for (int k = 0; k < (K + 4) / 4 * 4; ++k) my_x[k] = T(0);
        for (int k = 0; k < 4 * H; ++k) my_dz[k] = T(0);
      }
      ctx.sync();
      layer_weight_grads<Mma>(ctx, a, dims, l, plan, smem, partial);
      ctx.sync();  // the staging rows are rewritten next
    }
    apply_nonfinite_policy(a, dims, c, active, poison);
  }
}

// out[q] = sum over blocks b (in order) of partials[b][q].
template <class Ctx>
L2L_DEVICE void sum_partials_thread(const Ctx& ctx, const double* partials, int blocks, int64_t size, double* out) {
  const int64_t q = int64_t(ctx.block()) * ctx.threads() + ctx.thread();
  if (q >= size) return;
  double total = 0;
  for (int b = 0; b < blocks; ++b) total += partials[int64_t(b) * size + q];
  out[q] = total;
}

}  // namespace cuda
}  // namespace l2l_fast
