#include "lockstep/data/sharded_sampler.hpp"

#include <algorithm>
#include <numeric>

#include "data/splitmix.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

ShardedSampler::ShardedSampler(size_t dataset_size, int world_size, int rank, ShardedSamplerOptions options)
    : dataset_size_(dataset_size), world_size_(world_size), rank_(rank), options_(options) {
  LOCKSTEP_CHECK(world_size >= 1, "ShardedSampler: world size must be >= 1, got ", world_size);
  LOCKSTEP_CHECK(rank >= 0 && rank < world_size, "ShardedSampler: rank ", rank, " is outside the world of ",
                 world_size, " ranks");
  LOCKSTEP_CHECK(dataset_size > 0, "ShardedSampler on rank ", rank, ": the dataset is empty");
  const auto ranks = static_cast<size_t>(world_size);
  per_rank_ = options_.drop_last ? dataset_size / ranks : (dataset_size + ranks - 1) / ranks;
  LOCKSTEP_CHECK(per_rank_ > 0, "ShardedSampler on rank ", rank, ": drop_last with ", dataset_size, " samples over ",
                 world_size, " ranks leaves every rank without samples; expected at least ", world_size, " samples");
  set_epoch(0);
}

void ShardedSampler::set_epoch(int64_t epoch) {
  LOCKSTEP_CHECK(epoch >= 0, "ShardedSampler on rank ", rank_, ": epoch must be >= 0, got ", epoch);
  std::vector<int64_t> order(dataset_size_);
  std::iota(order.begin(), order.end(), int64_t{0});
  if (options_.shuffle) {
    // Fisher-Yates driven by (seed, epoch) only: identical on every rank (Note [Sharded epoch order]).
    detail::SplitMix64 rng(detail::stream_seed(detail::Domain::Shuffle, options_.seed, static_cast<uint64_t>(epoch)));
    for (size_t i = dataset_size_ - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  }
  const size_t total = total_size();
  indices_.clear();
  indices_.reserve(per_rank_);
  // Entry k of the padded epoch is order[k mod N]: wrap-around padding, repeated when N < world size.
  for (size_t k = static_cast<size_t>(rank_); k < total; k += static_cast<size_t>(world_size_)) {
    indices_.push_back(order[k % dataset_size_]);
  }
  epoch_ = epoch;
  position_ = 0;
}

std::vector<int64_t> ShardedSampler::next_batch(size_t batch_size) {
  LOCKSTEP_CHECK(batch_size > 0, "ShardedSampler on rank ", rank_, ": batch size must be positive");
  const size_t count = std::min(batch_size, remaining());
  std::vector<int64_t> batch(indices_.begin() + static_cast<std::ptrdiff_t>(position_),
                             indices_.begin() + static_cast<std::ptrdiff_t>(position_ + count));
  position_ += count;
  return batch;
}

size_t ShardedSampler::batches_per_epoch(size_t batch_size, bool drop_last_batch) const {
  LOCKSTEP_CHECK(batch_size > 0, "ShardedSampler on rank ", rank_, ": batch size must be positive");
  return drop_last_batch ? per_rank_ / batch_size : (per_rank_ + batch_size - 1) / batch_size;
}

SamplerState ShardedSampler::state() const { return {epoch_, static_cast<int64_t>(position_)}; }

void ShardedSampler::load_state(const SamplerState& state) {
  LOCKSTEP_CHECK(state.position >= 0 && static_cast<size_t>(state.position) <= per_rank_, "ShardedSampler on rank ",
                 rank_, ": saved position ", state.position, " is outside this rank's epoch of ", per_rank_,
                 " samples (was the checkpoint written with another dataset size or world size?)");
  set_epoch(state.epoch);
  position_ = static_cast<size_t>(state.position);
}

}  // namespace data
}  // namespace lockstep
