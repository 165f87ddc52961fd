// Argument checks and weight packing shared by the CPU and CUDA bindings of the ops: one validator
// per op (the contract; l2l_fast/checks.py is its Python mirror). Every message names the argument
// and what was expected.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "lstm_layout.h"
#include "packed_cache.h"

namespace l2l_fast {

inline void check_dense_real(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, name, ": sparse tensors are not supported (got layout ",
                   t.layout(), "); pass a dense tensor");
  TORCH_CHECK_TYPE(!t.is_complex(), name, ": complex tensors are not supported (got ", t.scalar_type(), ")");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   ": expected float32 or float64, got ", t.scalar_type());
}

// In the dtype and on the device of `like`, named like_name in the messages.
inline void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& like,
                       const std::string& like_name) {
  check_dense_real(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(),
                   " (the dtype of ", like_name, "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, ": expected a tensor on ", like.device(),
                    " (the device of ", like_name, "), got ", t.device());
}

// The ops' `features`: a nonzero mask of known feature bits (input_features.h).
inline uint32_t check_features(int64_t features) {
  TORCH_CHECK_VALUE(valid_features(features), "features: expected a nonzero mask of the known feature bits (",
                    feature_table(), "), got ", features);
  return uint32_t(features);
}

// Validates the weight list against torch.nn.LSTM(input_width(features), H, L) + Linear(H, 1), every
// tensor in the dtype and on the device of `like` (named like_name), and returns its layout.
inline PackedLayout check_weights(at::TensorList weights, const at::Tensor& like, const std::string& like_name,
                                  int64_t features) {
  const uint32_t mask = check_features(features);
  const int64_t count = int64_t(weights.size());
  TORCH_CHECK_VALUE(count >= 6 && (count - 2) % 4 == 0, "weights: expected 4 tensors per LSTM layer plus 2 for the ",
                    "output layer (6, 10, 14, ...), got ", count);
  for (int64_t j = 0; j < count; ++j) check_like(weights[j], "weights[" + std::to_string(j) + "]", like, like_name);
  const at::Tensor& out_w = weights[count - 2];
  TORCH_CHECK_VALUE(out_w.dim() == 2 && out_w.size(0) == 1 && out_w.size(1) >= 1,
                    "weights[-2] (out.weight): expected shape [1, hidden_size], got ", out_w.sizes());
  const PackedLayout layout = make_layout(int(out_w.size(1)), int((count - 2) / 4), mask);
  const int64_t H = layout.hidden;
  TORCH_CHECK_VALUE(weights[count - 1].sizes() == at::IntArrayRef({1}), "weights[-1] (out.bias): expected shape [1], got ",
                    weights[count - 1].sizes());
  for (int l = 0; l < layout.layers; ++l) {
    const std::vector<std::vector<int64_t>> expected = {{4 * H, layout.input_size(l)}, {4 * H, H}, {4 * H}, {4 * H}};
    const char* names[] = {"weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l"};
    for (int j = 0; j < 4; ++j) {
      const at::Tensor& w = weights[4 * l + j];
      const std::string because =
          l == 0 && j == 0 ? " and features=" + std::to_string(mask) + " (" + feature_names(mask) + ")" : "";
      TORCH_CHECK_VALUE(w.sizes() == at::IntArrayRef(expected[j]), "weights[", 4 * l + j, "] (", names[j], l,
                        "): expected shape ", at::IntArrayRef(expected[j]), " for hidden_size ", H, because, ", got ",
                        w.sizes());
    }
  }
  return layout;
}

inline void check_grad(const at::Tensor& grad, const std::string& name = "grad") {
  check_dense_real(grad, name);
  TORCH_CHECK_VALUE(grad.dim() == 1, name, ": expected a 1-D tensor of per-coordinate values, got shape ", grad.sizes());
}

inline void check_per_coordinate(const at::Tensor& t, const std::string& name, const at::Tensor& grad) {
  check_like(t, name, grad, "grad");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == grad.size(0), name, ": expected shape [", grad.size(0),
                    "] (one value per coordinate of grad), got ", t.sizes());
}

inline void check_state(const at::Tensor& state, const std::string& name, const PackedLayout& layout,
                        const at::Tensor& grad) {
  check_like(state, name, grad, "grad");
  const std::vector<int64_t> expected = {layout.layers, 2, layout.hidden, grad.size(0)};
  TORCH_CHECK_VALUE(state.sizes() == at::IntArrayRef(expected), name, ": expected shape ", at::IntArrayRef(expected),
                    " = [num_layers, 2, hidden_size, n] for these weights and ", grad.size(0),
                    " coordinates, got ", state.sizes(), " (a state made for another net or parameter?)");
}

// e^p and e^-p stay normal float32 numbers (FLT_MAX = e^88.7, FLT_MIN = e^-87.3).
constexpr double kMaxPreprocessP = 87.0;

// preprocess_p finite in (0, 87], output_scale finite (l2l_fast/checks.py's check_constants).
inline void check_constants(double preprocess_p, double output_scale) {
  TORCH_CHECK_VALUE(std::isfinite(preprocess_p) && preprocess_p > 0 && preprocess_p <= kMaxPreprocessP,
                    "preprocess_p: expected a finite number in (0, 87] (e^p and e^-p normal float32 numbers), got ",
                    preprocess_p);
  TORCH_CHECK_VALUE(std::isfinite(output_scale), "output_scale: expected a finite number, got ", output_scale);
}

// The ops' `output`: an OutputKind (lstm_layout.h).
inline void check_output(int64_t output) {
  TORCH_CHECK_VALUE(output >= 0 && output < kOutputKinds,
                    "output: expected 0 (update = scale * y, the paper's) or 1 (scale * tanh(y), bounded), got ", output);
}

// `moments` [4, n] in the math dtype `math` on `device`, given exactly when the features read them.
inline void check_moments(const std::optional<at::Tensor>& moments, const PackedLayout& layout, int64_t n,
                          at::ScalarType math, const at::Device& device) {
  const bool given = moments.has_value() && moments->defined();
  if (!reads_moments(layout.features)) {
    TORCH_CHECK_VALUE(!given, "moments: features=", layout.features, " (", feature_names(layout.features),
                      ") read no moments; pass None");
    return;
  }
  TORCH_CHECK_VALUE(given, "moments: features=", layout.features, " (", feature_names(layout.features),
                    ") read the running moments: pass a [", kMomentRows, ", ", n,
                    "] tensor (rows m, v, t, u; zeros to start)");
  const at::Tensor& t = *moments;
  check_dense_real(t, "moments");
  TORCH_CHECK_TYPE(t.scalar_type() == math, "moments: expected dtype ", math, " (the math dtype), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, "moments: expected a tensor on ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == kMomentRows && t.size(1) == n, "moments: expected shape [",
                    kMomentRows, ", ", n, "] (rows m, v, t, u; one column per coordinate), got ", t.sizes(),
                    " (moments made for another parameter?)");
}

// ------------------------------------------------------------------------------------------------
// One validator per op, run by the CPU and the CUDA bindings alike (l2l_fast/checks.py mirrors each for
// the fake kernels); each returns the weights' layout. Device limits (the CUDA kernels' largest hidden
// size) are the bindings' own, checked after these.

inline PackedLayout check_step_args(const at::Tensor& grad, const at::Tensor& state, at::TensorList weights,
                                    int64_t features, double preprocess_p = 10.0, double output_scale = 0.1,
                                    const std::optional<at::Tensor>& moments = std::nullopt, int64_t output = 0) {
  check_grad(grad);
  const PackedLayout layout = check_weights(weights, grad, "grad", features);
  check_state(state, "state", layout, grad);
  check_constants(preprocess_p, output_scale);
  check_moments(moments, layout, grad.size(0), grad.scalar_type(), grad.device());
  check_output(output);
  return layout;
}

inline PackedLayout check_backward_args(const at::Tensor& grad_update, const at::Tensor& grad_new_state,
                                        const at::Tensor& grad, const at::Tensor& state, at::TensorList weights,
                                        int64_t features, double preprocess_p = 10.0, double output_scale = 0.1,
                                        const std::optional<at::Tensor>& moments = std::nullopt, int64_t output = 0) {
  const PackedLayout layout =
      check_step_args(grad, state, weights, features, preprocess_p, output_scale, moments, output);
  check_per_coordinate(grad_update, "grad_update", grad);
  check_state(grad_new_state, "grad_new_state", layout, grad);
  return layout;
}

inline PackedLayout check_inplace_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state,
                                       at::TensorList weights, int64_t features, double preprocess_p = 10.0,
                                       double output_scale = 0.1,
                                       const std::optional<at::Tensor>& moments = std::nullopt, int64_t output = 0) {
  check_grad(grad);
  const PackedLayout layout = check_weights(weights, grad, "grad", features);
  check_per_coordinate(param, "param", grad);
  check_state(state, "state", layout, grad);
  check_constants(preprocess_p, output_scale);
  check_moments(moments, layout, grad.size(0), grad.scalar_type(), grad.device());
  if (moments.has_value() && moments->defined())
    TORCH_CHECK_VALUE(at::has_internal_overlap(*moments) != at::MemOverlap::Yes,
                      "moments: elements share memory (an expanded tensor?); an in-place step needs distinct elements");
  check_output(output);
  return layout;
}

inline bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// params[k] / grads[k] of the multi-tensor step: dense, real, floating point, 1-D, on the weights' device.
inline void check_listed(const at::Tensor& t, const std::string& name, const at::Device& device) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, name, ": sparse tensors are not supported (got layout ", t.layout(),
                   "); pass a dense tensor");
  TORCH_CHECK_TYPE(!t.is_complex(), name, ": complex tensors are not supported (got ", t.scalar_type(), ")");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected a tensor on ", device, " (the device of the weights), got ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, name, ": expected a 1-D tensor, got shape ", t.sizes());
}

// lstm_multi_step_: params[k], grads[k] [n_k]; state [L, 2, H, sum_k n_k]. params in the weights' dtype, or
// bfloat16 / float16 with float32 weights; grads[k] in params[k]'s dtype; state in the weights' dtype or
// bfloat16; everything on the weights' device.
inline PackedLayout check_multi_step_args(at::TensorList params, at::TensorList grads, const at::Tensor& state,
                                          at::TensorList weights, int64_t features, double preprocess_p = 10.0,
                                          double output_scale = 0.1,
                                          const std::optional<at::Tensor>& moments = std::nullopt,
                                          int64_t output = 0) {
  TORCH_CHECK_VALUE(!weights.empty(), "weights: expected 4 tensors per LSTM layer plus 2 for the output layer, got 0");
  check_dense_real(weights[0], "weights[0]");
  const at::ScalarType math = weights[0].scalar_type();
  const at::Device device = weights[0].device();
  for (size_t j = 1; j < weights.size(); ++j) {
    const std::string name = "weights[" + std::to_string(j) + "]";
    TORCH_CHECK_TYPE(weights[j].layout() == at::kStrided, name, ": sparse tensors are not supported (got layout ",
                     weights[j].layout(), "); pass a dense tensor");
    TORCH_CHECK_TYPE(!weights[j].is_complex(), name, ": complex tensors are not supported (got ",
                     weights[j].scalar_type(), ")");
    TORCH_CHECK_TYPE(weights[j].scalar_type() == math, name, ": expected dtype ", math,
                     " (the dtype of weights[0]), got ", weights[j].scalar_type());
    TORCH_CHECK_VALUE(weights[j].device() == device, name, ": expected a tensor on ", device,
                      " (the device of weights[0]), got ", weights[j].device());
  }
  const PackedLayout layout = check_weights(weights, weights[0], "weights[0]", features);
  TORCH_CHECK_VALUE(params.size() == grads.size(), "grads: expected one gradient per parameter (", params.size(),
                    "), got ", grads.size());
  int64_t total = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& param = params[k];
    const at::Tensor& grad = grads[k];
    const std::string index = "[" + std::to_string(k) + "]", pname = "params" + index, gname = "grads" + index;
    check_listed(param, pname, device);
    check_listed(grad, gname, device);
    const at::ScalarType type = param.scalar_type();
    TORCH_CHECK_TYPE(type == math || (math == at::kFloat && is_16bit(type)), pname, ": expected dtype ", math,
                     (math == at::kFloat ? " (the weights' dtype), bfloat16 or float16" : " (the weights' dtype)"),
                     ", got ", type);
    TORCH_CHECK_TYPE(grad.scalar_type() == type, gname, ": expected dtype ", type, " (the dtype of ", pname,
                     "), got ", grad.scalar_type());
    TORCH_CHECK_VALUE(grad.size(0) == param.size(0), gname, ": expected ", param.size(0), " elements (as many as ",
                      pname, "), got ", grad.size(0));
    TORCH_CHECK_VALUE(at::has_internal_overlap(param) != at::MemOverlap::Yes, pname,
                      ": elements share memory (an expanded tensor?); an in-place step needs distinct elements");
    total += param.size(0);
  }
  TORCH_CHECK_TYPE(state.layout() == at::kStrided, "state: sparse tensors are not supported (got layout ",
                   state.layout(), "); pass a dense tensor");
  TORCH_CHECK_TYPE(state.scalar_type() == math || state.scalar_type() == at::kBFloat16, "state: expected dtype ",
                   math, " (the weights' dtype) or bfloat16, got ", state.scalar_type());
  TORCH_CHECK_VALUE(state.device() == device, "state: expected a tensor on ", device,
                    " (the device of the weights), got ", state.device());
  const std::vector<int64_t> expected = {layout.layers, 2, layout.hidden, total};
  TORCH_CHECK_VALUE(state.sizes() == at::IntArrayRef(expected), "state: expected shape ", at::IntArrayRef(expected),
                    " = [num_layers, 2, hidden_size, sum of the params' numels], got ", state.sizes(),
                    " (a state made for another net or parameter list?)");
  check_constants(preprocess_p, output_scale);
  check_moments(moments, layout, total, math, device);
  if (moments.has_value() && moments->defined())
    TORCH_CHECK_VALUE(at::has_internal_overlap(*moments) != at::MemOverlap::Yes,
                      "moments: elements share memory (an expanded tensor?); an in-place step needs distinct elements");
  check_output(output);
  return layout;
}

// Packs the weights (any device) into the kernels' layout, on the weights' device: layout.size() values, then
// the poison flag (lstm_layout.h's weights_poison: 0 when every weight is finite, else NaN).
inline at::Tensor pack_weights(at::TensorList weights, const PackedLayout& layout) {
  const at::Tensor& like = weights[0];
  at::Tensor packed = at::empty({layout.size() + 1}, like.options().device(at::kCPU));
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
    bool finite = true;
    for (int64_t q = 0; q < layout.size(); ++q) finite = finite && std::isfinite(out[q]);
    out[layout.size()] = finite ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN();
  });
  return packed.to(like.device());
}

// pack_weights through the cache of weight versions (packed_cache.h), hits confirmed by the weights' bytes.
inline at::Tensor cpu_packed_weights(at::TensorList weights, const PackedLayout& layout) {
  return packed_weights(weights, layout, /*stream=*/0, /*use_cache=*/true, /*verify=*/true,
                        [&] { return pack_weights(weights, layout); });
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
