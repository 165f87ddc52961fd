// Host entry points of the CUDA kernels (defined in forward_kernels.cu / backward_kernels.cu, one
// explicit instantiation per storage combination). Every launch goes on env.stream and is followed
// by a launch check.
#pragma once
#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"

namespace l2l_fast {
namespace cuda {

// The device a launch runs on, as the caller knows it (torch's cached device properties).
struct LaunchEnv {
  cudaStream_t stream;
  int sm_count;
  int64_t smem_optin;  // largest dynamic shared memory a block may opt in to
  int cc_major;        // compute capability (the tensor-core kernel needs 8 or more)
};

// T: arithmetic and weights (float, double); S: state storage (T or bf16). Sets a.weights_in_smem.
template <typename T, typename S>
void launch_forward(ForwardArgs<T, S>& a, const LaunchEnv& env);

template <typename T>
BackwardPlan plan_backward_launch(const PackedLayout& layout, int64_t n, const LaunchEnv& env);

template <typename T>
void launch_backward(const BackwardArgs<T>& a, const BackwardPlan& plan, const LaunchEnv& env);

void launch_sum_partials(const double* partials, int blocks, int64_t size, double* out, const LaunchEnv& env);

}  // namespace cuda
}  // namespace l2l_fast
