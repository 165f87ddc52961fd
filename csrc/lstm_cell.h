// Torch-free per-coordinate math of the step, generic over the number type V (a scalar, a CPU
// vector of coordinates or a CUDA thread's registers) and over the activation functions `Act`
// (Act::sigmoid, Act::tanh), which each device implements its own way.
#pragma once
#include <cmath>

#include "lstm_layout.h"

namespace l2l_fast {

L2L_HD float log_of(float x) { return logf(x); }
L2L_HD double log_of(double x) { return log(x); }

// Elementwise helpers of a scalar number type; the CPU kernels bring their own for vectors.
template <typename T>
struct ScalarMath {
  typedef bool Mask;
  L2L_HD static T splat(T x) { return x; }
  L2L_HD static T abs(T x) { return x < 0 ? -x : x; }
  L2L_HD static T select(bool m, T a, T b) { return m ? a : b; }
  L2L_HD static T log(T x) { return log_of(x); }
  L2L_HD static T sign(T x) { return x > 0 ? T(1) : (x < 0 ? T(-1) : T(0)); }
};

// Appendix A of the paper: |g| >= e^-p -> (log|g| / p, sign g); else (-1, e^p g).
// exp_minus_p = e^-p and exp_p = e^p are precomputed by the caller. V is T or a vector of T.
template <typename Math, typename V, typename T>
L2L_HD void preprocess(V g, T p, T exp_minus_p, T exp_p, V& x0, V& x1) {
  const V magnitude = Math::abs(g);
  const auto big = magnitude >= exp_minus_p;
  x0 = Math::select(big, Math::log(magnitude) / p, Math::splat(T(-1)));
  x1 = Math::select(big, Math::sign(g), g * exp_p);
}

// d loss / d g from d loss / d x; the sign has zero derivative away from 0.
template <typename Math, typename V, typename T>
L2L_HD V preprocess_backward(V g, V dx0, V dx1, T p, T exp_minus_p, T exp_p) {
  return Math::select(Math::abs(g) >= exp_minus_p, dx0 / (g * p), dx1 * exp_p);
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
