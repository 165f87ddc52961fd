// What the CPU bindings share: the active kernels by scalar type, and the split of a coordinate range
// over std::threads.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "cpu/isa_select.h"

namespace l2l_fast {
namespace cpu {

// At least this many coordinates per thread (about 3 ms of work, against ~50 us to start a thread);
// smaller problems stay on the calling thread.
constexpr int64_t kMinCoordinatesPerThread = 16384;

// Runs work(c) for c in [0, chunks) on `chunks` threads (the caller's among them).
// Not at::parallel_for: ATen's OpenMP backend is inlined into the extension, which is built without
// -fopenmp, so it silently ran every chunk on one thread (measured: no speed-up from 2 threads).
template <typename Work>
void run_chunks(int64_t chunks, const Work& work) {
  std::vector<std::thread> helpers;
  for (int64_t c = 1; c < chunks; ++c) helpers.emplace_back([&work, c] { work(c); });
  std::exception_ptr failure;
  try {
    work(0);
  } catch (...) {
    failure = std::current_exception();
  }
  for (std::thread& helper : helpers) helper.join();
  if (failure) std::rethrow_exception(failure);
}

// Splits [0, n) into at most `max_chunks` ranges whose bounds are multiples of `tile`.
inline std::vector<int64_t> chunk_bounds(int64_t n, int64_t tile, int64_t max_chunks) {
  const int64_t tiles = (n + tile - 1) / tile;
  const int64_t by_size = std::max<int64_t>(1, n / kMinCoordinatesPerThread);
  const int64_t chunks = std::max<int64_t>(1, std::min({max_chunks, tiles, by_size}));
  std::vector<int64_t> bounds;
  for (int64_t c = 0; c <= chunks; ++c) bounds.push_back(std::min(n, (tiles * c / chunks) * tile));
  return bounds;
}

// The active instruction set's kernels for scalar type T.
template <typename T>
struct TypedKernels;

template <>
struct TypedKernels<float> {
  static auto forward(const CpuKernels& k) { return k.forward_f32; }
  static auto backward(const CpuKernels& k) { return k.backward_f32; }
  static int64_t tile(const CpuKernels& k) { return k.tile_f32; }
};

template <>
struct TypedKernels<double> {
  static auto forward(const CpuKernels& k) { return k.forward_f64; }
  static auto backward(const CpuKernels& k) { return k.backward_f64; }
  static int64_t tile(const CpuKernels& k) { return k.tile_f64; }
};

}  // namespace cpu
}  // namespace l2l_fast
