// CPU binding of lstm_multi_step_, the optimizer's step over a list of parameter tensors in one call.
//
// The coordinates of all tensors form one range [0, N), N = sum_k n_k, tensor k at [offset_k, offset_k + n_k)
// of the state's last axis. Each thread takes a tile-aligned part of that range and walks the tensors
// it touches. Where a tensor's param and grad are contiguous in the math dtype and the state is too,
// the kernel runs on them in place (state rows keep their stride N). Otherwise the thread stages blocks
// of kBlock coordinates in small buffers of the math dtype: grad (any stride, widened), param (widened;
// rounded to nearest on the way back), and for a bfloat16 state of float64 math its 2 L H rows. The
// float32 kernels read and write a bfloat16 state themselves (forward_f32_bf16_state), with the bits of
// the staged float32 step. Every coordinate's result is the same whichever path or thread computed it.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/cpu_dispatch.h"
#include "op_checks.h"

namespace l2l_fast {
namespace cpu {
namespace {

// Coordinates staged per block: 2 L H state rows of kBlock values stay in L2 (80 x 512 x 4 B = 160 KiB
// for H = 20, L = 2); a multiple of every kernel tile.
constexpr int64_t kBlock = 512;

// Conversions between storage and math types. bfloat16 <-> float go through the bits, in loops the compiler
// vectorizes (c10::BFloat16's per-value conversion does not, and cost half as much as the step itself on a
// bfloat16 state); the rounding is c10's: to nearest even, NaN -> 0x7FC0. Other pairs convert by value.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : rounded;
}

// The contiguous loops, cloned per instruction set (GCC picks one at load time): 16 lanes where AVX-512 runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define L2L_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define L2L_VECTOR_CLONES
#endif

L2L_VECTOR_CLONES void widen_bf16(const uint16_t* bits, float* to, int64_t count) {
  for (int64_t i = 0; i < count; ++i) to[i] = bf16_to_float(bits[i]);
}

L2L_VECTOR_CLONES void narrow_bf16(const float* from, uint16_t* bits, int64_t count) {
  for (int64_t i = 0; i < count; ++i) bits[i] = float_to_bf16(from[i]);
}

template <typename To, typename From>
void convert(const From* from, int64_t from_stride, To* to, int64_t to_stride, int64_t count) {
  if constexpr (std::is_same<To, float>::value && std::is_same<From, c10::BFloat16>::value) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(from);
    if (from_stride == 1 && to_stride == 1) return widen_bf16(bits, to, count);
    for (int64_t i = 0; i < count; ++i) to[i * to_stride] = bf16_to_float(bits[i * from_stride]);
  } else if constexpr (std::is_same<To, c10::BFloat16>::value && std::is_same<From, float>::value) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(to);
    if (from_stride == 1 && to_stride == 1) return narrow_bf16(from, bits, count);
    for (int64_t i = 0; i < count; ++i) bits[i * to_stride] = float_to_bf16(from[i * from_stride]);
  } else {
    for (int64_t i = 0; i < count; ++i) to[i * to_stride] = To(from[i * from_stride]);
  }
}

// One tensor of the list: raw pointers and strides, its dtype, its place in the state.
struct Item {
  void* param;
  const void* grad;
  int64_t param_stride, grad_stride, numel, offset;
  at::ScalarType type;
};

template <typename M, typename P, typename S>
class MultiStep {
  // the kernels step the state in place in its own storage: the math dtype, or bfloat16 under float32 math
  static constexpr bool kKernelState =
      std::is_same<S, M>::value || (std::is_same<M, float>::value && std::is_same<S, c10::BFloat16>::value);

 public:
  MultiStep(const StepParams<M>& base, void* state, int64_t total, const CpuKernels& kernels)
      : base_(base), state_(static_cast<S*>(state)), total_(total), kernel_(TypedKernels<M>::forward(kernels)),
        bf16_state_kernel_(kernels.forward_f32_bf16_state), moments_(base.new_moments),
        rows_(int64_t(base.net.layout.layers) * 2 * base.net.layout.hidden) {}

  // Steps coordinates [begin, end) of item `it`.
  void run(const Item& it, int64_t begin, int64_t end) {
    P* param = static_cast<P*>(it.param);
    const P* grad = static_cast<const P*>(it.grad);
    constexpr bool same_type = std::is_same<P, M>::value;
    const bool direct_param = same_type && it.param_stride == 1;
    const bool direct_grad = same_type && it.grad_stride == 1;
    if constexpr (same_type && kKernelState) {
      if (direct_param && direct_grad) {
        launch(param + begin, grad + begin, state_ + it.offset + begin, total_, it.offset + begin, end - begin);
        return;
      }
    }
    stage_buffers();
    for (int64_t s = begin; s < end; s += kBlock) {
      const int64_t len = std::min(kBlock, end - s);
      M* param_at = param_buf_.data();
      const M* grad_at = grad_buf_.data();
      if constexpr (same_type) {
        if (direct_param) param_at = param + s;
        if (direct_grad) grad_at = grad + s;
      }
      if (!direct_param) convert(param + s * it.param_stride, it.param_stride, param_buf_.data(), 1, len);
      if (!direct_grad) convert(grad + s * it.grad_stride, it.grad_stride, grad_buf_.data(), 1, len);
      S* rows = state_ + it.offset + s;  // row r of this block at rows + r * total_
      if constexpr (kKernelState) {
        launch(param_at, grad_at, rows, total_, it.offset + s, len);
      } else {
        for (int64_t r = 0; r < rows_; ++r) convert(rows + r * total_, 1, state_buf_.data() + r * kBlock, 1, len);
        launch(param_at, grad_at, state_buf_.data(), kBlock, it.offset + s, len);
        for (int64_t r = 0; r < rows_; ++r) convert(state_buf_.data() + r * kBlock, 1, rows + r * total_, 1, len);
      }
      // rounded to nearest even
      if (!direct_param) convert(param_buf_.data(), 1, param + s * it.param_stride, it.param_stride, len);
    }
  }

 private:
  // The kernel over `len` coordinates: state rows of stride `stride`, updated in place; the moments (in the
  // math dtype, never staged) of coordinate `at` of the whole range, rows of stride total_.
  template <typename State>
  void launch(M* param, const M* grad, State* state, int64_t stride, int64_t at, int64_t len) {
    StepParams<M> p = base_;
    p.n = stride;  // the kernels use n only as the row stride of the state
    p.param = param;
    p.grad = grad;
    if (moments_) p.moments = p.new_moments = moments_ + at;
    if constexpr (std::is_same<State, M>::value) {
      p.state = state;
      p.new_state = state;
      kernel_(p, 0, len);
    } else {  // bfloat16 words under float32 math
      uint16_t* words = reinterpret_cast<uint16_t*>(state);
      bf16_state_kernel_(p, words, words, 0, len);
    }
  }

  void stage_buffers() {
    if (!grad_buf_.empty()) return;
    grad_buf_.resize(kBlock);
    param_buf_.resize(kBlock);
    if (!kKernelState) state_buf_.resize(size_t(rows_) * kBlock);
  }

  const StepParams<M>& base_;
  S* state_;
  const int64_t total_;
  void (*kernel_)(const StepParams<M>&, int64_t, int64_t);
  void (*bf16_state_kernel_)(const StepParams<float>&, const uint16_t*, uint16_t*, int64_t, int64_t);
  M* moments_;  // [4][total_] or null
  const int64_t rows_;
  std::vector<M> grad_buf_, param_buf_, state_buf_;
};

// One thread's part [lo, hi) of the coordinate range, over the items it intersects.
template <typename M, typename S>
void run_part(const StepParams<M>& base, void* state, int64_t total, const std::vector<Item>& items, int64_t lo,
              int64_t hi) {
  const CpuKernels& kernels = active_kernels();
  MultiStep<M, M, S> same(base, state, total, kernels);
  MultiStep<M, c10::BFloat16, S> bf16(base, state, total, kernels);
  MultiStep<M, c10::Half, S> half(base, state, total, kernels);
  // first item ending after lo
  auto at = std::upper_bound(items.begin(), items.end(), lo,
                             [](int64_t v, const Item& it) { return v < it.offset + it.numel; });
  for (; at != items.end() && at->offset < hi; ++at) {
    const int64_t begin = std::max(lo, at->offset) - at->offset;
    const int64_t end = std::min(hi, at->offset + at->numel) - at->offset;
    if (begin >= end) continue;
    if (at->type == at::kBFloat16) {
      if constexpr (std::is_same<M, float>::value) bf16.run(*at, begin, end);
    } else if (at->type == at::kHalf) {
      if constexpr (std::is_same<M, float>::value) half.run(*at, begin, end);
    } else {
      same.run(*at, begin, end);
    }
  }
}

void lstm_multi_step_cpu(at::TensorList params, at::TensorList grads, at::Tensor state, at::TensorList weights,
                         double preprocess_p, double output_scale, int64_t features,
                         const std::optional<at::Tensor>& moments, int64_t output) {
  const PackedLayout layout =
      check_multi_step_args(params, grads, state, weights, features, preprocess_p, output_scale, moments, output);
  // Non-contiguous param (1-D, strided) is read and written through its stride; a non-contiguous
  // state or moments tensor is stepped as a contiguous copy, then written back.
  at::Tensor state_work = state.contiguous();
  at::Tensor moments_work = moments.has_value() && moments->defined() ? moments->contiguous() : at::Tensor();
  const at::Tensor packed = cpu_packed_weights(weights, layout);
  const int64_t total = state_work.size(3);
  std::vector<Item> items;
  int64_t offset = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    const int64_t n = params[k].size(0);
    if (n > 0)
      items.push_back(Item{params[k].data_ptr(), grads[k].data_ptr(), params[k].stride(0), grads[k].stride(0), n,
                           offset, params[k].scalar_type()});
    offset += n;
  }
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "l2l_fast_lstm_multi_step_cpu", [&] {
      using M = scalar_t;
      StepParams<M> base;
      base.net = make_net_constants<M>(layout, preprocess_p, output_scale, packed.data_ptr<M>(), output);
      if (moments_work.defined()) {
        base.new_moments = moments_work.data_ptr<M>();
        base.moments_stride = total;
      }
      const int64_t tile = TypedKernels<M>::tile(active_kernels());
      const std::vector<int64_t> bounds = chunk_bounds(total, tile, at::get_num_threads());
      void* state_ptr = state_work.data_ptr();
      const bool bf16_state = state_work.scalar_type() == at::kBFloat16;
      if (bf16_state && std::is_same<M, float>::value)  // every built table has it; a new one must too
        TORCH_CHECK(active_kernels().forward_f32_bf16_state != nullptr, "lstm_multi_step_: the CPU kernels in use (",
                    active_kernels().products, " products) have no bfloat16-state step");
      run_chunks(int64_t(bounds.size()) - 1, [&](int64_t c) {
        if (bf16_state)
          run_part<M, c10::BFloat16>(base, state_ptr, total, items, bounds[c], bounds[c + 1]);
        else
          run_part<M, M>(base, state_ptr, total, items, bounds[c], bounds[c + 1]);
      });
    });
  }
  if (!state_work.is_same(state)) state.copy_(state_work);
  if (moments_work.defined() && !moments_work.is_same(*moments)) moments->copy_(moments_work);
}

}  // namespace

TORCH_LIBRARY_IMPL(l2l_fast, CPU, m) { m.impl("lstm_multi_step_", &lstm_multi_step_cpu); }
// A sparse tensor among the arguments routes the call here: the checks reject it with a TypeError naming it,
// instead of the dispatcher's "no kernel for SparseCPU".
TORCH_LIBRARY_IMPL(l2l_fast, SparseCPU, m) { m.impl("lstm_multi_step_", &lstm_multi_step_cpu); }

}  // namespace cpu
}  // namespace l2l_fast
