// The execution context of the kernel bodies on the GPU (the CPU emulation has its own).
#pragma once
#include <cuda_runtime.h>

namespace l2l_fast {
namespace cuda {

struct CudaCtx {
  __device__ __forceinline__ int thread() const { return threadIdx.x; }
  __device__ __forceinline__ int threads() const { return blockDim.x; }
  __device__ __forceinline__ int block() const { return blockIdx.x; }
  __device__ __forceinline__ int blocks() const { return gridDim.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
};

}  // namespace cuda
}  // namespace l2l_fast
