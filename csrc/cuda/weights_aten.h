// Weight packing for the CUDA kernels, with ATen ops on the weights' own device: no host round trip,
// so the ops stay asynchronous and can be captured in CUDA graphs (op_checks.h's pack_weights goes
// through the CPU). Same layout as lstm_layout.h's pack_layer / unpack_layer_grad.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <vector>

#include "lstm_layout.h"

namespace l2l_fast {
namespace cuda {

// weights (torch.nn.LSTM + Linear order, checked) -> packed [layout.size() + 1] on their device (the
// poison flag last).
inline at::Tensor pack_weights_on_device(at::TensorList weights, const PackedLayout& layout) {
  const int64_t H = layout.hidden;
  std::vector<at::Tensor> parts;
  for (int l = 0; l < layout.layers; ++l) {
    const at::Tensor w_ih = weights[4 * l].detach(), w_hh = weights[4 * l + 1].detach();
    const at::Tensor b_ih = weights[4 * l + 2].detach(), b_hh = weights[4 * l + 3].detach();
    const int64_t K = layout.k_size(l);
    // [4H, K] (row g H + u) -> [H][K][4]
    parts.push_back(at::cat({w_ih, w_hh}, 1).view({4, H, K}).permute({1, 2, 0}).reshape({-1}));
    parts.push_back((b_ih + b_hh).view({4, H}).t().reshape({-1}));
  }
  parts.push_back(weights[4 * layout.layers].detach().reshape({-1}));
  parts.push_back(weights[4 * layout.layers + 1].detach().reshape({-1}));
  // the poison flag (lstm_layout.h), decided on the device: no host synchronisation, capturable
  at::Tensor values = at::cat(parts);
  const at::Tensor nan = at::full({1}, std::numeric_limits<double>::quiet_NaN(), values.options());
  parts = {values, at::where(at::isfinite(values).all(), at::zeros({1}, values.options()), nan)};
  at::Tensor packed = at::cat(parts).contiguous();
  TORCH_INTERNAL_ASSERT(packed.numel() == layout.size() + 1);
  return packed;
}

// Packed float64 sums [layout.size()] -> one gradient per weight tensor, in each weight's dtype and
// on its device. Both biases of a layer get the gradient of their sum.
inline std::vector<at::Tensor> unpack_weight_grads_on_device(const at::Tensor& sums, at::TensorList weights,
                                                             const PackedLayout& layout) {
  const int64_t H = layout.hidden;
  const auto dtype = weights[0].scalar_type();
  std::vector<at::Tensor> grads;
  for (int l = 0; l < layout.layers; ++l) {
    const int64_t I = layout.input_size(l), K = layout.k_size(l);
    const at::Tensor w = sums.narrow(0, layout.layer_offset(l), H * K * 4).view({H, K, 4}).permute({2, 0, 1})
                             .reshape({4 * H, K}).to(dtype);
    const at::Tensor b = sums.narrow(0, layout.bias_offset(l), H * 4).view({H, 4}).t().reshape({4 * H});
    grads.push_back(w.narrow(1, 0, I).contiguous());
    grads.push_back(w.narrow(1, I, H).contiguous());
    grads.push_back(b.to(dtype, /*non_blocking=*/false, /*copy=*/true));  // fresh tensors: outputs never alias
    grads.push_back(b.to(dtype, /*non_blocking=*/false, /*copy=*/true));
  }
  grads.push_back(sums.narrow(0, layout.out_weight_offset(), H).view({1, H}).to(dtype, false, true));
  grads.push_back(sums.narrow(0, layout.out_bias_offset(), 1).to(dtype, false, true));
  return grads;
}

}  // namespace cuda
}  // namespace l2l_fast
