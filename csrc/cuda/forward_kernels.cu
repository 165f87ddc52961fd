// The forward / in-place step kernel (forward_body.h) and its launch: a persistent grid of
// occupancy x SM-count blocks of 128 threads, each block copying the weights to shared memory once.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "cuda/cuda_ctx.cuh"
#include "cuda/forward_body.h"
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

}  // namespace

template <typename T, typename S>
void launch_forward(ForwardArgs<T, S>& a, const LaunchEnv& env) {
  const int64_t columns = a.end - a.begin;
  if (columns <= 0) return;
  dispatch_dims(a.net.layout, [&](auto dims) {
    using Dims = decltype(dims);
    const int64_t weight_bytes = a.net.layout.size() * int64_t(sizeof(T));
    a.weights_in_smem = Dims::kFixed || weight_bytes <= kForwardSmemLimit;
    TORCH_INTERNAL_ASSERT(weight_bytes <= kForwardSmemLimit || !Dims::kFixed);
    const size_t smem = a.weights_in_smem ? size_t(weight_bytes) : 0;
    auto kernel = forward_kernel<Dims, T, S>;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kForwardThreads, smem));
    const int64_t tiles = (columns + kForwardThreads - 1) / kForwardThreads;
    const int grid = int(std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t(std::max(per_sm, 1)) * env.sm_count)));
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
