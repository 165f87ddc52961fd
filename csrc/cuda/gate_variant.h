// Which kernel variants a launch takes, chosen by environment variables read at every launch (a getenv, so
// tests and benchmarks switch them within a process). Neither is the default until measured on a GPU
// (csrc/cuda/NOTES.md).
//   L2L_FAST_CUDA_GATES = ffma (default, also when unset or empty) | mma | mma16
// The gate products of the forward / in-place step: the FFMA kernel (forward_body.h) or the tensor-core kernel
// (forward_mma_body.h; mma: 32 coordinates per warp, mma16: 16, the same body otherwise). mma applies to the
// net it is compiled for (hidden 20, 2 layers, <= 4 first-layer inputs) in float32 on sm_80 or newer; every
// other launch runs the FFMA kernel.
//   L2L_FAST_CUDA_BACKWARD = ffma (default, also when unset or empty) | mma | mma_wgrad
// The backward's products. mma: every product on tensor cores where the kernel is written for the net (hidden 20,
// 2 layers, any features, float32, sm_80+: backward_mma_body.h, the gate recompute and d inputs as warp GEMMs, and
// backward_mma.h's weight gradients), the weight gradients alone on tensor cores for every other float32 net.
// mma_wgrad: the weight gradients alone on tensor cores for every float32 net (the per-coordinate products on
// FFMA, d grad and d state bit for bit the FFMA backward's), kept to measure the two levers apart. float64 runs
// the FFMA backward whatever the variable says.
// A variable of its own: the forward and the backward are measured apart, and they cover different nets.
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace l2l_fast {
namespace cuda {

enum class Gates { kFfma, kMma, kMma16 };

// m-tiles of 16 coordinates per warp of the mma kernels.
inline int mma_tiles(Gates gates) { return gates == Gates::kMma16 ? 1 : 2; }

inline Gates requested_gates() {
  const char* v = std::getenv("L2L_FAST_CUDA_GATES");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "ffma") == 0) return Gates::kFfma;
  if (std::strcmp(v, "mma") == 0) return Gates::kMma;
  if (std::strcmp(v, "mma16") == 0) return Gates::kMma16;
  TORCH_CHECK_VALUE(false, "L2L_FAST_CUDA_GATES must be 'ffma', 'mma' or 'mma16', not '", v, "'");
  return Gates::kFfma;
}

enum class Backward { kFfma, kMma, kMmaWgrad };

inline Backward requested_backward() {
  const char* v = std::getenv("L2L_FAST_CUDA_BACKWARD");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "ffma") == 0) return Backward::kFfma;
  if (std::strcmp(v, "mma") == 0) return Backward::kMma;
  if (std::strcmp(v, "mma_wgrad") == 0) return Backward::kMmaWgrad;
  TORCH_CHECK_VALUE(false, "L2L_FAST_CUDA_BACKWARD must be 'ffma', 'mma' or 'mma_wgrad', not '", v, "'");
  return Backward::kFfma;
}

}  // namespace cuda
}  // namespace l2l_fast
