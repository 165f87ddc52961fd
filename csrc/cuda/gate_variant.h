// Which kernel computes the gate products of the forward / in-place step: the FFMA kernel (forward_body.h,
// the default) or the tensor-core kernel (forward_mma_body.h), chosen by the environment variable
//   L2L_FAST_CUDA_GATES = ffma (default, also when unset or empty) | mma | mma16
// (mma: 32 coordinates per warp, mma16: 16; the same kernel body otherwise)
// read at every launch (a getenv, so tests and benchmarks switch it within a process). mma applies to the
// net it is compiled for (hidden 20, 2 layers, <= 4 first-layer inputs) in float32 on sm_80 or newer;
// every other launch, and the backward, runs the FFMA kernels. Not the default until measured on a GPU
// (csrc/cuda/NOTES.md).
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

}  // namespace cuda
}  // namespace l2l_fast
