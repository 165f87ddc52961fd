// The ops' schemas, declared once; each backend registers its kernels in its own file
// (cpu/lstm_step_cpu.cpp, cuda/*.cu).
#include <torch/library.h>

TORCH_LIBRARY(l2l_fast, m) {
  // grad [n], state [L, 2, H, n], weights as torch.nn.LSTM(2, H, L) + Linear(H, 1) -> update [n], new_state
  m.def("lstm_step(Tensor grad, Tensor state, Tensor[] weights, float preprocess_p, float output_scale)"
        " -> (Tensor, Tensor)");
  // -> d grad [n], d state [L, 2, H, n], d weights (one per weight tensor)
  m.def("lstm_step_backward(Tensor grad_update, Tensor grad_new_state, Tensor grad, Tensor state, Tensor[] weights,"
        " float preprocess_p, float output_scale) -> (Tensor, Tensor, Tensor[])");
  // in place, no autograd: param [n] += update; state advanced
  m.def("lstm_step_(Tensor(a!) param, Tensor grad, Tensor(b!) state, Tensor[] weights, float preprocess_p,"
        " float output_scale) -> ()");
}
