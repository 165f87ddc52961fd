// What a CUDA launch receives (passed by value as a __grid_constant__ kernel parameter), the
// compile-time or run-time network sizes, and the shared-memory plan of the backward.
// Torch-free; shared by the kernels, the launch code and the CPU emulation.
#pragma once
#include <cstdint>

#include "cuda/device_math.h"
#include "lstm_layout.h"

namespace l2l_fast {
namespace cuda {

// One parameter tensor of a launch: its coordinates are the state's columns [begin, begin + n).
struct TensorSlot {
  void* param;        // [n] (param += update) or null
  const void* grad;   // [n]
  int64_t begin;
  int64_t n;
  int32_t param_type;  // ElemType
  int32_t grad_type;
};

// Tensors per launch: 48 slots (1.9 KB) keep the whole parameter block under the classic 4 KB limit.
constexpr int kMaxSlots = 48;

// The forward / in-place step over the state columns [begin, end) (one launch; the slots tile the
// range in order). S is the state's storage type (T or bf16), T the arithmetic type.
template <typename T, typename S>
struct ForwardArgs {
  NetConstants<T> net;  // layout, constants, packed weights (in global memory)
  int64_t begin = 0, end = 0;
  int64_t columns = 0;  // the state's last dimension (its row stride)
  int32_t weights_in_smem = 0;  // copied to shared memory by each block first
  const S* state = nullptr;    // [L][2][H][columns]
  S* new_state = nullptr;      // == state for the in-place step
  T* update = nullptr;         // [columns] or null
  // [4][columns] (rows m, v, t, u; input_features.h) when the features read moments, else null. With
  // new_moments null (lstm_step) they are this step's, used as they are; else (the in-place steps)
  // new_moments == moments and the kernel advances them in place.
  const T* moments = nullptr;
  T* new_moments = nullptr;
  int32_t slot_count = 0;
  TensorSlot slots[kMaxSlots];
};

// The backward of one step (out of place, T storage everywhere). partials: one row of layout.size()
// float64 weight-gradient sums per block, summed over blocks in block order by a second kernel.
template <typename T>
struct BackwardArgs {
  NetConstants<T> net;
  int64_t n = 0;
  int32_t weights_in_smem = 0;
  const T* grad = nullptr;            // [n]
  const T* state = nullptr;           // [L][2][H][n]
  const T* moments = nullptr;         // [4][n], this step's (already advanced), when the features read them
  const T* grad_update = nullptr;     // [n]
  const T* grad_new_state = nullptr;  // [L][2][H][n]
  T* grad_grad = nullptr;             // [n]
  T* grad_state = nullptr;            // [L][2][H][n]; rows (l < L-1, h) double as scratch for h_new
  double* partials = nullptr;         // [gridDim.x][layout.size()], zero on entry
};

// Sizes and input features known at compile time: per-thread arrays stay in registers, every loop
// over inputs unrolls and the features' branches fold away. The paper's optimizer.
template <int H, int L, uint32_t Features>
struct FixedDims {
  static constexpr bool kFixed = true;
  static constexpr int kInputs = input_width(Features);
  static constexpr int kMaxH = H;
  static constexpr int kMaxK = (H > kInputs ? H : kInputs) + H;
  L2L_HD constexpr int hidden() const { return H; }
  L2L_HD constexpr int layers() const { return L; }
  L2L_HD constexpr uint32_t features() const { return Features; }
  L2L_HD constexpr int inputs() const { return kInputs; }  // of the first layer
};

// Any hidden size up to HMax, any layer count and features: the same code, its arrays in local memory.
template <int HMax>
struct RuntimeDims {
  static constexpr bool kFixed = false;
  static constexpr int kMaxH = HMax;
  static constexpr int kMaxK = (HMax > kMaxFeatureInputs ? HMax : kMaxFeatureInputs) + HMax;
  int h, l;
  uint32_t f;
  int i;
  L2L_HD int hidden() const { return h; }
  L2L_HD int layers() const { return l; }
  L2L_HD uint32_t features() const { return f; }
  L2L_HD int inputs() const { return i; }
};

// Largest hidden size the CUDA kernels take (the per-thread arrays are sized for it).
constexpr int kMaxHiddenCuda = 128;

// Calls fn(dims) with the Dims type for this layout.
template <typename Fn>
void dispatch_dims(const PackedLayout& layout, Fn&& fn) {
  if (layout.hidden == 20 && layout.layers == 2 && layout.features == kDefaultFeatures) {
    fn(FixedDims<20, 2, kDefaultFeatures>{});
  } else if (layout.hidden <= 32) {
    fn(RuntimeDims<32>{layout.hidden, layout.layers, layout.features, layout.inputs});
  } else {
    fn(RuntimeDims<kMaxHiddenCuda>{layout.hidden, layout.layers, layout.features, layout.inputs});
  }
}

L2L_HD int max_k_size(const PackedLayout& layout) {
  int k = 0;
  for (int l = 0; l < layout.layers; ++l) k = k > layout.k_size(l) ? k : layout.k_size(l);
  return k;
}

// Row stride (in elements) of a staging array of `width` values per coordinate: a multiple of 4
// (16-byte rows for the 4-wide loads) with an odd number of 16-byte chunks, so that 8 threads
// storing one 4-wide chunk each into consecutive rows hit 8 different bank groups.
L2L_HD constexpr int staging_stride(int width) {
  int stride = (width + 3) / 4 * 4;
  if ((stride / 4) % 2 == 0) stride += 4;
  return stride;
}

// Shared memory of the backward, per block of `threads` coordinates, in elements of T:
//   [weights (if in shared memory)] [x: threads][sx] [dz: threads][sdz] [h_top: threads][sh] [gu: threads]
// x holds a layer's inputs and a 1 (the bias column), dz its gate gradients, h_top / gu the output
// layer's input and gradient.
struct BackwardSmem {
  int sx, sdz, sh;
  int64_t weights, x, dz, h_top, gu, total;  // offsets and total size in elements

  L2L_HD static BackwardSmem plan(const PackedLayout& layout, int threads, bool weights_in_smem) {
    BackwardSmem s;
    s.sx = staging_stride(max_k_size(layout) + 1);
    s.sdz = staging_stride(4 * layout.hidden);
    s.sh = staging_stride(layout.hidden + 1);
    s.weights = 0;
    s.x = weights_in_smem ? (layout.size() + 3) / 4 * 4 : 0;
    s.dz = s.x + int64_t(threads) * s.sx;
    s.h_top = s.dz + int64_t(threads) * s.sdz;
    s.gu = s.h_top + int64_t(threads) * s.sh;
    s.total = s.gu + threads;
    return s;
  }
};

// Where the weight gradients of one staged block of (inputs x, gradients dz) go in the packed layout.
struct GradTarget {
  int64_t weights;  // packed index of (unit 0, input 0, gate 0); unit u, input k, gate g at + (u K + k) G + g
  int64_t bias;     // index of input k == K (the bias column): + u G + g
  int K;            // inputs per unit
  int G;            // gates per unit: 4 for an LSTM layer, 1 for the output layer
  int units;
};

// Launch shape of a backward: block size, grid (one partial row per block), shared memory.
struct BackwardPlan {
  int threads = 0, blocks = 0;
  bool weights_in_smem = false;
  bool mma = false;        // weight gradients on tensor cores (backward_mma.h; float32 only)
  bool mma_gates = false;  // and the gate and input products (backward_mma_body.h; hidden 20 x 2 only)
  int64_t smem_bytes = 0;
};

// Largest block in {128, 64, 32} whose staging (and, preferably, weights) fits in `smem_limit`
// bytes; threads == 0 when nothing fits.
inline BackwardPlan plan_backward(const PackedLayout& layout, int elem_size, int64_t smem_limit) {
  BackwardPlan plan;
  for (int with_weights = 1; with_weights >= 0; --with_weights)
    for (int threads = 128; threads >= 32; threads /= 2) {
      const int64_t bytes = BackwardSmem::plan(layout, threads, with_weights != 0).total * elem_size;
      if (bytes <= smem_limit) {
        plan.threads = threads;
        plan.weights_in_smem = with_weights != 0;
        plan.smem_bytes = bytes;
        return plan;
      }
    }
  return plan;
}

// The forward keeps the weights in shared memory when they fit the default 48 KB (always for the
// compiled-in sizes); larger nets read them through the L1 cache.
constexpr int64_t kForwardSmemLimit = 48 * 1024;
constexpr int kForwardThreads = 128;

}  // namespace cuda
}  // namespace l2l_fast
