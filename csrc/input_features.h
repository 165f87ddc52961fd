// The LSTM's input features: what its first layer sees of a coordinate.
//
// Each feature is one bit of a mask and contributes kWidth inputs; the first layer's inputs are the
// features of the mask in bit order, so weight_ih_l0 is [4H, input_width(mask)]. Every op takes
// the mask (`features`, default 1: the paper's preprocessing). Torch-free and generic over the
// number type V (a scalar, a CPU vector of coordinates, a CUDA thread's registers) and over Math,
// the elementwise helpers of V (ScalarMath below; the CPU kernels' VecMath in cpu/vec_math.inc).
// l2l_fast/features.py mirrors the table (names, bits, widths) with the reference functions the
// kernels are tested against; tests/test_features.py checks the two tables agree.
//
// Adding a feature computed from what the ops receive: a struct like PaperFeature below, appended
// to Features, and its entry in l2l_fast/features.py (with a new Math helper, if it needs one, in
// ScalarMath and VecMath). Features may read the running moments (kReadsMoments; CoordinateInputs' m, v,
// t, u), which the ops take as one optional [4, n] tensor.
#pragma once
#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "host_device.h"

namespace l2l_fast {

L2L_HD float log_of(float x) { return logf(x); }
L2L_HD double log_of(double x) { return log(x); }
L2L_HD float exp_of(float x) { return expf(x); }
L2L_HD double exp_of(double x) { return exp(x); }
L2L_HD float sqrt_of(float x) { return sqrtf(x); }
L2L_HD double sqrt_of(double x) { return sqrt(x); }

// Elementwise helpers of a scalar number type; the CPU kernels bring their own for vectors.
template <typename T>
struct ScalarMath {
  typedef bool Mask;
  L2L_HD static T splat(T x) { return x; }
  L2L_HD static T abs(T x) { return x < 0 ? -x : x; }
  L2L_HD static T select(bool m, T a, T b) { return m ? a : b; }
  L2L_HD static T log(T x) { return log_of(x); }
  L2L_HD static T sign(T x) { return x > 0 ? T(1) : (x < 0 ? T(-1) : T(0)); }
  L2L_HD static T exp(T x) { return exp_of(x); }
  L2L_HD static T sqrt(T x) { return sqrt_of(x); }
  L2L_HD static T max(T a, T b) { return a > b ? a : b; }
};

// Per-coordinate running moments, kept by the optimizer for the features that read them (kReadsMoments):
// one tensor [4, n] in the math dtype, row 0 m (moving average of g), row 1 v (of g^2), row 2 t (the
// steps taken, for the bias corrections), row 3 u (a long moving average of g^2); 4 values per
// coordinate (16 bytes in float32). Zeros to start. The in-place ops advance them (advance_moments)
// before computing the features; the functional ops (lstm_step and its backward) receive them already
// advanced and treat them as data (no gradient). Decays of m and v are RNNprop's (Lv et al. 2017), u's
// Adam's (Kingma & Ba 2015): its ~1,000-step memory tells how far the gradient has fallen, which v's
// ~20 steps forget. Constants of every net that reads moments. (Files of optimizer state written
// before u existed hold [3, n]: l2l_fast.features.upgrade_moments appends u.)
constexpr int kMomentRows = 4;
constexpr double kMomentBeta1 = 0.95;      // m
constexpr double kMomentBeta2 = 0.95;      // v
constexpr double kMomentBetaLong = 0.999;  // u
constexpr double kMomentEps = 1e-8;        // g / (sqrt(v_hat) + eps)

// What an op receives for one coordinate. The kernels pass finite values only: a coordinate whose
// gradient is NaN or +-Inf is masked before its features are computed (it keeps its state and moments).
// m, v, t, u are zero unless the features read moments.
template <typename V>
struct CoordinateInputs {
  V grad;  // the optimizee's gradient
  V m;     // the moments, advanced with this step's gradient
  V v;
  V t;
  V u;
};

// d loss / d inputs is shaped like the inputs; features add their parts.
template <typename V>
L2L_HD CoordinateInputs<V> operator+(const CoordinateInputs<V>& a, const CoordinateInputs<V>& b) {
  return CoordinateInputs<V>{a.grad + b.grad, a.m + b.m, a.v + b.v, a.t + b.t, a.u + b.u};
}

// Constants of a call, in the arithmetic type T, computed once on the host.
template <typename T>
struct FeatureConstants {
  T preprocess_p;  // p of the paper's preprocessing
  T exp_minus_p;   // e^-p
  T exp_p;         // e^p
  T beta1, beta2, beta_long;              // the moments' decays
  T log_beta1, log_beta2, log_beta_long;  // their logs: the bias corrections 1 - beta^t = 1 - e^(t log beta)
  T eps;
};

template <typename T>
inline FeatureConstants<T> make_feature_constants(double preprocess_p) {
  FeatureConstants<T> c;
  c.preprocess_p = T(preprocess_p);
  c.exp_minus_p = std::exp(-c.preprocess_p);  // in T, as the kernels have always computed them
  c.exp_p = std::exp(c.preprocess_p);
  c.beta1 = T(kMomentBeta1);
  c.beta2 = T(kMomentBeta2);
  c.beta_long = T(kMomentBetaLong);
  c.log_beta1 = T(std::log(kMomentBeta1));
  c.log_beta2 = T(std::log(kMomentBeta2));
  c.log_beta_long = T(std::log(kMomentBetaLong));
  c.eps = T(kMomentEps);
  return c;
}

// The moments after a step with gradient in.grad (finite): m, v moving averages, t + 1. The caller keeps
// the old moments of a coordinate whose gradient is not finite.
template <typename Math, typename V, typename T>
L2L_HD void advance_moments(CoordinateInputs<V>& in, const FeatureConstants<T>& c) {
  in.m = c.beta1 * in.m + (T(1) - c.beta1) * in.grad;
  in.v = c.beta2 * in.v + (T(1) - c.beta2) * (in.grad * in.grad);
  in.t = in.t + T(1);
  in.u = c.beta_long * in.u + (T(1) - c.beta_long) * (in.grad * in.grad);
}

// Appendix A of the paper: |g| >= e^-p -> (log|g| / p, sign g); else (-1, e^p g).
struct PaperFeature {
  static constexpr uint32_t kBit = 1u << 0;
  static constexpr int kWidth = 2;
  static constexpr const char* kName = "paper";
  static constexpr bool kReadsMoments = false;

  template <typename Math, typename V, typename T>
  L2L_HD static void forward(const CoordinateInputs<V>& in, const FeatureConstants<T>& c, V* x) {
    const V magnitude = Math::abs(in.grad);
    const auto big = magnitude >= c.exp_minus_p;
    x[0] = Math::select(big, Math::log(magnitude) / c.preprocess_p, Math::splat(T(-1)));
    x[1] = Math::select(big, Math::sign(in.grad), in.grad * c.exp_p);
  }

  // The sign has zero derivative away from 0.
  template <typename Math, typename V, typename T>
  L2L_HD static CoordinateInputs<V> backward(const CoordinateInputs<V>& in, const FeatureConstants<T>& c,
                                             const V* dx) {
    const V g = in.grad;
    CoordinateInputs<V> d{};
    d.grad = Math::select(Math::abs(g) >= c.exp_minus_p, dx[0] / (g * c.preprocess_p), dx[1] * c.exp_p);
    return d;
  }
};

// The bias correction 1 - beta^t = 1 - e^x, x = max(t, 1) log beta <= 0, to a few ulp relative. 1 - e^x cancels
// for small |x|: at t = 1 it multiplies e^x's error by beta / (1 - beta), 19 for 0.95 but 999 for 0.999 (1e-4
// relative in float32). For |x| < 1/4 it is -x (1 + x/2 (1 + x/3 (1 + ...))), the Taylor series, to
// |x|^(K+1) / (K+2)! < 1e-10 (float, K = 7) or 1e-17 (double, K = 12); beyond, the cancellation is at most 4.5x.
template <typename Math, typename V, typename T>
L2L_HD V bias_correction(V t, T log_beta) {
  const V x = Math::max(t, Math::splat(T(1))) * log_beta;
  constexpr int kTerms = sizeof(T) == sizeof(float) ? 7 : 12;
  V series = Math::splat(T(1));
  for (int j = kTerms + 1; j >= 2; --j) series = T(1) + x * T(1.0 / j) * series;
  return Math::select(x > T(-0.25), -x * series, T(1) - Math::exp(x));
}

// The bias-corrected momentum m_hat = m / (1 - beta1^t); t below 1 counts as 1.
template <typename Math, typename V, typename T>
L2L_HD V corrected_momentum(const CoordinateInputs<V>& in, const FeatureConstants<T>& c) {
  return in.m / bias_correction<Math>(in.t, c.log_beta1);
}

// 1 / (sqrt(second_hat) + eps), second_hat = second / (1 - beta^t) with log_beta = log beta; t below 1 counts as 1.
template <typename Math, typename V, typename T>
L2L_HD V inverse_scale_of(V second, V t, T log_beta, const FeatureConstants<T>& c) {
  const V hat = second / bias_correction<Math>(t, log_beta);
  return T(1) / (Math::sqrt(hat) + c.eps);
}

// Scale-free inputs over a second moment s (Lv et al. 2017): (g, m_hat) / (sqrt(s_hat) + eps), s_hat = s / (1 -
// beta^t), m_hat = m / (1 - beta1^t), from the moments advanced with this g. The moments are data: only
// g / (sqrt(s_hat) + eps) has a derivative, in g. Moment (CRTP) names s: second(in) and its log_beta(c).
template <class Moment>
struct ScaleFreeInputs {
  template <typename Math, typename V, typename T>
  L2L_HD static V inverse_scale(const CoordinateInputs<V>& in, const FeatureConstants<T>& c) {
    return inverse_scale_of<Math>(Moment::second(in), in.t, Moment::log_beta(c), c);
  }

  template <typename Math, typename V, typename T>
  L2L_HD static void forward(const CoordinateInputs<V>& in, const FeatureConstants<T>& c, V* x) {
    const V inv = inverse_scale<Math>(in, c);
    x[0] = in.grad * inv;
    x[1] = corrected_momentum<Math>(in, c) * inv;
  }

  template <typename Math, typename V, typename T>
  L2L_HD static CoordinateInputs<V> backward(const CoordinateInputs<V>& in, const FeatureConstants<T>& c,
                                             const V* dx) {
    CoordinateInputs<V> d{};
    d.grad = dx[0] * inverse_scale<Math>(in, c);
    return d;
  }
};

// RNNprop's: over v (decay 0.95).
struct MomentFeature : ScaleFreeInputs<MomentFeature> {
  static constexpr uint32_t kBit = 1u << 1;
  static constexpr int kWidth = 2;
  static constexpr const char* kName = "moments";
  static constexpr bool kReadsMoments = true;

  template <typename V>
  L2L_HD static V second(const CoordinateInputs<V>& in) { return in.v; }
  template <typename T>
  L2L_HD static T log_beta(const FeatureConstants<T>& c) { return c.log_beta2; }
};

// The same over Adam's long second moment u (decay 0.999). Near an optimum the gradient falls below its long
// average, so these inputs shrink where RNNprop's stay O(1): what a net needs to take steps that shrink too.
struct LongMomentFeature : ScaleFreeInputs<LongMomentFeature> {
  static constexpr uint32_t kBit = 1u << 2;
  static constexpr int kWidth = 2;
  static constexpr const char* kName = "long_moments";
  static constexpr bool kReadsMoments = true;

  template <typename V>
  L2L_HD static V second(const CoordinateInputs<V>& in) { return in.u; }
  template <typename T>
  L2L_HD static T log_beta(const FeatureConstants<T>& c) { return c.log_beta_long; }
};

// Every feature, in bit order (the first has bit 1 << 0, the next 1 << 1, ...).
template <typename... F>
struct FeatureList {};
using Features = FeatureList<PaperFeature, MomentFeature, LongMomentFeature>;

// The paper's set: the default of every op, net and file saved without a feature mask.
constexpr uint32_t kDefaultFeatures = PaperFeature::kBit;

template <typename... F>
L2L_HD constexpr uint32_t bits_of(FeatureList<F...>) { return (0u | ... | F::kBit); }
template <typename... F>
L2L_HD constexpr int width_of(FeatureList<F...>, uint32_t mask) {
  return (0 + ... + ((mask & F::kBit) != 0 ? F::kWidth : 0));
}
template <typename... F>
constexpr int count_of(FeatureList<F...>) { return int(sizeof...(F)); }
template <typename... F>
L2L_HD constexpr uint32_t moment_bits_of(FeatureList<F...>) { return (0u | ... | (F::kReadsMoments ? F::kBit : 0u)); }

constexpr uint32_t kAllFeatures = bits_of(Features{});
constexpr int kFeatureCount = count_of(Features{});
static_assert(kAllFeatures == (1u << kFeatureCount) - 1, "feature bits are 1 << 0, 1 << 1, ... in list order");

// The features that read the moments: a mask with any of them needs the [4, n] moments tensor.
constexpr uint32_t kMomentFeatures = moment_bits_of(Features{});
L2L_HD constexpr bool reads_moments(uint32_t mask) { return (mask & kMomentFeatures) != 0; }

// Inputs of the first layer for `mask`.
L2L_HD constexpr int input_width(uint32_t mask) { return width_of(Features{}, mask); }

// Most inputs any mask gives: the size of per-coordinate feature arrays.
constexpr int kMaxFeatureInputs = input_width(kAllFeatures);

// A mask the kernels run: at least one feature, no unknown bit.
constexpr bool valid_features(int64_t mask) { return mask > 0 && (uint64_t(mask) & ~uint64_t(kAllFeatures)) == 0; }

template <typename Math, typename V, typename T>
L2L_HD void compute_each(FeatureList<>, uint32_t, const CoordinateInputs<V>&, const FeatureConstants<T>&, V*) {}

template <typename Math, typename V, typename T, typename F, typename... Rest>
L2L_HD void compute_each(FeatureList<F, Rest...>, uint32_t mask, const CoordinateInputs<V>& in,
                         const FeatureConstants<T>& c, V* x) {
  if (mask & F::kBit) {
    F::template forward<Math>(in, c, x);
    x += F::kWidth;
  }
  compute_each<Math>(FeatureList<Rest...>{}, mask, in, c, x);
}

// x[0 .. input_width(mask)) = the features of one coordinate, in bit order. With a compile-time
// mask (the CUDA kernels' fixed sizes) the branches and offsets fold away and x stays in registers.
template <typename Math, typename V, typename T>
L2L_HD void compute_features(uint32_t mask, const CoordinateInputs<V>& in, const FeatureConstants<T>& c, V* x) {
  compute_each<Math>(Features{}, mask, in, c, x);
}

template <typename Math, typename V, typename T>
L2L_HD void backward_each(FeatureList<>, uint32_t, const CoordinateInputs<V>&, const FeatureConstants<T>&,
                          const V*, CoordinateInputs<V>&, bool&) {}

template <typename Math, typename V, typename T, typename F, typename... Rest>
L2L_HD void backward_each(FeatureList<F, Rest...>, uint32_t mask, const CoordinateInputs<V>& in,
                          const FeatureConstants<T>& c, const V* dx, CoordinateInputs<V>& d, bool& any) {
  if (mask & F::kBit) {
    const CoordinateInputs<V> part = F::template backward<Math>(in, c, dx);
    // the first part as it is: 0 + (-0) would turn a -0 into +0
    if (any) d = d + part; else d = part;
    any = true;
    dx += F::kWidth;
  }
  backward_each<Math>(FeatureList<Rest...>{}, mask, in, c, dx, d, any);
}

// d loss / d inputs of one coordinate from dx[0 .. input_width(mask)) = d loss / d features.
template <typename Math, typename V, typename T>
L2L_HD CoordinateInputs<V> features_backward(uint32_t mask, const CoordinateInputs<V>& in,
                                             const FeatureConstants<T>& c, const V* dx) {
  CoordinateInputs<V> d{Math::splat(T(0)), Math::splat(T(0)), Math::splat(T(0)), Math::splat(T(0)),
                        Math::splat(T(0))};
  bool any = false;
  backward_each<Math>(Features{}, mask, in, c, dx, d, any);
  return d;
}

// The table for the host: validation, messages, l2l_fast._C.feature_table().
struct FeatureInfo {
  uint32_t bit;
  int width;
  const char* name;
  bool reads_moments;
};

template <typename... F>
constexpr std::array<FeatureInfo, sizeof...(F)> table_of(FeatureList<F...>) {
  return {{FeatureInfo{F::kBit, F::kWidth, F::kName, F::kReadsMoments}...}};
}

constexpr std::array<FeatureInfo, kFeatureCount> kFeatureTable = table_of(Features{});

// "paper+raw": the names of a mask's features.
inline std::string feature_names(uint32_t mask) {
  std::string names;
  for (const FeatureInfo& f : kFeatureTable)
    if (mask & f.bit) names += (names.empty() ? "" : "+") + std::string(f.name);
  return names;
}

// "paper = 1 (2 inputs), raw = 2 (1 input)": the known features.
inline std::string feature_table() {
  std::string table;
  for (const FeatureInfo& f : kFeatureTable)
    table += (table.empty() ? "" : ", ") + std::string(f.name) + " = " + std::to_string(f.bit) + " (" +
             std::to_string(f.width) + (f.width == 1 ? " input)" : " inputs)");
  return table;
}

}  // namespace l2l_fast
