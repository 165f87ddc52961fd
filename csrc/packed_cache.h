// The packed weights of the last few weight versions, so that the ops pack a weight list once per
// version instead of at every call (a meta-training step packed twice per step and unroll: forward
// and backward; the optimizer at every parameter step).
//
// Key, per weight tensor: its TensorImpl*, data pointer, sizes, strides and version counter; then
// the layout (sizes, features), dtype, device and the stream the packed tensor is used on. Every
// in-place torch op on a weight (optimizer steps, load_state_dict's copy_, `with torch.no_grad():
// w.add_(1)`) bumps its version, so the next call misses and packs the new values.
//
// THE HAZARD: a write that does not bump w's version: through `w.data` (a tensor with its own
// version counter), through aliases made outside autograd (numpy / DLPack views, at::from_blob), by
// C++ code below the autograd dispatch keys. torch.autograd.gradcheck perturbs its inputs that way.
// So the bindings guard against it where they can:
//   - CPU (verify = true): a hit is confirmed by comparing the weights with the bytes they were
//     packed from (a memcmp of 21 KB for the paper's net, far cheaper than packing); such writes
//     are seen. Weights that are not contiguous are not cached.
//   - CUDA: that comparison would need a host synchronisation, so a hit trusts the version
//     counter; calls that autograd records for the weights (grad mode on and a weight requiring
//     grad: gradcheck's perturbed forwards, meta-training forwards) pack without the cache. After
//     a write through `w.data` to CUDA weights, call l2l_fast._C.clear_packed_cache(), or write
//     under `with torch.no_grad(): w.copy_(...)` instead.
//
// An entry pins what its key points at, so that no other tensor can take those addresses while it
// is cached: a weak reference to each TensorImpl (its memory stays allocated; a strong one would
// also keep alive the autograd graph of a weight computed by other ops) and a strong reference to
// each storage. LRU of kDefaultPackedCacheCapacity entries; entries of dead tensors are dropped first.
//
// Never cached (the caller packs directly): inference tensors (they have no version counter); CUDA
// calls while the current stream captures a graph (the binding decides): a graph must replay the
// packing from the weights' memory of replay time (weights updated in place between replays), and
// a packed tensor allocated during capture lives in the graph's private pool, its contents written
// only by replays, so it must never be handed to an eager call. Entries are per stream, so a packed
// tensor is only read on the stream that wrote it (no cross-stream race, and the caching
// allocator's stream-ordered reuse stays safe after eviction).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

#include "lstm_layout.h"

namespace l2l_fast {

constexpr int64_t kDefaultPackedCacheCapacity = 16;

// The packed weights for `weights` (validated, one dtype and device) with `layout`: the cached tensor
// when this very weight version was packed before for the same layout and stream (and, with verify,
// still holds the same bytes), else pack() (then cached). stream: an id of the stream the result is
// used on (0 on the CPU). use_cache false: pack(), nothing cached.
at::Tensor packed_weights(at::TensorList weights, const PackedLayout& layout, int64_t stream, bool use_cache,
                          bool verify, const std::function<at::Tensor()>& pack);

struct PackedCacheStats {
  int64_t hits = 0;
  int64_t misses = 0;     // packed and cached
  int64_t stale = 0;      // of the misses: the key matched but the bytes had changed (verify)
  int64_t bypassed = 0;   // packed without the cache (inference tensors, graph capture, recorded by
                          // autograd on CUDA, not contiguous on the CPU, capacity 0)
  int64_t entries = 0;
  int64_t capacity = 0;
};

PackedCacheStats packed_cache_stats();
// Drops every entry (and zeroes the counters).
void clear_packed_cache();
// Entries kept at most; 0 turns the cache off. Returns the previous capacity.
int64_t set_packed_cache_capacity(int64_t entries);

}  // namespace l2l_fast
