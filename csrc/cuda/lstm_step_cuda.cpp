// CUDA binding of the ops: step_ops.h with a launcher that runs the kernels on torch's current
// stream of the current device.
// (c10's stream header, not ATen/cuda/CUDAContext.h: that one needs the cuBLAS / cuSPARSE headers,
// which a toolkit with only nvcc lacks.)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "cuda/launch.h"
#include "cuda/step_ops.h"

namespace l2l_fast {
namespace cuda {
namespace {

// SM count and opt-in shared memory of the current device, queried once per device.
LaunchEnv current_env() {
  struct Props {
    int sm_count = 0;
    int smem_optin = 0;
    int cc_major = 0;
  };
  static std::array<Props, 64> cache;
  static std::mutex mutex;
  const int device = c10::cuda::current_device();
  Props props;
  {
    std::lock_guard<std::mutex> lock(mutex);
    props = cache.at(size_t(device));
    if (props.sm_count == 0) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&props.sm_count, cudaDevAttrMultiProcessorCount, device));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&props.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&props.cc_major, cudaDevAttrComputeCapabilityMajor, device));
      cache.at(size_t(device)) = props;
    }
  }
  return LaunchEnv{c10::cuda::getCurrentCUDAStream(device).stream(), props.sm_count, int64_t(props.smem_optin),
                   props.cc_major};
}

struct CudaLauncher {
  template <typename T, typename S>
  static void forward(ForwardArgs<T, S>& a) {
    launch_forward(a, current_env());
  }
  template <typename T>
  static BackwardPlan backward_plan(const PackedLayout& layout, int64_t n) {
    return plan_backward_launch<T>(layout, n, current_env());
  }
  template <typename T>
  static void backward(BackwardArgs<T>& a, const BackwardPlan& plan) {
    launch_backward(a, plan, current_env());
  }
  static void sum_partials(const double* partials, int blocks, int64_t size, double* out) {
    launch_sum_partials(partials, blocks, size, out, current_env());
  }
  static int64_t stream_id() { return c10::cuda::getCurrentCUDAStream().id(); }
  static bool capturing() {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(l2l_fast, CUDA, m) {
  m.impl("lstm_step", &lstm_step<CudaLauncher>);
  m.impl("lstm_step_backward", &lstm_step_backward<CudaLauncher>);
  m.impl("lstm_step_", &lstm_step_<CudaLauncher>);
  m.impl("lstm_multi_step_", &lstm_multi_step_<CudaLauncher>);
}

}  // namespace cuda
}  // namespace l2l_fast
