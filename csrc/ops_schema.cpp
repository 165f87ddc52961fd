// The ops' schemas, declared once; each backend registers its kernels in its own file
// (cpu/lstm_step_cpu.cpp, cpu/multi_step_cpu.cpp, cuda/lstm_step_cuda.cpp).
//
// `features` is the mask of the LSTM's input features (input_features.h, l2l_fast/features.py): the
// first layer's I = input_width(features) inputs; 1, the default, is the paper's preprocessing (I = 2).
// `moments` [4, n] (rows m, v, t, u; input_features.h) is required when the features read moments, else
// None: the functional ops take them already advanced with this step's gradient (data, no gradient), the
// in-place ops advance them in place. `output`: 0 update = scale * y (the paper's), 1 scale * tanh(y).
#include <torch/library.h>

TORCH_LIBRARY(l2l_fast, m) {
  // grad [n], state [L, 2, H, n], weights as torch.nn.LSTM(I, H, L) + Linear(H, 1) -> update [n], new_state
  m.def("lstm_step(Tensor grad, Tensor state, Tensor[] weights, float preprocess_p, float output_scale,"
        " int features=1, Tensor? moments=None, int output=0) -> (Tensor, Tensor)");
  // -> d grad [n], d state [L, 2, H, n], d weights (one per weight tensor)
  m.def("lstm_step_backward(Tensor grad_update, Tensor grad_new_state, Tensor grad, Tensor state, Tensor[] weights,"
        " float preprocess_p, float output_scale, int features=1, Tensor? moments=None, int output=0)"
        " -> (Tensor, Tensor, Tensor[])");
  // in place, no autograd: param [n] += update; state advanced
  m.def("lstm_step_(Tensor(a!) param, Tensor grad, Tensor(b!) state, Tensor[] weights, float preprocess_p,"
        " float output_scale, int features=1, Tensor(c!)? moments=None, int output=0) -> ()");
  // The optimizer's multi-tensor in-place step, no autograd. params[k] and grads[k] are 1-D, same numel n_k,
  // same device; params may be float32, float64, bfloat16 or float16 (math in the weights' dtype, float32
  // for the 16-bit ones); state [L, 2, H, sum_k n_k] (float32 / float64 = weights' dtype, or bfloat16) holds
  // tensor k's coordinates at [offset_k, offset_k + n_k), offsets in list order, and so do moments
  // [4, sum_k n_k] (in the weights' dtype). Same NaN/Inf policy.
  m.def("lstm_multi_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!) state, Tensor[] weights,"
        " float preprocess_p, float output_scale, int features=1, Tensor(c!)? moments=None, int output=0) -> ()");
}
