#pragma once
// ShardedSampler: which sample indices this rank visits in an epoch, with the semantics of PyTorch's
// DistributedSampler. Note [Sharded epoch order]: every rank computes the same permutation of
// [0, dataset_size) from (seed, epoch) alone with Lockstep's own generator (not torch's global one, so other
// random draws cannot shift it), extends it by wrapping around to a multiple of the world size (or cuts
// it down, with drop_last), and takes every world_size-th entry starting at its rank. So within an
// epoch the ranks' slices are disjoint, equally long, and together cover every sample (plus the padding).
// The sampler has a position in its slice that can be saved and restored, so a resumed run continues
// mid-epoch exactly where it stopped.

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lockstep {
namespace data {

struct ShardedSamplerOptions {
  // Permute each epoch; false visits 0, 1, 2, ... (still strided over ranks).
  bool shuffle = true;
  // false: pad by wrapping around so every rank gets ceil(N / world_size) samples;
  // true: drop the tail so every rank gets floor(N / world_size).
  bool drop_last = false;
  uint64_t seed = 0;
};

struct SamplerState {
  int64_t epoch = 0;
  int64_t position = 0;  // samples of this rank's slice already handed out this epoch
};

class ShardedSampler {
 public:
  // Starts at epoch 0, position 0. Throws when the arguments leave a rank without samples.
  ShardedSampler(size_t dataset_size, int world_size, int rank, ShardedSamplerOptions options = {});

  // Generates the epoch's slice and rewinds to its start.
  void set_epoch(int64_t epoch);
  // The next min(batch_size, remaining()) indices of the slice; empty at the end of the epoch.
  std::vector<int64_t> next_batch(size_t batch_size);

  // Samples per rank per epoch (the slice length).
  size_t per_rank() const { return per_rank_; }
  // per_rank() * world_size(): the padded (or cut) epoch length over all ranks.
  size_t total_size() const { return per_rank_ * static_cast<size_t>(world_size_); }
  size_t batches_per_epoch(size_t batch_size, bool drop_last_batch) const;
  // This rank's slice for the current epoch, in visiting order.
  const std::vector<int64_t>& indices() const { return indices_; }
  size_t position() const { return position_; }
  size_t remaining() const { return per_rank_ - position_; }

  SamplerState state() const;
  // Jumps to (epoch, position): the same indices a run that never stopped would hand out next.
  void load_state(const SamplerState& state);

  int64_t epoch() const { return epoch_; }
  size_t dataset_size() const { return dataset_size_; }
  int world_size() const { return world_size_; }
  int rank() const { return rank_; }
  const ShardedSamplerOptions& options() const { return options_; }

 private:
  size_t dataset_size_;
  int world_size_;
  int rank_;
  ShardedSamplerOptions options_;
  size_t per_rank_ = 0;
  int64_t epoch_ = 0;
  size_t position_ = 0;
  std::vector<int64_t> indices_;
};

}  // namespace data
}  // namespace lockstep
