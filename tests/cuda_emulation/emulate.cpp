// CPU emulation of the CUDA kernels, for testing them on machines without a GPU.
//
// The kernel bodies (csrc/cuda/forward_body.h, backward_body.h) are written against an execution
// context; here every CUDA thread of a block is a std::thread and __syncthreads() a barrier, blocks
// run one after another, and "shared memory" is a buffer filled with NaN before each block. The ops
// are csrc/cuda/step_ops.h itself, with this launcher instead of the CUDA one, on CPU tensors.
// The tensor-core kernels' warp-wide mma.sync (the forward's gates, the backward's weight gradients) is
// warp_mma.h's model of the PTX fragment layouts: the 32 lanes of a warp exchange their fragments through a barrier.
// What this cannot check: the GPU's arithmetic (exp2.approx etc.: here libm; the tensor cores' sums), the
// compiler's register allocation, launch limits, races that a barrier too few would cause only under real
// concurrency (the threads here do run concurrently, so many would still show).
#include <torch/extension.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "cuda/backward_body.h"
#include "cuda/backward_mma_body.h"
#include "cuda/forward_body.h"
#include "cuda/forward_mma_body.h"
#include "cuda/gate_variant.h"
#include "cuda/step_ops.h"
#include "warp_mma.h"

namespace l2l_fast {
namespace cuda {
namespace {

struct EmuCtx {
  int t, nt, b, nb;
  Barrier* barrier;
  std::deque<WarpMma>* warps;  // one exchange per warp of the block
  int thread() const { return t; }
  int threads() const { return nt; }
  int block() const { return b; }
  int blocks() const { return nb; }
  void sync() const { barrier->wait(); }
  int lane() const { return t % 32; }
  void sync_warp() const { (*warps)[size_t(t / 32)].sync(); }
  float shfl(float v, int src) const { return (*warps)[size_t(t / 32)].shfl(lane(), v, src); }
  unsigned ballot(bool p) const { return (*warps)[size_t(t / 32)].ballot(lane(), p); }
  void mma_tf32(FragA& acc, const FragA& a, const FragB& b) const { (*warps)[size_t(t / 32)].mma(lane(), acc, a, b); }
};

// Launch shape of the emulated kernels; small blocks and grids so that tests cover several tiles
// per block with few coordinates.
struct Settings {
  int forward_threads = 32;
  int forward_blocks = 3;
  int mma_threads = 64;  // the tensor-core kernel's blocks: whole warps
  int backward_blocks = 3;
  int64_t smem_limit = 227 * 1024;      // per block, as on an H100
  int64_t forward_smem_limit = kForwardSmemLimit;
  int64_t launches = 0;                  // kernel launches so far (multi-tensor chunking is visible here)
  int64_t mma_launches = 0;              // of them, the tensor-core forward's
  int64_t mma_backward_launches = 0;     // backward launches with the weight gradients on tensor cores
  int64_t mma_gates_backward_launches = 0;  // of them, with every product on tensor cores
};
Settings settings;

template <typename Body>
void run_grid(int blocks, int threads, int64_t smem_bytes, const Body& body) {
  ++settings.launches;
  std::vector<double> smem(size_t(smem_bytes) / sizeof(double) + 2);
  for (int b = 0; b < blocks; ++b) {
    std::fill(smem.begin(), smem.end(), std::numeric_limits<double>::quiet_NaN());  // unwritten reads show
    Barrier barrier(threads);
    std::deque<WarpMma> warps;  // a deque: a WarpMma holds a mutex and cannot move
    for (int w = 0; w < threads; w += 32) warps.emplace_back(std::min(32, threads - w));
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        body(EmuCtx{t, threads, b, blocks, &barrier, &warps}, reinterpret_cast<unsigned char*>(smem.data()));
      });
    for (std::thread& thread : pool) thread.join();
  }
}

struct EmuLauncher {
  template <typename T, typename S>
  static void forward(ForwardArgs<T, S>& a) {
    const int64_t columns = a.end - a.begin;
    if (columns <= 0) return;
    if (forward_mma(a)) return;
    dispatch_dims(a.net.layout, [&](auto dims) {
      using Dims = decltype(dims);
      const int64_t weight_bytes = a.net.layout.size() * int64_t(sizeof(T));
      a.weights_in_smem = Dims::kFixed || weight_bytes <= settings.forward_smem_limit;
      const int64_t tiles = (columns + settings.forward_threads - 1) / settings.forward_threads;
      const int grid = int(std::min<int64_t>(tiles, settings.forward_blocks));
      const ForwardArgs<T, S> args = a;  // the kernel's by-value parameter
      run_grid(grid, settings.forward_threads, a.weights_in_smem ? weight_bytes : 0,
               [&](const EmuCtx& ctx, unsigned char* smem) { forward_block(ctx, args, dims, smem); });
    });
  }

  // forward_kernels.cu's launch_forward_mma with the emulated launch shape.
  template <typename T, typename S>
  static bool forward_mma(ForwardArgs<T, S>& a) {
    if constexpr (!std::is_same_v<T, float>) {
      return false;
    } else {
      const Gates gates = requested_gates();
      if (gates == Gates::kFfma || !mma_supports(a.net.layout)) return false;
      a.weights_in_smem = 1;
      return dispatch_mma_features(a.net.layout.features, [&](auto features) {
        constexpr uint32_t F = decltype(features)::value;
        const int tiles = mma_tiles(gates);
        const int64_t per_block = int64_t(settings.mma_threads / 32) * tiles * kMmaRows;
        const int grid = int(std::min<int64_t>((a.end - a.begin + per_block - 1) / per_block, settings.forward_blocks));
        const ForwardArgs<T, S> args = a;
        ++settings.mma_launches;
        run_grid(grid, settings.mma_threads, MmaNet::kSmemBytes, [&](const EmuCtx& ctx, unsigned char* smem) {
          if (tiles == 1) forward_mma_block<1, F>(ctx, args, smem);
          else forward_mma_block<2, F>(ctx, args, smem);
        });
      });
    }
  }

  template <typename T>
  static BackwardPlan backward_plan(const PackedLayout& layout, int64_t n) {
    BackwardPlan plan = plan_backward(layout, int(sizeof(T)), settings.smem_limit);
    TORCH_CHECK(plan.threads > 0, "emulated backward: shared memory limit too small");
    const Backward requested = requested_backward();
    plan.mma = std::is_same_v<T, float> && requested != Backward::kFfma;
    plan.mma_gates = plan.mma && requested == Backward::kMma && mma_backward_supports(layout);
    dispatch_dims(layout, [&](auto dims) {
      TORCH_CHECK(plan.weights_in_smem || !decltype(dims)::kFixed, "emulated backward: fixed dims need shared weights");
    });
    const int64_t tiles = (n + plan.threads - 1) / plan.threads;
    plan.blocks = int(std::max<int64_t>(1, std::min<int64_t>(tiles, settings.backward_blocks)));
    return plan;
  }

  template <typename T>
  static void backward(const BackwardArgs<T>& a, const BackwardPlan& plan) {
    dispatch_dims(a.net.layout, [&](auto dims) {
      if constexpr (std::is_same_v<T, float>) {
        if (plan.mma_gates) {
          ++settings.mma_backward_launches;
          ++settings.mma_gates_backward_launches;
          run_grid(plan.blocks, plan.threads, plan.smem_bytes,
                   [&](const EmuCtx& ctx, unsigned char* smem) { backward_block_mma(ctx, a, dims, smem); });
          return;
        }
        if (plan.mma) {
          ++settings.mma_backward_launches;
          run_grid(plan.blocks, plan.threads, plan.smem_bytes,
                   [&](const EmuCtx& ctx, unsigned char* smem) { backward_block<true>(ctx, a, dims, smem); });
          return;
        }
      }
      run_grid(plan.blocks, plan.threads, plan.smem_bytes,
               [&](const EmuCtx& ctx, unsigned char* smem) { backward_block<false>(ctx, a, dims, smem); });
    });
  }

  static int64_t stream_id() { return 0; }
  static bool capturing() { return false; }

  static void sum_partials(const double* partials, int blocks, int64_t size, double* out) {
    const int threads = 64;
    run_grid(int((size + threads - 1) / threads), threads, 0, [&](const EmuCtx& ctx, unsigned char*) {
      sum_partials_thread(ctx, partials, blocks, size, out);
    });
  }
};

void configure(int forward_threads, int forward_blocks, int backward_blocks, int64_t smem_limit,
               int64_t forward_smem_limit, int mma_threads) {
  TORCH_CHECK(forward_threads >= 1 && forward_threads <= 128 && forward_blocks >= 1 && backward_blocks >= 1);
  TORCH_CHECK(mma_threads >= 32 && mma_threads <= 128 && mma_threads % 32 == 0, "mma_threads: whole warps");
  settings.mma_threads = mma_threads;
  settings.forward_threads = forward_threads;
  settings.forward_blocks = forward_blocks;
  settings.backward_blocks = backward_blocks;
  settings.smem_limit = smem_limit;
  settings.forward_smem_limit = forward_smem_limit;
}

// Storage conversions of device_math.h's host side, for comparison with torch's.
at::Tensor to_bf16_bits(const at::Tensor& x) {
  const at::Tensor f = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(f.sizes(), f.options().dtype(at::kBFloat16));
  auto* o = reinterpret_cast<bf16*>(out.data_ptr());
  for (int64_t i = 0; i < f.numel(); ++i) o[i] = to_bf16(f.data_ptr<float>()[i]);
  return out;
}

at::Tensor to_f16_bits(const at::Tensor& x) {
  const at::Tensor f = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(f.sizes(), f.options().dtype(at::kHalf));
  auto* o = reinterpret_cast<f16*>(out.data_ptr());
  for (int64_t i = 0; i < f.numel(); ++i) o[i] = to_f16(f.data_ptr<float>()[i]);
  return out;
}

at::Tensor from_f16_bits(const at::Tensor& x) {
  const at::Tensor h = x.contiguous();
  at::Tensor out = at::empty(h.sizes(), h.options().dtype(at::kFloat));
  const auto* in = reinterpret_cast<const f16*>(h.data_ptr());
  for (int64_t i = 0; i < h.numel(); ++i) out.data_ptr<float>()[i] = to_float(in[i]);
  return out;
}

// The mma model for tests/test_cuda_emulated.py: per-lane fragments a [32, 4], b [32, 2], c [32, 4] (float32)
// -> d [32, 4] of one emulated warp-wide mma.m16n8k8 (the lanes as threads, as in the kernels). With
// split3, each operand is split into TF32 hi + lo first as the forward does (A: lo unrounded, B: both rounded) and
// the three products of mma_3xtf32 are summed.
at::Tensor warp_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool split3) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({32, 4}) && b.sizes() == at::IntArrayRef({32, 2}) &&
              c.sizes() == at::IntArrayRef({32, 4}) && a.scalar_type() == at::kFloat &&
              b.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor d = c.contiguous().clone();
  const float* pa = ac.data_ptr<float>();
  const float* pb = bc.data_ptr<float>();
  float* pd = d.data_ptr<float>();
  run_grid(1, 32, 0, [&](const EmuCtx& ctx, unsigned char*) {
    const int lane = ctx.lane();
    FragA acc, fa;
    FragB fb;
    for (int i = 0; i < 4; ++i) acc.v[i] = pd[lane * 4 + i];
    for (int i = 0; i < 4; ++i) fa.v[i] = pa[lane * 4 + i];
    for (int i = 0; i < 2; ++i) fb.v[i] = pb[lane * 2 + i];
    if (split3) {
      FragA a_hi, a_lo;
      FragB b_hi, b_lo;
      for (int i = 0; i < 4; ++i) {
        const Tf32Split s = split_tf32_lo_unrounded(fa.v[i]);  // the forward's layer inputs
        a_hi.v[i] = s.hi;
        a_lo.v[i] = s.lo;
      }
      for (int i = 0; i < 2; ++i) {
        const Tf32Split s = split_tf32(fb.v[i]);  // the forward's staged weights
        b_hi.v[i] = s.hi;
        b_lo.v[i] = s.lo;
      }
      mma_3xtf32(ctx, acc, a_hi, a_lo, b_hi, b_lo);
    } else {
      ctx.mma_tf32(acc, fa, fb);
    }
    for (int i = 0; i < 4; ++i) pd[lane * 4 + i] = acc.v[i];
  });
  return d;
}

// The backward's weight-gradient reduction alone, for one emulated block of T = x.size(0) threads (32, 64, 128):
// x [T, K + 1] and dz [T, units G] staged as backward_body.h stages them (staging_stride rows, whatever lies in
// the padding: NaN here), then mma_weight_grads (mma) or reduce_weight_grads; returns the float64 partial row
// [units (K + 1) G] in the packed order (weights (u K + k) G + g, then the bias column u G + g).
at::Tensor weight_grads_tile(const at::Tensor& x, const at::Tensor& dz, int64_t G, bool mma) {
  TORCH_CHECK(x.dim() == 2 && dz.dim() == 2 && x.size(0) == dz.size(0) && x.scalar_type() == at::kFloat &&
              dz.scalar_type() == at::kFloat && (G == 1 || G == 4) && dz.size(1) % G == 0);
  const int threads = int(x.size(0)), K = int(x.size(1)) - 1, units = int(dz.size(1) / G);
  TORCH_CHECK(threads == 32 || threads == 64 || threads == 128, "blocks of 32, 64 or 128 threads");
  const int sx = staging_stride(K + 1), sdz = G == 1 ? 1 : staging_stride(int(dz.size(1)));
  const int64_t x_size = int64_t(threads) * sx, dz_size = int64_t(threads) * sdz + 16;  // + the padding reads
  const int64_t smem_bytes = (x_size + dz_size) * int64_t(sizeof(float));
  const at::Tensor xc = x.contiguous(), dzc = dz.contiguous();
  at::Tensor partial = at::zeros({int64_t(units) * (K + 1) * G}, x.options().dtype(at::kDouble));
  const GradTarget to{0, int64_t(units) * K * G, K, int(G), units};
  run_grid(1, threads, smem_bytes, [&](const EmuCtx& ctx, unsigned char* smem_bytes_) {
    float* sm = reinterpret_cast<float*>(smem_bytes_);
    float *sx_rows = sm, *sdz_rows = sm + x_size;
    const int t = ctx.thread();
    for (int k = 0; k <= K; ++k) sx_rows[t * sx + k] = xc.data_ptr<float>()[t * (K + 1) + k];
    for (int j = 0; j < units * G; ++j) sdz_rows[t * sdz + j] = dzc.data_ptr<float>()[t * units * G + j];
    ctx.sync();
    double* out = partial.data_ptr<double>();
    if (G == 4) {
      if (mma) mma_weight_grads<4>(ctx, sx_rows, sx, sdz_rows, sdz, to, out);
      else reduce_weight_grads<4>(ctx, sx_rows, sx, sdz_rows, sdz, to, out);
    } else {
      if (mma) mma_weight_grads<1>(ctx, sx_rows, sx, sdz_rows, sdz, to, out);
      else reduce_weight_grads<1>(ctx, sx_rows, sx, sdz_rows, sdz, to, out);
    }
  });
  return partial;
}

// The backward's per-coordinate products alone (backward_mma_body.h), for one emulated block of T = x.size(0)
// threads (32, 64, 128): x [T, K] (layer inputs), dz [T, 80] and one layer's packed weights w [20 K 4] and bias
// b [80] of hidden 20, staged as backward_mma_body.h stages them (rows of the backward's strides, NaN in what it
// does not write); returns z = x W^T + b [T, 80] (warp_gates) and dx = dz W [T, K] (warp_input_grads).
std::vector<at::Tensor> gate_products_tile(const at::Tensor& x, const at::Tensor& dz, const at::Tensor& w,
                                           const at::Tensor& b) {
  const int threads = int(x.size(0)), K = int(x.size(1)), H = MmaBackwardNet::kH;
  TORCH_CHECK(x.dim() == 2 && dz.dim() == 2 && dz.size(0) == threads && dz.size(1) == 4 * H && K <= 2 * H &&
              w.numel() == int64_t(4) * H * K && b.numel() == 4 * H && x.scalar_type() == at::kFloat &&
              dz.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat);
  TORCH_CHECK(threads == 32 || threads == 64 || threads == 128, "blocks of 32, 64 or 128 threads");
  constexpr int sx = MmaBackwardNet::kSx, sdz = MmaBackwardNet::kSdz;  // the 20 x 2 net's strides
  const int64_t x_size = int64_t(threads) * sx, dz_size = int64_t(threads) * sdz, w_size = w.numel() + b.numel();
  const at::Tensor xc = x.contiguous(), dzc = dz.contiguous(), wc = at::cat({w.flatten(), b.flatten()});
  at::Tensor z = at::empty({threads, 4 * H}, x.options()), dx = at::empty({threads, K}, x.options());
  run_grid(1, threads, (x_size + dz_size + w_size) * int64_t(sizeof(float)), [&](const EmuCtx& ctx, unsigned char* p) {
    float* sm = reinterpret_cast<float*>(p);
    float *xs = sm, *dzs = sm + x_size, *ws = sm + x_size + dz_size;
    const int t = ctx.thread(), warp_row = t / 32 * 32;
    if (t == 0) std::memcpy(ws, wc.data_ptr<float>(), size_t(w_size) * sizeof(float));
    float* my_x = xs + int64_t(t) * sx;
    for (int k = 0; k < K; ++k) my_x[k] = xc.data_ptr<float>()[t * K + k];
    my_x[K] = 1.0f;
    for (int k = K + 1; k < std::max((K + 4) / 4 * 4, (K + 7) / 8 * 8); ++k) my_x[k] = 0.0f;
    ctx.sync();
    warp_gates<0, sx, sdz>(ctx, ws, ws + w.numel(), K, xs + int64_t(warp_row) * sx, dzs + int64_t(warp_row) * sdz);
    ctx.sync_warp();
    for (int j = 0; j < 4 * H; ++j) z.data_ptr<float>()[t * 4 * H + j] = dzs[int64_t(t) * sdz + j];
    for (int j = 0; j < 4 * H; ++j) dzs[int64_t(t) * sdz + j] = dzc.data_ptr<float>()[t * 4 * H + j];
    ctx.sync_warp();
    warp_input_grads<0, sdz, sx>(ctx, ws, K, dzs + int64_t(warp_row) * sdz, xs + int64_t(warp_row) * sx);
    ctx.sync_warp();
    for (int k = 0; k < K; ++k) dx.data_ptr<float>()[t * K + k] = my_x[k];
  });
  return {z, dx};
}

// mma_tf32.h's round_tf32 (the host side of cvt.rna.tf32.f32) elementwise.
// (finite: round_tf32_finite, the integer rounding of the layer inputs)
at::Tensor round_tf32_tensor(const at::Tensor& x, bool finite) {
  at::Tensor out = x.to(at::kFloat).contiguous().clone();
  float* p = out.data_ptr<float>();
  for (int64_t i = 0; i < out.numel(); ++i) p[i] = finite ? round_tf32_finite(p[i]) : round_tf32(p[i]);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace l2l_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace l2l_fast::cuda;
  // pybind11 converts Python lists to std::vector, not to at::TensorList
  using Tensors = std::vector<at::Tensor>;
  using Moments = std::optional<at::Tensor>;
  m.def("lstm_step", [](const at::Tensor& grad, const at::Tensor& state, const Tensors& weights, double p, double s,
                        int64_t features, const Moments& moments, int64_t output) {
    return lstm_step<EmuLauncher>(grad, state, weights, p, s, features, moments, output);
  }, py::arg("grad"), py::arg("state"), py::arg("weights"), py::arg("preprocess_p"), py::arg("output_scale"),
        py::arg("features") = 1, py::arg("moments") = py::none(), py::arg("output") = 0);
  m.def("lstm_step_backward", [](const at::Tensor& gu, const at::Tensor& gs, const at::Tensor& grad, const at::Tensor& state,
                                 const Tensors& weights, double p, double s, int64_t features, const Moments& moments,
                                 int64_t output) {
    return lstm_step_backward<EmuLauncher>(gu, gs, grad, state, weights, p, s, features, moments, output);
  }, py::arg("grad_update"), py::arg("grad_new_state"), py::arg("grad"), py::arg("state"), py::arg("weights"),
        py::arg("preprocess_p"), py::arg("output_scale"), py::arg("features") = 1, py::arg("moments") = py::none(),
        py::arg("output") = 0);
  m.def("lstm_step_", [](at::Tensor param, const at::Tensor& grad, at::Tensor state, const Tensors& weights, double p,
                         double s, int64_t features, const Moments& moments, int64_t output) {
    lstm_step_<EmuLauncher>(param, grad, state, weights, p, s, features, moments, output);
  }, py::arg("param"), py::arg("grad"), py::arg("state"), py::arg("weights"), py::arg("preprocess_p"),
        py::arg("output_scale"), py::arg("features") = 1, py::arg("moments") = py::none(), py::arg("output") = 0);
  m.def("lstm_multi_step_", [](const Tensors& params, const Tensors& grads, at::Tensor state, const Tensors& weights,
                               double p, double s, int64_t features, const Moments& moments, int64_t output) {
    lstm_multi_step_<EmuLauncher>(params, grads, state, weights, p, s, features, moments, output);
  }, py::arg("params"), py::arg("grads"), py::arg("state"), py::arg("weights"), py::arg("preprocess_p"),
        py::arg("output_scale"), py::arg("features") = 1, py::arg("moments") = py::none(), py::arg("output") = 0);
  m.def("configure", &configure, py::arg("forward_threads"), py::arg("forward_blocks"), py::arg("backward_blocks"),
        py::arg("smem_limit"), py::arg("forward_smem_limit"), py::arg("mma_threads") = 64);
  m.def("warp_mma", &warp_mma, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("split3") = false);
  m.def("round_tf32", &round_tf32_tensor, py::arg("x"), py::arg("finite") = false);
  m.def("launches", [] { return settings.launches; });
  m.def("mma_launches", [] { return settings.mma_launches; });
  m.def("mma_backward_launches", [] { return settings.mma_backward_launches; });
  m.def("mma_gates_backward_launches", [] { return settings.mma_gates_backward_launches; });
  m.def("gate_products_tile", &gate_products_tile, py::arg("x"), py::arg("dz"), py::arg("w"), py::arg("b"));
  m.def("weight_grads_tile", &weight_grads_tile, py::arg("x"), py::arg("dz"), py::arg("G"), py::arg("mma"));
  m.def("packed_cache_counts", [] {
    const l2l_fast::PackedCacheStats s = l2l_fast::packed_cache_stats();
    return std::make_tuple(s.hits, s.misses, s.bypassed);
  });
  m.def("to_bf16", &to_bf16_bits);
  m.def("to_f16", &to_f16_bits);
  m.def("from_f16", &from_f16_bits);
}
