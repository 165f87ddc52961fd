// The cache of packed weights (packed_cache.h): a small LRU list under one mutex. Packing runs
// outside the lock, so two threads missing on the same key both pack; the later insert replaces
// the earlier one.
#include "packed_cache.h"

#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

namespace l2l_fast {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// What identifies one weight tensor's values.
struct WeightKey {
  const c10::TensorImpl* impl;
  const void* data;
  int64_t version;
  std::vector<int64_t> sizes, strides;

  bool operator==(const WeightKey& o) const {
    return impl == o.impl && data == o.data && version == o.version && sizes == o.sizes && strides == o.strides;
  }
};

struct Key {
  std::vector<WeightKey> weights;
  int hidden, layers;
  uint32_t features;
  at::ScalarType dtype;
  at::Device device = at::kCPU;
  int64_t stream;

  bool operator==(const Key& o) const {
    return weights == o.weights && hidden == o.hidden && layers == o.layers && features == o.features &&
           dtype == o.dtype && device == o.device && stream == o.stream;
  }
};

struct Entry {
  Key key;
  std::vector<WeakImpl> impls;         // pin the TensorImpl addresses, not the tensors' autograd graphs
  std::vector<c10::Storage> storages;  // pin the data addresses
  std::vector<char> values;            // with verification: the weights' bytes when packed, in list order
  at::Tensor packed;

  bool alive() const {
    return std::none_of(impls.begin(), impls.end(), [](const WeakImpl& w) { return w.expired(); });
  }
};

struct Cache {
  std::mutex mutex;
  std::list<std::shared_ptr<const Entry>> entries;  // most recently used first
  int64_t capacity = kDefaultPackedCacheCapacity;
  PackedCacheStats stats;
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: ops may run during interpreter shutdown
  return *instance;
}

Key key_of(at::TensorList weights, const PackedLayout& layout, int64_t stream) {
  Key key{{}, layout.hidden, layout.layers, layout.features, weights[0].scalar_type(), weights[0].device(), stream};
  key.weights.reserve(weights.size());
  for (const at::Tensor& w : weights)
    key.weights.push_back(WeightKey{w.unsafeGetTensorImpl(), w.data_ptr(),
                                    int64_t(w.unsafeGetTensorImpl()->version_counter().current_version()),
                                    w.sizes().vec(), w.strides().vec()});
  return key;
}

// Inference tensors have no version counter: a change could never be seen. Verification reads the
// weights as flat bytes: contiguous host tensors only.
bool cacheable(at::TensorList weights, bool verify) {
  return std::none_of(weights.begin(), weights.end(), [&](const at::Tensor& w) {
    return w.is_inference() || (verify && (!w.device().is_cpu() || !w.is_contiguous()));
  });
}

std::vector<char> values_of(at::TensorList weights) {
  std::vector<char> values;
  for (const at::Tensor& w : weights) {
    const char* from = static_cast<const char*>(w.data_ptr());
    values.insert(values.end(), from, from + w.nbytes());
  }
  return values;
}

bool same_values(at::TensorList weights, const std::vector<char>& values) {
  size_t at = 0;
  for (const at::Tensor& w : weights) {
    const size_t bytes = w.nbytes();
    if (at + bytes > values.size() || std::memcmp(w.data_ptr(), values.data() + at, bytes) != 0) return false;
    at += bytes;
  }
  return at == values.size();
}

}  // namespace

at::Tensor packed_weights(at::TensorList weights, const PackedLayout& layout, int64_t stream, bool use_cache,
                          bool verify, const std::function<at::Tensor()>& pack) {
  Cache& c = cache();
  if (!use_cache || !cacheable(weights, verify)) {
    {
      std::lock_guard<std::mutex> lock(c.mutex);
      ++c.stats.bypassed;
    }
    return pack();
  }
  Key key = key_of(weights, layout, stream);
  std::shared_ptr<const Entry> found;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
      if ((*it)->key == key && (*it)->alive()) {
        found = *it;
        c.entries.splice(c.entries.begin(), c.entries, it);
        break;
      }
    }
  }
  // outside the lock: the comparison reads the caller's tensors
  if (found && (!verify || same_values(weights, found->values))) {
    std::lock_guard<std::mutex> lock(c.mutex);
    ++c.stats.hits;
    return found->packed;
  }
  auto entry = std::make_shared<Entry>();
  entry->key = std::move(key);
  if (verify) entry->values = values_of(weights);  // before packing: a value written meanwhile makes it miss
  entry->packed = pack();
  for (const at::Tensor& w : weights) {
    entry->impls.emplace_back(w.getIntrusivePtr());
    entry->storages.push_back(w.storage());
  }
  // Evicted entries are released after the lock: dropping the last reference to a tensor may run
  // deleters that take other locks (the GIL among them).
  std::list<std::shared_ptr<const Entry>> evicted;
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.capacity <= 0) {
    ++c.stats.bypassed;
    return entry->packed;
  }
  ++c.stats.misses;
  if (found) ++c.stats.stale;
  for (auto it = c.entries.begin(); it != c.entries.end();) {
    auto next = std::next(it);
    if (!(*it)->alive() || (*it)->key == entry->key) evicted.splice(evicted.end(), c.entries, it);
    it = next;
  }
  c.entries.push_front(entry);
  while (int64_t(c.entries.size()) > c.capacity) evicted.splice(evicted.end(), c.entries, std::prev(c.entries.end()));
  return entry->packed;
}

PackedCacheStats packed_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  PackedCacheStats stats = c.stats;
  stats.entries = int64_t(c.entries.size());
  stats.capacity = c.capacity;
  return stats;
}

void clear_packed_cache() {
  Cache& c = cache();
  std::list<std::shared_ptr<const Entry>> dropped;  // released outside the lock: deleters may take other locks
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    dropped.swap(c.entries);
    c.stats = PackedCacheStats{};
  }
}

int64_t set_packed_cache_capacity(int64_t entries) {
  TORCH_CHECK_VALUE(entries >= 0, "entries: expected a non-negative number of cache entries, got ", entries);
  Cache& c = cache();
  std::list<std::shared_ptr<const Entry>> dropped;
  std::lock_guard<std::mutex> lock(c.mutex);
  const int64_t previous = c.capacity;
  c.capacity = entries;
  while (int64_t(c.entries.size()) > c.capacity) {
    dropped.splice(dropped.begin(), c.entries, std::prev(c.entries.end()));
  }
  return previous;
}

}  // namespace l2l_fast
