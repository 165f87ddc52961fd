// The backward kernel (backward_body.h), the block-order sum of its per-block weight-gradient rows,
// and their launches. On tensor cores when L2L_FAST_CUDA_BACKWARD asks for it, in float32 on sm_80 or newer
// (gate_variant.h): the weight gradients (backward_mma.h; mma_wgrad, or mma for nets other than 20 x 2) or every
// product (backward_mma_body.h; mma for hidden 20 x 2).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>

#include "cuda/backward_body.h"
#include "cuda/backward_mma_body.h"
#include "cuda/cuda_ctx.cuh"
#include "cuda/gate_variant.h"
#include "cuda/launch.h"

namespace l2l_fast {
namespace cuda {
namespace {

constexpr int kMaxBackwardThreads = 128;
constexpr int kSumThreads = 256;

// Variants: 0 FFMA, 1 the weight gradients on tensor cores, 2 every product on tensor cores (hidden 20 x 2).
template <int Variant, class Dims, typename T>
__global__ void __launch_bounds__(kMaxBackwardThreads) backward_kernel(const __grid_constant__ BackwardArgs<T> args,
                                                                       Dims dims) {
  extern __shared__ __align__(16) unsigned char smem[];
  if constexpr (Variant == 2) backward_block_mma(CudaCtx{}, args, dims, smem);
  else backward_block<Variant == 1>(CudaCtx{}, args, dims, smem);
}

__global__ void sum_partials_kernel(const double* partials, int blocks, int64_t size, double* out) {
  sum_partials_thread(CudaCtx{}, partials, blocks, size, out);
}

// Blocks of at most 128 threads, so the kernel's register budget is that of a 128-thread block.
template <class Dims, typename T>
auto backward_kernel_for(const BackwardPlan& plan) {
  auto kernel = backward_kernel<0, Dims, T>;
  if constexpr (std::is_same_v<T, float>) {
    if (plan.mma) kernel = backward_kernel<1, Dims, T>;
    if constexpr (Dims::kMaxH >= MmaBackwardNet::kH && Dims::kMaxH <= 32)  // the dims a 20 x 2 net takes
      if (plan.mma_gates) kernel = backward_kernel<2, Dims, T>;
  }
  if (plan.smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_bytes)));
  return kernel;
}

}  // namespace

template <typename T>
BackwardPlan plan_backward_launch(const PackedLayout& layout, int64_t n, const LaunchEnv& env) {
  BackwardPlan plan = plan_backward(layout, int(sizeof(T)), env.smem_optin);
  const Backward requested = requested_backward();
  plan.mma = std::is_same_v<T, float> && env.cc_major >= 8 && requested != Backward::kFfma;
  plan.mma_gates = plan.mma && requested == Backward::kMma && mma_backward_supports(layout);
  TORCH_CHECK(plan.threads > 0, "lstm_step_backward: hidden_size ", layout.hidden, " with ", layout.layers,
              " layers needs more shared memory per block than this GPU has (", env.smem_optin, " bytes)");
  dispatch_dims(layout, [&](auto dims) {
    using Dims = decltype(dims);
    TORCH_CHECK(plan.weights_in_smem || !Dims::kFixed, "lstm_step_backward: the weights of hidden_size ",
                layout.hidden, " do not fit this GPU's shared memory");
    auto kernel = backward_kernel_for<Dims, T>(plan);
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.threads, plan.smem_bytes));
    const int64_t tiles = (n + plan.threads - 1) / plan.threads;
    plan.blocks = int(std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t(std::max(per_sm, 1)) * env.sm_count)));
  });
  return plan;
}

template <typename T>
void launch_backward(const BackwardArgs<T>& a, const BackwardPlan& plan, const LaunchEnv& env) {
  dispatch_dims(a.net.layout, [&](auto dims) {
    using Dims = decltype(dims);
    auto kernel = backward_kernel_for<Dims, T>(plan);
    kernel<<<plan.blocks, plan.threads, plan.smem_bytes, env.stream>>>(a, dims);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_sum_partials(const double* partials, int blocks, int64_t size, double* out, const LaunchEnv& env) {
  const int64_t grid = (size + kSumThreads - 1) / kSumThreads;
  sum_partials_kernel<<<int(grid), kSumThreads, 0, env.stream>>>(partials, blocks, size, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template BackwardPlan plan_backward_launch<float>(const PackedLayout&, int64_t, const LaunchEnv&);
template BackwardPlan plan_backward_launch<double>(const PackedLayout&, int64_t, const LaunchEnv&);
template void launch_backward<float>(const BackwardArgs<float>&, const BackwardPlan&, const LaunchEnv&);
template void launch_backward<double>(const BackwardArgs<double>&, const BackwardPlan&, const LaunchEnv&);

}  // namespace cuda
}  // namespace l2l_fast
