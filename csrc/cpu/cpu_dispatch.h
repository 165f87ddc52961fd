// What the CPU bindings share: the active kernels by scalar type, and (cpu/chunks.h) the split of a
// coordinate range over std::threads.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>

#include "cpu/chunks.h"
#include "cpu/isa_select.h"

namespace l2l_fast {
namespace cpu {

// The active instruction set's kernels for scalar type T.
template <typename T>
struct TypedKernels;

template <>
struct TypedKernels<float> {
  static auto forward(const CpuKernels& k) { return k.forward_f32; }
  static auto backward(const CpuKernels& k) { return k.backward_f32; }
  static int64_t tile(const CpuKernels& k) { return k.tile_f32; }
};

template <>
struct TypedKernels<double> {
  static auto forward(const CpuKernels& k) { return k.forward_f64; }
  static auto backward(const CpuKernels& k) { return k.backward_f64; }
  static int64_t tile(const CpuKernels& k) { return k.tile_f64; }
};

}  // namespace cpu
}  // namespace l2l_fast
