// Argument checks and weight packing shared by the CPU and CUDA bindings of the ops.
// Every message names the argument and what was expected.
#pragma once
#include <torch/types.h>

#include <string>

#include "lstm_layout.h"

namespace l2l_fast {

inline void check_dense_real(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, name, ": sparse tensors are not supported (got layout ",
                   t.layout(), "); pass a dense tensor");
  TORCH_CHECK_TYPE(!t.is_complex(), name, ": complex tensors are not supported (got ", t.scalar_type(), ")");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   ": expected float32 or float64, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& like) {
  check_dense_real(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(),
                   " (the dtype of grad), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected a tensor on ", like.device(),
                    " (the device of grad), got ", t.device());
}

// Validates the weight list against torch.nn.LSTM(2, H, L) + Linear(H, 1) and returns its layout.
inline PackedLayout check_weights(at::TensorList weights, const at::Tensor& grad) {
  const int64_t count = int64_t(weights.size());
  TORCH_CHECK_VALUE(count >= 6 && (count - 2) % 4 == 0, "weights: expected 4 tensors per LSTM layer plus 2 for the ",
                    "output layer (6, 10, 14, ...), got ", count);
  for (int64_t j = 0; j < count; ++j) check_like(weights[j], "weights[" + std::to_string(j) + "]", grad);
  const at::Tensor& out_w = weights[count - 2];
  TORCH_CHECK_VALUE(out_w.dim() == 2 && out_w.size(0) == 1 && out_w.size(1) >= 1,
                    "weights[-2] (out.weight): expected shape [1, hidden_size], got ", out_w.sizes());
  PackedLayout layout{int(out_w.size(1)), int((count - 2) / 4)};
  const int64_t H = layout.hidden;
  TORCH_CHECK_VALUE(weights[count - 1].sizes() == at::IntArrayRef({1}), "weights[-1] (out.bias): expected shape [1], got ",
                    weights[count - 1].sizes());
  for (int l = 0; l < layout.layers; ++l) {
    const std::vector<std::vector<int64_t>> expected = {{4 * H, layout.input_size(l)}, {4 * H, H}, {4 * H}, {4 * H}};
    const char* names[] = {"weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l"};
    for (int j = 0; j < 4; ++j) {
      const at::Tensor& w = weights[4 * l + j];
      TORCH_CHECK_VALUE(w.sizes() == at::IntArrayRef(expected[j]), "weights[", 4 * l + j, "] (", names[j], l,
                        "): expected shape ", at::IntArrayRef(expected[j]), " for hidden_size ", H, ", got ", w.sizes());
    }
  }
  return layout;
}

inline void check_grad(const at::Tensor& grad, const std::string& name = "grad") {
  check_dense_real(grad, name);
  TORCH_CHECK_VALUE(grad.dim() == 1, name, ": expected a 1-D tensor of per-coordinate values, got shape ", grad.sizes());
}

inline void check_per_coordinate(const at::Tensor& t, const std::string& name, const at::Tensor& grad) {
  check_like(t, name, grad);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == grad.size(0), name, ": expected shape [", grad.size(0),
                    "] (one value per coordinate of grad), got ", t.sizes());
}

inline void check_state(const at::Tensor& state, const std::string& name, const PackedLayout& layout,
                        const at::Tensor& grad) {
  check_like(state, name, grad);
  const std::vector<int64_t> expected = {layout.layers, 2, layout.hidden, grad.size(0)};
  TORCH_CHECK_VALUE(state.sizes() == at::IntArrayRef(expected), name, ": expected shape ", at::IntArrayRef(expected),
                    " = [num_layers, 2, hidden_size, n] for these weights and ", grad.size(0),
                    " coordinates, got ", state.sizes(), " (a state made for another net or parameter?)");
}

// The arguments of each op, checked in one order by every backend; each returns the weights' layout.
inline PackedLayout check_step_args(const at::Tensor& grad, const at::Tensor& state, at::TensorList weights) {
  check_grad(grad);
  const PackedLayout layout = check_weights(weights, grad);
  check_state(state, "state", layout, grad);
  return layout;
}

inline PackedLayout check_backward_args(const at::Tensor& grad_update, const at::Tensor& grad_new_state,
                                        const at::Tensor& grad, const at::Tensor& state, at::TensorList weights) {
  const PackedLayout layout = check_step_args(grad, state, weights);
  check_per_coordinate(grad_update, "grad_update", grad);
  check_state(grad_new_state, "grad_new_state", layout, grad);
  return layout;
}

inline PackedLayout check_inplace_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state,
                                       at::TensorList weights) {
  check_grad(grad);
  const PackedLayout layout = check_weights(weights, grad);
  check_per_coordinate(param, "param", grad);
  check_state(state, "state", layout, grad);
  return layout;
}

// Packs the weights (any device) into the kernels' layout, on the weights' device.
inline at::Tensor pack_weights(at::TensorList weights, const PackedLayout& layout) {
  const at::Tensor& like = weights[0];
  at::Tensor packed = at::empty({layout.size()}, like.options().device(at::kCPU));
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "l2l_fast_pack_weights", [&] {
    scalar_t* out = packed.data_ptr<scalar_t>();
    for (int l = 0; l < layout.layers; ++l) {
      at::Tensor parts[4];
      for (int j = 0; j < 4; ++j) parts[j] = weights[4 * l + j].detach().to(at::kCPU).contiguous();
      pack_layer<scalar_t>(layout, l, parts[0].data_ptr<scalar_t>(), parts[1].data_ptr<scalar_t>(),
                           parts[2].data_ptr<scalar_t>(), parts[3].data_ptr<scalar_t>(), out);
    }
    at::Tensor out_w = weights[4 * layout.layers].detach().to(at::kCPU).contiguous();
    at::Tensor out_b = weights[4 * layout.layers + 1].detach().to(at::kCPU);
    std::copy(out_w.data_ptr<scalar_t>(), out_w.data_ptr<scalar_t>() + layout.hidden, out + layout.out_weight_offset());
    out[layout.out_bias_offset()] = out_b.item<scalar_t>();
  });
  return packed.to(like.device());
}

// The inverse for gradients: packed float64 sums [layout.size()] -> one gradient per weight tensor.
inline std::vector<at::Tensor> unpack_weight_grads(const at::Tensor& packed_sums, at::TensorList weights,
                                                   const PackedLayout& layout) {
  at::Tensor sums = packed_sums.to(at::kCPU, at::kDouble).contiguous();
  const double* from = sums.data_ptr<double>();
  std::vector<at::Tensor> grads;
  for (const at::Tensor& w : weights) grads.push_back(at::empty(w.sizes(), w.options().device(at::kCPU)));
  AT_DISPATCH_FLOATING_TYPES(weights[0].scalar_type(), "l2l_fast_unpack_weight_grads", [&] {
    for (int l = 0; l < layout.layers; ++l)
      unpack_layer_grad<scalar_t, double>(layout, l, from, grads[4 * l].data_ptr<scalar_t>(),
                                          grads[4 * l + 1].data_ptr<scalar_t>(), grads[4 * l + 2].data_ptr<scalar_t>(),
                                          grads[4 * l + 3].data_ptr<scalar_t>());
    scalar_t* out_w = grads[4 * layout.layers].data_ptr<scalar_t>();
    for (int u = 0; u < layout.hidden; ++u) out_w[u] = scalar_t(from[layout.out_weight_offset() + u]);
    grads[4 * layout.layers + 1].data_ptr<scalar_t>()[0] = scalar_t(from[layout.out_bias_offset()]);
  });
  for (size_t j = 0; j < grads.size(); ++j) grads[j] = grads[j].to(weights[j].device());
  return grads;
}

}  // namespace l2l_fast
