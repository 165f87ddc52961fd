// TF32 rounding and the 3xTF32 split for the tensor-core gate products (forward_mma_body.h).
// Torch-free; the CPU emulation runs this code (tests/cuda_emulation/warp_mma.h models the mma itself).
//
// Error analysis of 3xTF32 (the tolerance of tests/test_cuda_emulated.py's mma cases comes from here).
// TF32 keeps 10 explicit mantissa bits: rounding to nearest (cvt.rna) has unit roundoff u = 2^-11.
//   a = a_hi + a_lo exactly (a_hi = rna(a); a - a_hi is exact in float32), |a_lo| <= 2^-11 |a|
//   a_lo' = rna(a_lo) = a_lo (1 + d), |d| <= 2^-11; the same for b.
// The kernel sums a_hi b_hi + a_hi b_lo' + a_lo' b_hi (each product of two TF32 values is exact in
// float32: 11 x 11 significant bits). What it drops against a b:
//   a_hi (b_lo - b_lo') + (a_lo - a_lo') b_hi + a_lo b_lo, at most (2 (1 + 2^-11) + 1) 2^-22 |a||b|
//   < 3.01 * 2^-22 |a||b| = 7.2e-7 |a||b|,
// i.e. per gate pre-activation z = sum_k w_k x_k an error of at most 7.2e-7 sum_k |w_k x_k| before the
// accumulation's own rounding. That rounding: 3K products and the bias summed in float32, at most
// (3K + 1) 2^-24 sum |w_k x_k| if every addition rounds to nearest (the CPU model), twice that if the
// hardware truncates (published measurements of NVIDIA tensor cores: exact products, truncated sums).
// Against the FFMA kernel (K + 1 roundings of 2^-24): for layer 1 (K = 40) the worst case grows from
// 2.4e-6 to 7.2e-6 (1.5e-5 truncating) of sum |w_k x_k|, both far below the float32 elementwise
// tolerance (tests/tolerances.py: 5e-5 of the tensor's largest entry after the LSTM, whose activations
// have slopes <= 1); a random walk of roundings gives sqrt(3K) instead of 3K. So the mma kernel is held
// to the same float32 table as the FFMA kernel, and tests/test_cuda_emulated.py checks the single-mma
// bound (3.01 * 2^-22 + (3 k + 1) 2^-24) sum |a||b| directly.
// An A operand that is already TF32 (a_lo = 0: the forward's old h from a bf16 state) takes mma_2xtf32, the
// same sum without its first product a_lo b_hi, which is an exact 0: the same bits, except that a sum that is
// exactly 0 may keep the sign of its start (-0 + +0 is +0 in the three-product sum).
// The backward's weight gradients (backward_mma.h) split with lo unrounded and sum over a tile of T coordinates
// in two accumulators: their analysis, (5.01 * 2^-22 + (T + 1) 2^-24) sum |dz x| per tile, is there.
#pragma once
#include <cstdint>

#include "cuda/device_math.h"

namespace l2l_fast {
namespace cuda {

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (the low 13 bits zero).
// Infinities stay; NaN stays NaN; a value within half a TF32 ulp of FLT_MAX's binade top rounds to
// infinity, as the hardware's rounding does.
L2L_HD float round_tf32(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return __uint_as_float(u);
#else
  const uint32_t u = float_to_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? bits_to_float(0x7fffffffu) : x;
  // adding half a TF32 ulp to the magnitude bits and truncating rounds ties away from zero; a carry
  // moves into the exponent, as it should (and up to infinity from the largest binade)
  return bits_to_float((u + 0x1000u) & 0xffffe000u);
#endif
}

// round_tf32 by integer arithmetic: the same result for every finite x and +-Inf, 2 instructions where
// cvt.rna lowers to ~4 on sm_90 (it guards NaN); a NaN comes out as some other value (the GPU's canonical
// NaN 0x7fffffff as -0). Only for values whose coordinate is poisoned anyway when they are NaN
// (forward_mma_body.h's layer inputs), never for the poison itself.
L2L_HD float round_tf32_finite(float x) {
  return bits_to_float((float_to_bits(x) + 0x1000u) & 0xffffe000u);
}

// a = hi + lo with both TF32 values (lo rounded again: it keeps 11 of the 13 bits hi dropped). Finite: with
// round_tf32_finite (NaN not kept).
struct Tf32Split {
  float hi, lo;
};

template <bool Finite = false>
L2L_HD Tf32Split split_tf32(float x) {
  const float hi = Finite ? round_tf32_finite(x) : round_tf32(x);
  return Tf32Split{hi, Finite ? round_tf32_finite(x - hi) : round_tf32(x - hi)};
}

// A 16 x 8 fragment of matrix A (a0..a3) and an 8 x 8 fragment of B (b0, b1) of mma.m16n8k8; the
// accumulator has A's shape (c0..c3).
struct FragA {
  float v[4];
};
struct FragB {
  float v[2];
};

// acc += A B in 3xTF32 (small terms first: they are added while the sum is still small).
template <class Ctx>
L2L_DEVICE void mma_3xtf32(const Ctx& ctx, FragA& acc, const FragA& a_hi, const FragA& a_lo, const FragB& b_hi,
                           const FragB& b_lo) {
  ctx.mma_tf32(acc, a_lo, b_hi);
  ctx.mma_tf32(acc, a_hi, b_lo);
  ctx.mma_tf32(acc, a_hi, b_hi);
}

// acc += A B in 3xTF32 for an A of TF32 values (no lo part): mma_3xtf32 without its product a_lo b_hi = 0.
template <class Ctx>
L2L_DEVICE void mma_2xtf32(const Ctx& ctx, FragA& acc, const FragA& a, const FragB& b_hi, const FragB& b_lo) {
  ctx.mma_tf32(acc, a, b_lo);
  ctx.mma_tf32(acc, a, b_hi);
}

}  // namespace cuda
}  // namespace l2l_fast
