// run_chunks (csrc/cpu/chunks.h) under helper threads that cannot be started or that throw; built and run by
// tests/test_thread_start_failure.py.
//
//   run_chunks_harness CHUNKS FAIL_START THROWING...
//
// Runs CHUNKS chunks; the FAIL_START-th helper start (1-based; 0: none) throws std::system_error(EAGAIN), as
// std::thread does when the system is out of threads; chunk c in THROWING throws std::runtime_error("chunk c"),
// chunk 1 after the others (so the first exception in time is not the first in chunk order). Prints one JSON
// object: per chunk how often it ran and whether on the calling thread, the helper starts tried, and what
// run_chunks rethrew (null: nothing). The process aborts (std::terminate) where run_chunks loses a thread.
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "cpu/chunks.h"

namespace {

struct FailingStart {
  int fail_at;
  int* tries;
  template <typename Fn>
  std::thread operator()(Fn&& fn) const {
    if (++*tries == fail_at) throw std::system_error(EAGAIN, std::generic_category(), "thread start (harness)");
    return std::thread(std::forward<Fn>(fn));
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const int chunks = std::atoi(argv[1]), fail_at = std::atoi(argv[2]);
  std::set<int> throwing;
  for (int k = 3; k < argc; ++k) throwing.insert(std::atoi(argv[k]));
  std::vector<std::atomic<int>> ran(chunks);
  std::vector<std::atomic<int>> on_caller(chunks);
  const std::thread::id caller = std::this_thread::get_id();
  const auto work = [&](int64_t c) {
    ran[c] += 1;
    on_caller[c] += std::this_thread::get_id() == caller;
    if (!throwing.count(int(c))) return;
    if (c == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    throw std::runtime_error("chunk " + std::to_string(c));
  };
  int tries = 0;
  std::string rethrown = "null";
  try {
    l2l_fast::cpu::run_chunks(chunks, work, FailingStart{fail_at, &tries});
  } catch (const std::exception& e) {
    rethrown = std::string("\"") + e.what() + "\"";
  }
  std::printf("{\"ran\": [");
  for (int c = 0; c < chunks; ++c) std::printf("%s%d", c ? ", " : "", ran[c].load());
  std::printf("], \"on_caller\": [");
  for (int c = 0; c < chunks; ++c) std::printf("%s%d", c ? ", " : "", on_caller[c].load());
  std::printf("], \"tries\": %d, \"rethrown\": %s}\n", tries, rethrown.c_str());
  return 0;
}
