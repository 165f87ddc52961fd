// Torch-free per-coordinate math of the step, generic over the number type V (a scalar, a CPU
// vector of coordinates or a CUDA thread's registers) and over the activation functions `Act`
// (Act::sigmoid, Act::tanh), which each device implements its own way.
#pragma once
#include <cmath>

#include "lstm_layout.h"

namespace l2l_fast {

L2L_HD float log_of(float x) { return logf(x); }
L2L_HD double log_of(double x) { return log(x); }

// Appendix A of the paper: |g| >= e^-p -> (log|g| / p, sign g); else (-1, e^p g).
// exp_minus_p = e^-p and exp_p = e^p are precomputed by the caller.
template <typename T>
L2L_HD void preprocess(T g, T p, T exp_minus_p, T exp_p, T& x0, T& x1) {
  const T magnitude = g < 0 ? -g : g;
  if (magnitude >= exp_minus_p) {
    x0 = log_of(magnitude) / p;
    x1 = g > 0 ? T(1) : T(-1);
  } else {
    x0 = T(-1);
    x1 = exp_p * g;
  }
}

// d loss / d g from d loss / d x; the sign has zero derivative away from 0.
template <typename T>
L2L_HD T preprocess_backward(T g, T dx0, T dx1, T p, T exp_minus_p, T exp_p) {
  const T magnitude = g < 0 ? -g : g;
  return magnitude >= exp_minus_p ? dx0 / (p * g) : dx1 * exp_p;
}

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
