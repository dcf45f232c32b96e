#pragma once
// Which parameters share a bucket: a pure function, so it can be tested alone and so every rank,
// given the same inputs, computes the same buckets (Note [Bucket order]).

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lockstep::ddp {

using BucketAssignment = std::vector<std::vector<std::size_t>>;  // bucket -> parameter indices

// Groups `parameters` (by index) into buckets, visiting them in `order` (a permutation of the
// indices, expected gradient-ready order first). Parameters of one dtype and device fill one open
// bucket until it holds at least its cap in bytes: `first_cap_bytes` for the first bucket of each
// dtype and device, `cap_bytes` after it (a cap of 0 gives every parameter its own bucket). The
// buckets come back sorted by where their first parameter stands in `order`: that is the launch order.
BucketAssignment assign_buckets(const std::vector<at::Tensor>& parameters, const std::vector<std::size_t>& order,
                                std::int64_t first_cap_bytes, std::int64_t cap_bytes);

// n-1, n-2, ..., 0: the usual guess at gradient-ready order, since backward visits the layers
// registered last first.
std::vector<std::size_t> reverse_order(std::size_t n);

// Caps in MiB (as the options give them) to bytes; negative caps are an error.
std::int64_t cap_bytes_from_mb(double mb, const char* option);

}  // namespace lockstep::ddp
