// The split of a coordinate range into chunks and the threads that run them. Free of torch, so that
// tests/run_chunks_harness.cpp compiles it alone.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <utility>
#include <vector>

namespace l2l_fast {
namespace cpu {

// At least this many coordinates per thread (about 3 ms of work, against ~50 us to start a thread);
// smaller problems stay on the calling thread.
constexpr int64_t kMinCoordinatesPerThread = 16384;

// How run_chunks starts a helper thread. Its one other user is the test harness, which makes a chosen start
// throw as std::thread does when the system is out of threads or memory.
struct StartThread {
  template <typename Fn>
  std::thread operator()(Fn&& fn) const {
    return std::thread(std::forward<Fn>(fn));
  }
};

// Runs work(c) for c in [0, chunks), chunks >= 1: chunk 0 on the calling thread, each other one on a helper
// thread. Not at::parallel_for: ATen's OpenMP backend is inlined into the extension, which is built without
// -fopenmp, so it silently ran every chunk on one thread (measured: no speed-up from 2 threads).
//
// A helper that cannot be started (std::system_error, e.g. EAGAIN under a thread or address-space limit) is
// no failure: its chunk and the later ones run on the calling thread, after chunk 0. A chunk's result depends
// on its range alone (the callers combine per-chunk results in chunk order), never on the thread that ran
// it, so the output is the same bit for bit. Every started thread is joined before this returns or throws.
// An exception from a chunk, on any thread, is kept per chunk; the first in chunk order is rethrown once all
// chunks ran (one escaping a helper's function would otherwise std::terminate the process).
template <typename Work, typename Start = StartThread>
void run_chunks(int64_t chunks, const Work& work, const Start& start = Start()) {
  // Allocated before any thread starts: a bad_alloc here leaves nothing running.
  std::vector<std::exception_ptr> failures(static_cast<size_t>(chunks));
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<size_t>(chunks - 1));  // push_back below cannot throw
  const auto run = [&work, &failures](int64_t c) noexcept {
    try {
      work(c);
    } catch (...) {
      failures[static_cast<size_t>(c)] = std::current_exception();
    }
  };
  int64_t next = 1;  // the first chunk without a helper
  for (; next < chunks; ++next) {
    try {
      helpers.push_back(start([&run, next] { run(next); }));
    } catch (...) {
      break;  // out of threads or memory: a next try would fail as well
    }
  }
  run(0);
  for (int64_t c = next; c < chunks; ++c) run(c);
  for (std::thread& helper : helpers) helper.join();
  for (const std::exception_ptr& failure : failures)
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

}  // namespace cpu
}  // namespace l2l_fast
