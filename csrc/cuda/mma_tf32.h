// TF32 rounding and the 3xTF32 split for the tensor-core gate products (forward_mma_body.h).
// Torch-free; the CPU emulation runs this code (tests/cuda_emulation/warp_mma.h models the mma itself).
//
// Error analysis of 3xTF32 (the tolerance of tests/test_cuda_emulated.py's mma cases comes from here).
// TF32 keeps 10 explicit mantissa bits: rounding to nearest (cvt.rna) has unit roundoff u = 2^-11.
//   B (the weights, split once per block, split_tf32): b = b_hi + b_lo exactly (b_hi = rna(b); b - b_hi is exact
//   in float32), |b_lo| <= 2^-11 |b|; b_lo' = rna(b_lo) = b_lo (1 + d), |d| <= 2^-11.
//   A (the layer inputs, split per use, split_tf32_lo_unrounded): a_hi = rna(a) by integer arithmetic, a_lo = a - a_hi
//   exact, |a_lo| <= 2^-11 |a|, handed to the mma as it is: the tensor core reads a TF32 a_lo' of it, at worst its
//   truncation (it ignores the low 13 bits; warp_mma.h models that), |a_lo - a_lo'| < 2^-10 |a_lo| <= 2^-21 |a|.
// The kernel sums a_hi b_hi + a_hi b_lo' + a_lo' b_hi (each product of two TF32 values is exact in
// float32: 11 x 11 significant bits). What it drops against a b:
//   a_hi (b_lo - b_lo') + (a_lo - a_lo') b_hi + a_lo b_lo, at most ((1 + 2^-11) + 2 (1 + 2^-11) + 1) 2^-22 |a||b|
//   < 4.01 * 2^-22 |a||b| = 9.6e-7 |a||b|
// (3.01 * 2^-22 = 7.2e-7 until 2026-12-07, when a_lo was rounded too: see split_tf32_lo_unrounded for why not),
// i.e. per gate pre-activation z = sum_k w_k x_k an error of at most 9.6e-7 sum_k |w_k x_k| before the
// accumulation's own rounding. That rounding: 3K products and the bias summed in float32, at most
// (3K + 1) 2^-24 sum |w_k x_k| if every addition rounds to nearest (the CPU model), twice that if the
// hardware truncates (published measurements of NVIDIA tensor cores: exact products, truncated sums).
// Against the FFMA kernel (K + 1 roundings of 2^-24): for layer 1 (K = 40) the worst case grows from
// 2.4e-6 to 8.2e-6 (1.5e-5 truncating) of sum |w_k x_k|, both far below the float32 elementwise
// tolerance (tests/tolerances.py: 5e-5 of the tensor's largest entry after the LSTM, whose activations
// have slopes <= 1); a random walk of roundings gives sqrt(3K) instead of 3K. So the mma kernel is held
// to the same float32 table as the FFMA kernel, and tests/test_cuda_mma_emulated.py checks the single-mma
// bound (4.01 * 2^-22 + (3 k + 1) 2^-24) sum |a||b| directly, with the operands split as the forward splits them.
// An A operand that is already TF32 (a_lo = 0: the forward's old h from a bf16 state) takes mma_2xtf32, the
// same sum without its first product a_lo b_hi, which is an exact 0: the same bits, except that a sum that is
// exactly 0 may keep the sign of its start (-0 + +0 is +0 in the three-product sum).
// The backward (backward_mma.h, backward_mma_body.h) splits both operands with lo unrounded: its analysis,
// (5.01 * 2^-22 + (T + 1) 2^-24) sum |dz x| per tile for the weight gradients, is there.
//
// NaN (README "Non-finite values"; issue 22): the integer rounding turns the GPU's NaN into -0, so a NaN layer
// input survives only in lo. Before 2026-12-07 the forward rounded lo with it too, on the reasoning that a NaN
// input only occurs in a coordinate its poison already marks; but the net can compute a NaN from finite values
// (+Inf after one k-tile, -Inf added by the next: each mma rounds its float32 sum), and layer 1 read such a NaN h
// of layer 0 as 0: a finite update next to a NaN state. With lo unrounded the NaN reaches every gate it enters,
// and the forward got 2 instructions per coordinate cheaper (mma, float32 state: 114.3 -> 112.3 as run;
// csrc/cuda/NOTES.md "A NaN the net computes").
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
// cvt.rna lowers to ~4 on sm_90 (it guards NaN). A NaN does not stay NaN: the GPU's arithmetic delivers every
// NaN as 0x7fffffff, which the carry turns into -0 (0xffffffff into +0). The host side models that (it maps
// any NaN to 0x7fffffff first: x86's default NaN 0xffc00000 would survive the add), so that the emulation
// runs the device's arithmetic. Callers keep a NaN in the lo part instead (split_tf32_lo_unrounded).
L2L_HD float round_tf32_finite(float x) {
#if !defined(__CUDA_ARCH__)
  if (x != x) x = bits_to_float(0x7fffffffu);
#endif
  return bits_to_float((float_to_bits(x) + 0x1000u) & 0xffffe000u);
}

// a = hi + lo with both TF32 values (lo rounded again: it keeps 11 of the 13 bits hi dropped): the weights,
// split once per block into shared memory.
struct Tf32Split {
  float hi, lo;
};

L2L_HD Tf32Split split_tf32(float x) {
  const float hi = round_tf32(x);
  return Tf32Split{hi, round_tf32(x - hi)};
}

// The split of the values split per use (the forward's layer inputs, every operand of the backward): hi rounded
// with integer arithmetic, lo = x - hi exact and handed to the mma unrounded (it reads lo's TF32 truncation; the
// analysis above): one instruction per value less than rounding lo too (sm_90 SASS: 64 per warp tile of the
// forward's mma variant, whose lo rounding ptxas had already cut to its add). A NaN stays
// NaN: hi = -0 (the device's NaN, round_tf32_finite), lo = x - hi = NaN, so a_lo b_hi is NaN in every product the
// value enters, also where no poison says so (a NaN the net computed itself from finite values: a gate's
// +Inf - Inf after two k-tiles). +-Inf becomes NaN (lo = Inf - Inf); the FFMA kernel's sum gives +-Inf or NaN
// there, and every layer input that can be +-Inf (an old h) poisons its coordinate anyway.
L2L_HD Tf32Split split_tf32_lo_unrounded(float x) {
  const float hi = round_tf32_finite(x);
  return Tf32Split{hi, x - hi};
}

// A 16 x 8 fragment of matrix A (a0..a3) and an 8 x 8 fragment of B (b0, b1) of mma.m16n8k8; the
// accumulator has A's shape (c0..c3).
struct FragA {
  float v[4];
};
struct FragB {
  float v[2];
};

// An A fragment's four values split by split_tf32_lo_unrounded (the forward's layer inputs, the backward's staged
// values).
L2L_DEVICE void split_frag(const float (&v)[4], FragA& hi, FragA& lo) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const Tf32Split s = split_tf32_lo_unrounded(v[i]);
    hi.v[i] = s.hi;
    lo.v[i] = s.lo;
  }
}

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
