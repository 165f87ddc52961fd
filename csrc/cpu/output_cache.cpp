// A fresh output of hundreds of MB is a new mmap that the kernel faults in and zeroes page by page on
// first touch, in every call: at N = 1e6 the forward took 193 ms against 88 ms for the in-place step
// that moves the same bytes, and allocating + filling 320 MB took 78 ms against 17 ms for refilling a
// block already mapped. So large outputs come from a cache of freed blocks, as the CUDA caching
// allocator does for device memory: a block returns to the cache when its tensor dies and is reused for
// the next output of a size it fits (at most twice as large). The cache keeps at most
// L2L_FAST_CPU_CACHE_MB MB (default 2048; 0 turns it off) of unused blocks; release_cached_outputs()
// (l2l_fast.ops.empty_cpu_cache()) gives them back to the system.
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace l2l_fast {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kCachedOutputBytes = size_t(8) << 20;  // below this glibc's heap already reuses blocks

size_t cache_limit_from_env() {
  const char* text = std::getenv("L2L_FAST_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return size_t(2048) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && mb >= 0,
              "L2L_FAST_CPU_CACHE_MB: expected a whole number of MB >= 0, got '", text, "'");
  return size_t(mb) << 20;
}

class BlockCache final : public c10::Allocator {
 public:
  BlockCache() : limit_(cache_limit_from_env()) {}

  c10::DataPtr allocate(size_t bytes) override {
    void* block = take(bytes);
    return {block, block, &BlockCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enabled() const { return limit_ > 0; }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t released = int64_t(free_bytes_);
    for (auto& entry : free_) {
      sizes_.erase(entry.second);
      std::free(entry.second);
    }
    free_.clear();
    free_bytes_ = 0;
    return released;
  }

  int64_t free_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return int64_t(free_bytes_);
  }

  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive static teardown
    return *cache;
  }

 private:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto fit = free_.lower_bound(bytes);  // the smallest free block that holds `bytes`
      if (fit != free_.end() && fit->first <= 2 * bytes) {
        void* block = fit->second;
        free_bytes_ -= fit->first;
        free_.erase(fit);
        return block;
      }
    }
    const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* block = std::aligned_alloc(kHugePage, size);
    if (block == nullptr) throw std::bad_alloc();
#ifdef __linux__
    // huge pages: ~500x fewer faults on the first touch; ignored where THP is off
    madvise(block, size, MADV_HUGEPAGE);
#endif
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[block] = size;
    return block;
  }

  static void give_back(void* block) { instance().put(block); }

  void put(void* block) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t size = sizes_.at(block);
    if (free_bytes_ + size > limit_) {  // over the limit: this block goes back to the system
      sizes_.erase(block);
      std::free(block);
      return;
    }
    free_.emplace(size, block);
    free_bytes_ += size;
  }

  const size_t limit_;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;         // unused blocks by size
  std::unordered_map<void*, size_t> sizes_;   // every block the cache made, in use or not
  size_t free_bytes_ = 0;
};

}  // namespace

at::Tensor empty_output_like(const at::Tensor& like) {
  BlockCache& cache = BlockCache::instance();
  if (!cache.enabled() || size_t(like.nbytes()) < kCachedOutputBytes)
    return at::empty_like(like, at::MemoryFormat::Contiguous);
  return at::detail::empty_generic(like.sizes(), &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), at::MemoryFormat::Contiguous);
}

int64_t release_cached_outputs() { return BlockCache::instance().release(); }

int64_t cached_output_bytes() { return BlockCache::instance().free_bytes(); }

}  // namespace cpu
}  // namespace l2l_fast
