// CPU binding of the ops: checks arguments, packs the weights, splits the coordinates over threads
// and calls the kernels of the instruction set in use (isa_select.h).
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "cpu/cpu_dispatch.h"
#include "cpu/output_cache.h"
#include "op_checks.h"
#include "packed_cache.h"

namespace l2l_fast {
namespace cpu {
namespace {

template <typename T>
StepParams<T> make_params(const PackedLayout& layout, const at::Tensor& packed, const at::Tensor& grad,
                          const at::Tensor& state, double p, double scale, int64_t output) {
  StepParams<T> params;
  params.net = make_net_constants<T>(layout, p, scale, packed.data_ptr<T>(), output);
  params.n = grad.size(0);
  params.grad = grad.data_ptr<T>();
  params.state = state.data_ptr<T>();
  params.moments_stride = params.n;
  return params;
}

// The moments as the kernels read them: contiguous, or undefined when the features read none.
at::Tensor contiguous_moments(const std::optional<at::Tensor>& moments) {
  return moments.has_value() && moments->defined() ? moments->contiguous() : at::Tensor();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
void run_forward(const StepParams<T>& params) {
  const CpuKernels& kernels = active_kernels();
  const auto fn = TypedKernels<T>::forward(kernels);
  const int64_t tile = TypedKernels<T>::tile(kernels);
  const std::vector<int64_t> bounds = chunk_bounds(params.n, tile, at::get_num_threads());
  run_chunks(int64_t(bounds.size()) - 1, [&](int64_t c) { fn(params, bounds[c], bounds[c + 1]); });
}

// Each chunk sums its weight gradients in its own float64 buffer; the buffers are added in chunk
// order, so the result does not depend on thread scheduling.
template <typename T>
at::Tensor run_backward(const StepParams<T>& params) {
  const CpuKernels& kernels = active_kernels();
  const auto fn = TypedKernels<T>::backward(kernels);
  const int64_t tile = TypedKernels<T>::tile(kernels);
  const std::vector<int64_t> bounds = chunk_bounds(params.n, tile, at::get_num_threads());
  const int64_t chunks = int64_t(bounds.size()) - 1, size = params.net.layout.size();
  at::Tensor sums = at::zeros({chunks, size}, at::kDouble);
  double* all = sums.data_ptr<double>();
  run_chunks(chunks, [&](int64_t c) { fn(params, bounds[c], bounds[c + 1], all + c * size); });
  return sums.sum(0);
}

std::tuple<at::Tensor, at::Tensor> lstm_step_cpu(const at::Tensor& grad_in, const at::Tensor& state_in,
                                                 at::TensorList weights, double preprocess_p, double output_scale,
                                                 int64_t features, const std::optional<at::Tensor>& moments_in,
                                                 int64_t output) {
  const PackedLayout layout =
      check_step_args(grad_in, state_in, weights, features, preprocess_p, output_scale, moments_in, output);
  const at::Tensor grad = grad_in.contiguous(), state = state_in.contiguous();
  const at::Tensor moments = contiguous_moments(moments_in);
  at::Tensor update = empty_output_like(grad), new_state = empty_output_like(state);
  const at::Tensor packed = cpu_packed_weights(weights, layout);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "l2l_fast_lstm_step_cpu", [&] {
    StepParams<scalar_t> params =
        make_params<scalar_t>(layout, packed, grad, state, preprocess_p, output_scale, output);
    params.moments = data_or_null<scalar_t>(moments);
    params.update = update.data_ptr<scalar_t>();
    params.new_state = new_state.data_ptr<scalar_t>();
    run_forward(params);
  });
  return {update, new_state};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> lstm_step_backward_cpu(
    const at::Tensor& grad_update_in, const at::Tensor& grad_new_state_in, const at::Tensor& grad_in,
    const at::Tensor& state_in, at::TensorList weights, double preprocess_p, double output_scale, int64_t features,
    const std::optional<at::Tensor>& moments_in, int64_t output) {
  const PackedLayout layout =
      check_backward_args(grad_update_in, grad_new_state_in, grad_in, state_in, weights, features, preprocess_p,
                          output_scale, moments_in, output);
  const at::Tensor grad = grad_in.contiguous(), state = state_in.contiguous();
  const at::Tensor moments = contiguous_moments(moments_in);
  const at::Tensor grad_update = grad_update_in.contiguous(), grad_new_state = grad_new_state_in.contiguous();
  at::Tensor grad_grad = empty_output_like(grad), grad_state = empty_output_like(state);
  const at::Tensor packed = cpu_packed_weights(weights, layout);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "l2l_fast_lstm_step_backward_cpu", [&] {
    StepParams<scalar_t> params =
        make_params<scalar_t>(layout, packed, grad, state, preprocess_p, output_scale, output);
    params.moments = data_or_null<scalar_t>(moments);
    params.grad_update = grad_update.data_ptr<scalar_t>();
    params.grad_new_state = grad_new_state.data_ptr<scalar_t>();
    params.grad_grad = grad_grad.data_ptr<scalar_t>();
    params.grad_state = grad_state.data_ptr<scalar_t>();
    sums = run_backward(params);
  });
  return {grad_grad, grad_state, unpack_weight_grads(sums, weights, layout)};
}

void lstm_step_inplace_cpu(at::Tensor param, const at::Tensor& grad_in, at::Tensor state, at::TensorList weights,
                           double preprocess_p, double output_scale, int64_t features,
                           const std::optional<at::Tensor>& moments, int64_t output) {
  const PackedLayout layout =
      check_inplace_args(param, grad_in, state, weights, features, preprocess_p, output_scale, moments, output);
  const at::Tensor grad = grad_in.contiguous();
  // Non-contiguous param/state/moments: work on contiguous copies, then write them back.
  at::Tensor param_work = param.contiguous(), state_work = state.contiguous();
  at::Tensor moments_work = contiguous_moments(moments);
  const at::Tensor packed = cpu_packed_weights(weights, layout);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "l2l_fast_lstm_step_inplace_cpu", [&] {
    StepParams<scalar_t> params =
        make_params<scalar_t>(layout, packed, grad, state_work, preprocess_p, output_scale, output);
    params.moments = params.new_moments = moments_work.defined() ? moments_work.data_ptr<scalar_t>() : nullptr;
    params.new_state = state_work.data_ptr<scalar_t>();
    params.param = param_work.data_ptr<scalar_t>();
    run_forward(params);
  });
  if (!param_work.is_same(param)) param.copy_(param_work);
  if (!state_work.is_same(state)) state.copy_(state_work);
  if (moments_work.defined() && !moments_work.is_same(*moments)) moments->copy_(moments_work);
}

}  // namespace

TORCH_LIBRARY_IMPL(l2l_fast, CPU, m) {
  m.impl("lstm_step", &lstm_step_cpu);
  m.impl("lstm_step_backward", &lstm_step_backward_cpu);
  m.impl("lstm_step_", &lstm_step_inplace_cpu);
}

}  // namespace cpu
}  // namespace l2l_fast
