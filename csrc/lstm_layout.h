// Torch-free description of the fused step: the packed weight layout and the kernel parameters.
// Shared by the CPU and CUDA kernels (host and device).
#pragma once
#include <cstdint>

#include "host_device.h"
#include "input_features.h"

namespace l2l_fast {

// Weights packed for the kernels. For layer l with input size I_l (the features' width for layer 0,
// H above)
// and K_l = I_l + H inputs to the gates (the layer input, then its own h):
//   W_l [H][K_l][4]  the four gate rows (i, f, g, o) of unit u, adjacent so one unit's
//                    gates accumulate together and its cell update needs no gate buffer
//   B_l [H][4]       b_ih + b_hh (the LSTM only ever uses their sum)
// then the output layer: out_w [H], out_b [1].
struct PackedLayout {
  int hidden;
  int layers;
  uint32_t features;  // mask of the first layer's input features (input_features.h)
  int inputs;         // their count, input_width(features)

  L2L_HD int input_size(int l) const { return l == 0 ? inputs : hidden; }
  L2L_HD int k_size(int l) const { return input_size(l) + hidden; }
  L2L_HD int64_t layer_offset(int l) const {
    int64_t offset = 0;
    for (int j = 0; j < l; ++j) offset += int64_t(hidden) * (k_size(j) + 1) * 4;
    return offset;
  }
  L2L_HD int64_t bias_offset(int l) const { return layer_offset(l) + int64_t(hidden) * k_size(l) * 4; }
  L2L_HD int64_t out_weight_offset() const { return layer_offset(layers); }
  L2L_HD int64_t out_bias_offset() const { return out_weight_offset() + hidden; }
  L2L_HD int64_t size() const { return out_bias_offset() + 1; }
  // After the weights, the packed tensor holds the poison flag: 0 when every weight is finite, else NaN
  // (computed once per packed weight version; the kernels poison every finite-gradient coordinate with it).
  L2L_HD int64_t poison_offset() const { return size(); }
};

inline PackedLayout make_layout(int hidden, int layers, uint32_t features) {
  return PackedLayout{hidden, layers, features, input_width(features)};
}

// State is one tensor [L][2][H][n]: row (l, 0, u) is h of unit u of layer l, row (l, 1, u) its c,
// each row n contiguous coordinates.
L2L_HD int64_t state_row(const PackedLayout& layout, int l, int which, int u) {
  return (int64_t(l) * 2 + which) * layout.hidden + u;
}

// How the output layer's value y becomes the update (the ops' `output`): kLinearOutput, scale * y (the
// paper's), or kTanhOutput, scale * tanh(y): bounded, no step larger than |scale|.
enum OutputKind : int32_t { kLinearOutput = 0, kTanhOutput = 1 };
constexpr int kOutputKinds = 2;

// What every kernel of a call needs of the network, on any device: the CPU kernels' StepParams and
// the CUDA kernels' launch arguments (cuda/kernel_args.h) hold one.
template <typename T>
struct NetConstants {
  PackedLayout layout;
  FeatureConstants<T> features;  // the constants of the input features (preprocess_p, e^-p, e^p)
  T output_scale;
  int32_t output;    // OutputKind
  const T* weights;  // packed, layout.size() + 1 (the poison flag last), on the kernels' device
};

// The constants of a call in the arithmetic type T, computed on the host once for every device.
template <typename T>
inline NetConstants<T> make_net_constants(const PackedLayout& layout, double preprocess_p, double output_scale,
                                          const T* packed, int64_t output = kLinearOutput) {
  NetConstants<T> net;
  net.layout = layout;
  net.features = make_feature_constants<T>(preprocess_p);
  net.output_scale = T(output_scale);
  net.output = int32_t(output);
  net.weights = packed;
  return net;
}

// The CPU kernels' arguments. Forward/step use the first block; backward also the second.
// Every per-coordinate array is contiguous; new_state may alias state (in-place step).
template <typename T>
struct StepParams {
  NetConstants<T> net;
  int64_t n = 0;
  const T* grad = nullptr;     // [n]
  const T* state = nullptr;    // [L][2][H][n]
  T* new_state = nullptr;      // [L][2][H][n] or null
  T* update = nullptr;         // [n] or null
  T* param = nullptr;          // [n] or null: param += update
  // [4][n] (input_features.h) when the features read moments, else null. With new_moments null (the
  // functional ops) they are this step's, used as they are; else the kernel advances them and writes
  // new_moments (the in-place ops: the same array).
  const T* moments = nullptr;
  T* new_moments = nullptr;
  int64_t moments_stride = 0;  // row r of the moments at moments + r * moments_stride

  const T* grad_update = nullptr;     // [n]
  const T* grad_new_state = nullptr;  // [L][2][H][n]
  T* grad_grad = nullptr;             // [n]
  T* grad_state = nullptr;            // [L][2][H][n]
};

// Packs one layer of torch.nn.LSTM weights (contiguous, row-major) into `packed`.
template <typename T>
void pack_layer(const PackedLayout& layout, int l, const T* w_ih, const T* w_hh, const T* b_ih, const T* b_hh,
                T* packed) {
  const int H = layout.hidden, I = layout.input_size(l), K = layout.k_size(l);
  T* w = packed + layout.layer_offset(l);
  T* b = packed + layout.bias_offset(l);
  for (int u = 0; u < H; ++u) {
    for (int g = 0; g < 4; ++g) {
      const int row = g * H + u;
      for (int k = 0; k < I; ++k) w[(int64_t(u) * K + k) * 4 + g] = w_ih[int64_t(row) * I + k];
      for (int k = 0; k < H; ++k) w[(int64_t(u) * K + I + k) * 4 + g] = w_hh[int64_t(row) * H + k];
      b[u * 4 + g] = b_ih[row] + b_hh[row];
    }
  }
}

// The inverse for gradients: both biases receive the gradient of their sum.
template <typename T, typename Acc>
void unpack_layer_grad(const PackedLayout& layout, int l, const Acc* packed, T* dw_ih, T* dw_hh, T* db_ih,
                       T* db_hh) {
  const int H = layout.hidden, I = layout.input_size(l), K = layout.k_size(l);
  const Acc* w = packed + layout.layer_offset(l);
  const Acc* b = packed + layout.bias_offset(l);
  for (int u = 0; u < H; ++u) {
    for (int g = 0; g < 4; ++g) {
      const int row = g * H + u;
      for (int k = 0; k < I; ++k) dw_ih[int64_t(row) * I + k] = T(w[(int64_t(u) * K + k) * 4 + g]);
      for (int k = 0; k < H; ++k) dw_hh[int64_t(row) * H + k] = T(w[(int64_t(u) * K + I + k) * 4 + g]);
      db_ih[row] = db_hh[row] = T(b[u * 4 + g]);
    }
  }
}

}  // namespace l2l_fast
