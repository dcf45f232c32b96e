#pragma once
// GradBuckets built by hand, to call a communication hook directly (without a model or a Reducer)
// on gradients a test chose.

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lockstep/ddp/comm_hooks.hpp"

namespace lockstep::testing {

// A bucket holding copies of `grads` back to back (all of one dtype), named `names`.
inline ddp::GradBucket make_bucket(const std::vector<at::Tensor>& grads, const std::vector<std::string>& names,
                                   std::uint64_t iteration = 0, std::size_t index = 0, std::size_t count = 1) {
  ddp::GradBucket bucket;
  bucket.index = index;
  bucket.count = count;
  bucket.iteration = iteration;
  std::vector<at::Tensor> flat;
  std::int64_t offset = 0;
  for (std::size_t k = 0; k < grads.size(); ++k) {
    flat.push_back(grads[k].reshape({-1}));
    bucket.parameter_names.push_back(names[k]);
    bucket.offsets.push_back(offset);
    bucket.numels.push_back(grads[k].numel());
    bucket.sizes.push_back(grads[k].sizes().vec());
    offset += grads[k].numel();
  }
  bucket.buffer = at::cat(flat).contiguous();
  return bucket;
}

// The k-th gradient of `bucket`, shaped like it was (a view of the buffer).
inline at::Tensor gradient_of(const ddp::GradBucket& bucket, std::size_t k) {
  return bucket.buffer.narrow(0, bucket.offsets[k], bucket.numels[k]).view(bucket.sizes[k]);
}

}  // namespace lockstep::testing
