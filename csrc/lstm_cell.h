// Torch-free per-coordinate math of the LSTM cell, generic over the number type V (a scalar, a CPU
// vector of coordinates or a CUDA thread's registers) and over the activation functions `Act`
// (Act::sigmoid, Act::tanh), which each device implements its own way. The inputs of the first
// layer come from input_features.h.
#pragma once

#include "host_device.h"

namespace l2l_fast {

// LSTM cell for one unit: pre-activations z* -> gates, new cell c_new, tanh(c_new), new h.
template <typename Act, typename V>
L2L_HD void cell_forward(V zi, V zf, V zg, V zo, V c, V& i, V& f, V& g, V& o, V& c_new, V& tanh_c, V& h_new) {
  i = Act::sigmoid(zi);
  f = Act::sigmoid(zf);
  g = Act::tanh(zg);
  o = Act::sigmoid(zo);
  c_new = f * c + i * g;
  tanh_c = Act::tanh(c_new);
  h_new = o * tanh_c;
}

// Its backward from the saved gates: dh, dc (into the new h and c) -> d pre-activations, d old c.
template <typename V>
L2L_HD void cell_backward(V dh, V dc_new, V i, V f, V g, V o, V c, V tanh_c, V& dzi, V& dzf, V& dzg, V& dzo,
                          V& dc) {
  const V dcell = dc_new + dh * o * (1 - tanh_c * tanh_c);
  dzo = dh * tanh_c * o * (1 - o);
  dzi = dcell * g * i * (1 - i);
  dzg = dcell * i * (1 - g * g);
  dzf = dcell * c * f * (1 - f);
  dc = dcell * f;
}

}  // namespace l2l_fast
