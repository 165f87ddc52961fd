// The four ops for the CUDA kernels, everything but the launches: argument checks, contiguous
// inputs, weight packing on the device, outputs, write-back of non-contiguous in-place arguments.
// Templated over the Launcher (cuda/lstm_step_cuda.cpp launches the kernels on the current stream;
// tests/cuda_emulation runs the same kernel bodies on CPU threads), so that the emulation checks this
// code too. Semantics are those of the CPU binding (cpu/lstm_step_cpu.cpp).
//
// Launcher interface:
//   template <T, S> static void forward(ForwardArgs<T, S>&);           sets weights_in_smem, launches
//   template <T> static BackwardPlan backward_plan(const PackedLayout&, int64_t n);
//   template <T> static void backward(BackwardArgs<T>&, const BackwardPlan&);
//   static void sum_partials(const double* partials, int blocks, int64_t size, double* out);
//   static int64_t stream_id();   the stream the launches go on (packed weights are cached per stream)
//   static bool capturing();      whether that stream is capturing a CUDA graph (then nothing is cached)
#pragma once
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/kernel_args.h"
#include "cuda/weights_aten.h"
#include "op_checks.h"

namespace l2l_fast {
namespace cuda {

inline int32_t elem_type_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", type);
  }
  return kF32;
}

inline void check_hidden_supported(const PackedLayout& layout) {
  TORCH_CHECK_VALUE(layout.hidden <= kMaxHiddenCuda, "weights: hidden_size ", layout.hidden,
                    " is larger than the CUDA kernels support (", kMaxHiddenCuda, "); use the CPU or the reference backend");
}

// The packed weights on the weights' device, through the cache of weight versions (packed_cache.h) except
// during graph capture (the packing must be part of the graph) and in calls autograd records for the
// weights (a hit cannot be checked against the weights' values here; gradcheck perturbs them through .data).
template <class Launcher>
at::Tensor device_packed_weights(at::TensorList weights, const PackedLayout& layout) {
  const bool recorded = at::GradMode::is_enabled() &&
                        std::any_of(weights.begin(), weights.end(), [](const at::Tensor& w) { return w.requires_grad(); });
  return packed_weights(weights, layout, Launcher::stream_id(), !recorded && !Launcher::capturing(),
                        /*verify=*/false, [&] { return pack_weights_on_device(weights, layout); });
}

// The moments as a contiguous tensor (the argument itself when it is one), undefined when the features
// read none (op_checks.h's check_moments has made sure which).
inline at::Tensor contiguous_moments(const std::optional<at::Tensor>& moments) {
  return moments.has_value() && moments->defined() ? moments->contiguous() : at::Tensor();
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// In-place ops: the advanced moments into a non-contiguous argument.
inline void write_back_moments(const std::optional<at::Tensor>& moments, const at::Tensor& work) {
  if (work.defined() && !work.is_same(*moments)) moments->copy_(work);
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor> lstm_step(const at::Tensor& grad_in, const at::Tensor& state_in, at::TensorList weights,
                                             double preprocess_p, double output_scale, int64_t features,
                                             const std::optional<at::Tensor>& moments_in, int64_t output) {
  const PackedLayout layout =
      check_step_args(grad_in, state_in, weights, features, preprocess_p, output_scale, moments_in, output);
  check_hidden_supported(layout);
  const at::OptionalDeviceGuard guard(at::device_of(grad_in));
  const at::Tensor grad = grad_in.contiguous(), state = state_in.contiguous();
  const at::Tensor moments = contiguous_moments(moments_in);
  at::Tensor update = at::empty_like(grad, at::MemoryFormat::Contiguous);
  at::Tensor new_state = at::empty_like(state, at::MemoryFormat::Contiguous);
  const int64_t n = grad.size(0);
  if (n == 0) return {update, new_state};
  const at::Tensor packed = device_packed_weights<Launcher>(weights, layout);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "l2l_fast_lstm_step_cuda", [&] {
    ForwardArgs<scalar_t, scalar_t> a;
    a.net = make_net_constants<scalar_t>(layout, preprocess_p, output_scale, packed.data_ptr<scalar_t>(), output);
    a.begin = 0;
    a.end = a.columns = n;
    a.state = state.data_ptr<scalar_t>();
    a.new_state = new_state.data_ptr<scalar_t>();
    a.update = update.data_ptr<scalar_t>();
    a.moments = data_or_null<scalar_t>(moments);  // this step's: read, not advanced
    const int32_t type = elem_type_of(grad.scalar_type());
    a.slot_count = 1;
    a.slots[0] = TensorSlot{nullptr, grad.data_ptr(), 0, n, type, type};
    Launcher::forward(a);
  });
  return {update, new_state};
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_step_backward(
    const at::Tensor& grad_update_in, const at::Tensor& grad_new_state_in, const at::Tensor& grad_in,
    const at::Tensor& state_in, at::TensorList weights, double preprocess_p, double output_scale, int64_t features,
    const std::optional<at::Tensor>& moments_in, int64_t output) {
  const PackedLayout layout = check_backward_args(grad_update_in, grad_new_state_in, grad_in, state_in, weights,
                                                  features, preprocess_p, output_scale, moments_in, output);
  check_hidden_supported(layout);
  const at::OptionalDeviceGuard guard(at::device_of(grad_in));
  const at::Tensor grad = grad_in.contiguous(), state = state_in.contiguous();
  const at::Tensor grad_update = grad_update_in.contiguous(), grad_new_state = grad_new_state_in.contiguous();
  const at::Tensor moments = contiguous_moments(moments_in);
  at::Tensor grad_grad = at::empty_like(grad, at::MemoryFormat::Contiguous);
  at::Tensor grad_state = at::empty_like(state, at::MemoryFormat::Contiguous);
  const int64_t n = grad.size(0), size = layout.size();
  const at::TensorOptions sums_options = grad.options().dtype(at::kDouble);
  if (n == 0) return {grad_grad, grad_state, unpack_weight_grads_on_device(at::zeros({size}, sums_options), weights, layout)};
  const at::Tensor packed = device_packed_weights<Launcher>(weights, layout);
  at::Tensor sums = at::empty({size}, sums_options);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "l2l_fast_lstm_step_backward_cuda", [&] {
    const BackwardPlan plan = Launcher::template backward_plan<scalar_t>(layout, n);
    at::Tensor partials = at::zeros({plan.blocks, size}, sums_options);
    BackwardArgs<scalar_t> a;
    a.net = make_net_constants<scalar_t>(layout, preprocess_p, output_scale, packed.data_ptr<scalar_t>(), output);
    a.n = n;
    a.weights_in_smem = plan.weights_in_smem;
    a.grad = grad.data_ptr<scalar_t>();
    a.state = state.data_ptr<scalar_t>();
    a.moments = data_or_null<scalar_t>(moments);
    a.grad_update = grad_update.data_ptr<scalar_t>();
    a.grad_new_state = grad_new_state.data_ptr<scalar_t>();
    a.grad_grad = grad_grad.data_ptr<scalar_t>();
    a.grad_state = grad_state.data_ptr<scalar_t>();
    a.partials = partials.data_ptr<double>();
    Launcher::backward(a, plan);
    Launcher::sum_partials(a.partials, plan.blocks, size, sums.data_ptr<double>());
  });
  return {grad_grad, grad_state, unpack_weight_grads_on_device(sums, weights, layout)};
}

template <class Launcher>
void lstm_step_(at::Tensor param, const at::Tensor& grad_in, at::Tensor state, at::TensorList weights,
                double preprocess_p, double output_scale, int64_t features,
                const std::optional<at::Tensor>& moments, int64_t output) {
  const PackedLayout layout =
      check_inplace_args(param, grad_in, state, weights, features, preprocess_p, output_scale, moments, output);
  check_hidden_supported(layout);
  const at::OptionalDeviceGuard guard(at::device_of(grad_in));
  const int64_t n = grad_in.size(0);
  if (n == 0) return;
  const at::Tensor grad = grad_in.contiguous();
  // non-contiguous param / state / moments: work on contiguous copies, then write them back
  at::Tensor param_work = param.contiguous(), state_work = state.contiguous();
  const at::Tensor moments_work = contiguous_moments(moments);
  const at::Tensor packed = device_packed_weights<Launcher>(weights, layout);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "l2l_fast_lstm_step_inplace_cuda", [&] {
    ForwardArgs<scalar_t, scalar_t> a;
    a.net = make_net_constants<scalar_t>(layout, preprocess_p, output_scale, packed.data_ptr<scalar_t>(), output);
    a.begin = 0;
    a.end = a.columns = n;
    a.state = a.new_state = state_work.data_ptr<scalar_t>();
    a.moments = a.new_moments = data_or_null<scalar_t>(moments_work);  // advanced in place
    const int32_t type = elem_type_of(grad.scalar_type());
    a.slot_count = 1;
    a.slots[0] = TensorSlot{param_work.data_ptr(), grad.data_ptr(), 0, n, type, type};
    Launcher::forward(a);
  });
  if (!param_work.is_same(param)) param.copy_(param_work);
  if (!state_work.is_same(state)) state.copy_(state_work);
  write_back_moments(moments, moments_work);
}

// ------------------------------------------------------------------------------------------------
// lstm_multi_step_: params[k] += update, state (and moments) columns [offset_k, offset_k + n_k) advanced.

template <class Launcher, typename T, typename S>
void multi_step_launches(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<int64_t>& offsets, at::Tensor& state, const at::Tensor& moments,
                         const PackedLayout& layout, const at::Tensor& packed, double preprocess_p,
                         double output_scale, int64_t output) {
  ForwardArgs<T, S> a;
  a.net = make_net_constants<T>(layout, preprocess_p, output_scale, packed.data_ptr<T>(), output);
  a.columns = state.size(3);
  a.state = a.new_state = reinterpret_cast<S*>(state.data_ptr());
  a.moments = a.new_moments = data_or_null<T>(moments);  // [4][columns], advanced in place
  a.slot_count = 0;
  auto flush = [&] {
    if (a.slot_count == 0) return;
    a.begin = a.slots[0].begin;
    a.end = a.slots[a.slot_count - 1].begin + a.slots[a.slot_count - 1].n;
    Launcher::forward(a);
    a.slot_count = 0;
  };
  for (size_t k = 0; k < params.size(); ++k) {
    const int64_t n = params[k].size(0);
    if (n == 0) continue;
    // a launch covers consecutive columns: empty tensors in between take none
    a.slots[a.slot_count++] = TensorSlot{params[k].data_ptr(), grads[k].data_ptr(), offsets[k], n,
                                         elem_type_of(params[k].scalar_type()), elem_type_of(grads[k].scalar_type())};
    if (a.slot_count == kMaxSlots) flush();
  }
  flush();
}

template <class Launcher>
void lstm_multi_step_(at::TensorList params_in, at::TensorList grads_in, at::Tensor state, at::TensorList weights,
                      double preprocess_p, double output_scale, int64_t features,
                      const std::optional<at::Tensor>& moments, int64_t output) {
  const PackedLayout layout = check_multi_step_args(params_in, grads_in, state, weights, features, preprocess_p,
                                                    output_scale, moments, output);
  check_hidden_supported(layout);
  if (state.size(3) == 0) return;
  const at::OptionalDeviceGuard guard(at::device_of(state));
  std::vector<at::Tensor> params, grads;
  std::vector<int64_t> offsets;  // tensor k's first state column
  int64_t total = 0;
  for (size_t k = 0; k < params_in.size(); ++k) {
    params.push_back(params_in[k].contiguous());
    grads.push_back(grads_in[k].contiguous());
    offsets.push_back(total);
    total += params_in[k].size(0);
  }
  at::Tensor state_work = state.contiguous();
  const at::Tensor moments_work = contiguous_moments(moments);
  const at::Tensor packed = device_packed_weights<Launcher>(weights, layout);
  const bool bf16_state = state.scalar_type() == at::kBFloat16;  // else the weights' dtype (checked)
  AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "l2l_fast_lstm_multi_step_cuda", [&] {
    if (bf16_state)
      multi_step_launches<Launcher, scalar_t, bf16>(params, grads, offsets, state_work, moments_work, layout, packed,
                                                    preprocess_p, output_scale, output);
    else
      multi_step_launches<Launcher, scalar_t, scalar_t>(params, grads, offsets, state_work, moments_work, layout,
                                                        packed, preprocess_p, output_scale, output);
  });
  for (size_t k = 0; k < params.size(); ++k)
    if (!params[k].is_same(params_in[k])) params_in[k].copy_(params[k]);
  if (!state_work.is_same(state)) state.copy_(state_work);
  write_back_moments(moments, moments_work);
}

}  // namespace cuda
}  // namespace l2l_fast
