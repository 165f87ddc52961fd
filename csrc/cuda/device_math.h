// Per-thread arithmetic of the CUDA kernels beyond lstm_cell.h: activations, 16-bit storage
// conversions, 4-wide gate loads. Torch-free and compilable as plain C++ too, so that the CPU
// emulation of the kernels (tests/cuda_emulation) runs this very code.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "lstm_layout.h"

// Kernel bodies: device functions under nvcc, ordinary inline functions in the emulation.
#if defined(__CUDACC__)
#define L2L_DEVICE __device__ __forceinline__
#else
#define L2L_DEVICE inline
#endif

namespace l2l_fast {
namespace cuda {

// 16-bit storage types as raw bits: layout-compatible with at::BFloat16 / at::Half and with
// __nv_bfloat16 / __half, usable on the host without CUDA headers.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// Storage type tags of parameters and gradients in a multi-tensor launch (chosen per tensor at run time).
enum ElemType : int32_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

L2L_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

L2L_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

L2L_HD float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

// Round to nearest even, as torch's float -> bfloat16 conversion.
L2L_HD bf16 to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  const uint32_t u = float_to_bits(f);
  if (f != f) return bf16{0x7fc0};
  return bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
#endif
}

L2L_HD float to_float(f16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  // exact: every half is a float; subnormal halves are normalised by hand
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_float(sign);
    int shift = 0;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      ++shift;
    }
    return bits_to_float(sign | (uint32_t(113 - shift) << 23) | ((mantissa & 0x3ffu) << 13));
  }
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
#endif
}

L2L_HD f16 to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(f))};
#else
  // round to nearest even; overflow to infinity, underflow through the subnormals to zero
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                                        // below 2^-14: subnormal half
    const float scaled = bits_to_float(a) * 16777216.0f;        // exact: * 2^24, units of the smallest subnormal
    const uint32_t whole = uint32_t(scaled);
    const float rest = scaled - float(whole);
    const uint32_t rounded = whole + ((rest > 0.5f || (rest == 0.5f && (whole & 1u))) ? 1u : 0u);
    return f16{uint16_t(sign | rounded)};
  }
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return f16{uint16_t(sign | (((rounded >> 13) - (112u << 10)) & 0xffffu))};
#endif
}

// Loads and stores of the state (compile-time storage type S, arithmetic type T).
template <typename T>
L2L_HD T load_value(const T* p) { return *p; }
template <typename T>
L2L_HD T load_value(const bf16* p) { return T(to_float(*p)); }
template <typename T>
L2L_HD void store_value(T* p, T v) { *p = v; }
template <typename T>
L2L_HD void store_value(bf16* p, T v) { *p = to_bf16(float(v)); }

// Parameters and gradients: storage type chosen per tensor at run time.
template <typename T>
L2L_HD T load_elem(const void* p, int32_t type, int64_t i) {
  switch (type) {
    case kF32: return T(static_cast<const float*>(p)[i]);
    case kF64: return T(static_cast<const double*>(p)[i]);
    case kBF16: return T(to_float(static_cast<const bf16*>(p)[i]));
    default: return T(to_float(static_cast<const f16*>(p)[i]));
  }
}

template <typename T>
L2L_HD void store_elem(void* p, int32_t type, int64_t i, T v) {
  switch (type) {
    case kF32: static_cast<float*>(p)[i] = float(v); break;
    case kF64: static_cast<double*>(p)[i] = double(v); break;
    case kBF16: static_cast<bf16*>(p)[i] = to_bf16(float(v)); break;
    default: static_cast<f16*>(p)[i] = to_f16(float(v)); break;
  }
}

L2L_HD bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

L2L_HD bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// The activations of the kernels (the Act of lstm_cell.h's cell_forward).
// float: e^x from the special-function unit (ex2.approx) and an approximate reciprocal, ~2 ulp each
// (plus the rounding of x log2 e: relative error ~|x| 2^-24 of e^-x),
// far inside the 5e-5 float32 tolerance and 4 instructions per sigmoid instead of ~20;
// -DL2L_CUDA_ACCURATE_ACTIVATIONS selects expf and IEEE division (a lever for accuracy questions).
// tanh(x) = 2 sigmoid(2x) - 1, as in the CPU kernels. double (gradcheck): libm-accurate.
template <typename T>
struct Activations;

template <>
struct Activations<float> {
  L2L_HD static float exp_neg(float x) {
#if defined(__CUDA_ARCH__) && !defined(L2L_CUDA_ACCURATE_ACTIVATIONS)
    // __expf without its guard against subnormal results (3 instructions fewer, in every activation):
    // a result below 2^-126 flushes to 0, which changes a sigmoid by less than 2^-126
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * -1.4426950408889634f));
    return y;
#else
    return expf(-x);
#endif
  }
  L2L_HD static float reciprocal(float x) {
#if defined(__CUDA_ARCH__) && !defined(L2L_CUDA_ACCURATE_ACTIVATIONS)
    return __fdividef(1.0f, x);  // 1 / inf = 0: sigmoid of a very negative x is 0, not NaN
#else
    return 1.0f / x;
#endif
  }
  // exp_neg(2 x) bit for bit: x (2 log2 e) and (2 x) log2 e round alike (a factor of 2 is exact, and both
  // overflow alike), in one FMUL where 2 x and the scaling took an FADD and an FMUL
  L2L_HD static float exp_neg2(float x) {
#if defined(__CUDA_ARCH__) && !defined(L2L_CUDA_ACCURATE_ACTIVATIONS)
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * (2.0f * -1.4426950408889634f)));
    return y;
#else
    return exp_neg(2.0f * x);
#endif
  }
  L2L_HD static float sigmoid(float x) { return reciprocal(1.0f + exp_neg(x)); }
  L2L_HD static float tanh(float x) { return 2.0f * reciprocal(1.0f + exp_neg2(x)) - 1.0f; }  // 2 sigmoid(2 x) - 1
};

template <>
struct Activations<double> {
  L2L_HD static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
  L2L_HD static double tanh(double x) { return ::tanh(x); }
};

// libm's tanh on either side (not the activations' approximation): for the bounded output's few calls.
L2L_HD float accurate_tanh(float x) { return tanhf(x); }
L2L_HD double accurate_tanh(double x) { return ::tanh(x); }

// The four gate values (i, f, g, o) of one unit: packed weights and biases keep them adjacent,
// so one 16-byte load (two for double) fetches all four.
template <typename T>
struct Quad {
  T v[4];
};

L2L_HD Quad<float> load_quad(const float* p) {
#if defined(__CUDA_ARCH__)
  const float4 q = *reinterpret_cast<const float4*>(p);
  return Quad<float>{{q.x, q.y, q.z, q.w}};
#else
  return Quad<float>{{p[0], p[1], p[2], p[3]}};
#endif
}

L2L_HD Quad<double> load_quad(const double* p) {
#if defined(__CUDA_ARCH__)
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  return Quad<double>{{a.x, a.y, b.x, b.y}};
#else
  return Quad<double>{{p[0], p[1], p[2], p[3]}};
#endif
}

L2L_HD void store_quad(float* p, const Quad<float>& q) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(p) = make_float4(q.v[0], q.v[1], q.v[2], q.v[3]);
#else
  for (int j = 0; j < 4; ++j) p[j] = q.v[j];
#endif
}

L2L_HD void store_quad(double* p, const Quad<double>& q) {
#if defined(__CUDA_ARCH__)
  reinterpret_cast<double2*>(p)[0] = make_double2(q.v[0], q.v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(q.v[2], q.v[3]);
#else
  for (int j = 0; j < 4; ++j) p[j] = q.v[j];
#endif
}

}  // namespace cuda
}  // namespace l2l_fast
