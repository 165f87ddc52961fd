// The forward / in-place step kernels and their launch: a persistent grid of occupancy x SM-count
// blocks of 128 threads, each block copying the weights to shared memory once. The FFMA kernel
// (forward_body.h) by default; the tensor-core kernel (forward_mma_body.h) when L2L_FAST_CUDA_GATES=mma
// asks for it and it covers the net (gate_variant.h).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>

#include "cuda/cuda_ctx.cuh"
#include "cuda/forward_body.h"
#include "cuda/forward_mma_body.h"
#include "cuda/gate_variant.h"
#include "cuda/launch.h"

namespace l2l_fast {
namespace cuda {
namespace {

template <class Dims, typename T, typename S>
__global__ void __launch_bounds__(kForwardThreads) forward_kernel(const __grid_constant__ ForwardArgs<T, S> args,
                                                                  Dims dims) {
  extern __shared__ __align__(16) unsigned char smem[];
  forward_block(CudaCtx{}, args, dims, smem);
}

// Blocks per SM asked of ptxas: mma's 2 m-tiles need ~168 registers (3 blocks); one m-tile fits 5 blocks
// (<= 102 registers, the 43 KB of shared memory allow 5), which ptxas does not aim for unasked.
template <int Tiles>
constexpr int kMmaMinBlocks = Tiles == 1 ? 5 : 3;

template <int Tiles, uint32_t Features, typename S>
__global__ void __launch_bounds__(kForwardThreads, kMmaMinBlocks<Tiles>)
    forward_mma_kernel(const __grid_constant__ ForwardArgs<float, S> args) {
  extern __shared__ __align__(16) unsigned char smem[];
  forward_mma_block<Tiles, Features>(CudaCtx{}, args, smem);
}

// Grid of the persistent kernels: occupancy x SMs blocks, no more than there are tiles.
template <typename Kernel>
int persistent_grid(Kernel kernel, size_t smem, int64_t tiles, const LaunchEnv& env) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kForwardThreads, smem));
  return int(std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t(std::max(per_sm, 1)) * env.sm_count)));
}

// The tensor-core kernel, when asked for and it covers the launch; false when the FFMA kernel must run.
template <typename T, typename S>
bool launch_forward_mma(ForwardArgs<T, S>& a, const LaunchEnv& env) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    const Gates gates = requested_gates();
    if (gates == Gates::kFfma || env.cc_major < 8 || !mma_supports(a.net.layout)) return false;
    a.weights_in_smem = 1;
    return dispatch_mma_features(a.net.layout.features, [&](auto features) {
      constexpr uint32_t F = decltype(features)::value;
      auto kernel = mma_tiles(gates) == 1 ? forward_mma_kernel<1, F, S> : forward_mma_kernel<2, F, S>;
      const size_t smem = size_t(MmaNet::kSmemBytes);
      const int64_t per_block = int64_t(kForwardThreads / 32) * mma_tiles(gates) * kMmaRows;
      const int grid = persistent_grid(kernel, smem, (a.end - a.begin + per_block - 1) / per_block, env);
      kernel<<<grid, kForwardThreads, smem, env.stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace

template <typename T, typename S>
void launch_forward(ForwardArgs<T, S>& a, const LaunchEnv& env) {
  const int64_t columns = a.end - a.begin;
  if (columns <= 0) return;
  if (launch_forward_mma(a, env)) return;
  dispatch_dims(a.net.layout, [&](auto dims) {
    using Dims = decltype(dims);
    const int64_t weight_bytes = a.net.layout.size() * int64_t(sizeof(T));
    a.weights_in_smem = Dims::kFixed || weight_bytes <= kForwardSmemLimit;
    TORCH_INTERNAL_ASSERT(weight_bytes <= kForwardSmemLimit || !Dims::kFixed);
    const size_t smem = a.weights_in_smem ? size_t(weight_bytes) : 0;
    auto kernel = forward_kernel<Dims, T, S>;
    const int grid = persistent_grid(kernel, smem, (columns + kForwardThreads - 1) / kForwardThreads, env);
    kernel<<<grid, kForwardThreads, smem, env.stream>>>(a, dims);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template void launch_forward<float, float>(ForwardArgs<float, float>&, const LaunchEnv&);
template void launch_forward<float, bf16>(ForwardArgs<float, bf16>&, const LaunchEnv&);
template void launch_forward<double, double>(ForwardArgs<double, double>&, const LaunchEnv&);
template void launch_forward<double, bf16>(ForwardArgs<double, bf16>&, const LaunchEnv&);

}  // namespace cuda
}  // namespace l2l_fast
