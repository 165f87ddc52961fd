// The execution context of the kernel bodies on the GPU (the CPU emulation has its own).
#pragma once
#include <cuda_runtime.h>

#include "cuda/mma_tf32.h"

namespace l2l_fast {
namespace cuda {

struct CudaCtx {
  __device__ __forceinline__ int thread() const { return threadIdx.x; }
  __device__ __forceinline__ int threads() const { return blockDim.x; }
  __device__ __forceinline__ int block() const { return blockIdx.x; }
  __device__ __forceinline__ int blocks() const { return gridDim.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ int lane() const { return threadIdx.x % 32; }
  __device__ __forceinline__ void sync_warp() const { __syncwarp(); }
  // warp-wide (all 32 lanes, converged): v of lane src; the lanes' predicates as bits (bit i: lane i)
  __device__ __forceinline__ float shfl(float v, int src) const { return __shfl_sync(0xffffffffu, v, src); }
  __device__ __forceinline__ unsigned ballot(bool p) const { return __ballot_sync(0xffffffffu, p); }
  // acc += A B, one warp-wide mma.m16n8k8 (all 32 lanes, converged); a and b hold TF32 values (rounded).
  __device__ __forceinline__ void mma_tf32(FragA& acc, const FragA& a, const FragB& b) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(acc.v[0]), "+f"(acc.v[1]), "+f"(acc.v[2]), "+f"(acc.v[3])
        : "r"(__float_as_uint(a.v[0])), "r"(__float_as_uint(a.v[1])), "r"(__float_as_uint(a.v[2])),
          "r"(__float_as_uint(a.v[3])), "r"(__float_as_uint(b.v[0])), "r"(__float_as_uint(b.v[1])));
#else
    __trap();  // the launch code never selects the mma kernel below sm_80
#endif
  }
};

}  // namespace cuda
}  // namespace l2l_fast
