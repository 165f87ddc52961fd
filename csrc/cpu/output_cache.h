// Outputs as large as a state come from a small cache of freed blocks instead of a fresh mmap each call.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace l2l_fast {
namespace cpu {

// A contiguous tensor shaped and typed like `like`. Blocks of at least kCachedOutputBytes come from the
// cache (and return to it when the tensor dies); smaller ones from the default allocator.
at::Tensor empty_output_like(const at::Tensor& like);

// Frees every cached block that no tensor uses; returns the bytes released.
int64_t release_cached_outputs();

// Bytes held by the cache now, in blocks no tensor uses.
int64_t cached_output_bytes();

}  // namespace cpu
}  // namespace l2l_fast
