#pragma once
// Loader: batches of one rank's shard, assembled ahead of time by a background thread so that reading
// and augmentation overlap the training step.
// Note [Loader position]: the sampler advances only when a batch is *consumed* by next(), never when it
// is prefetched, so sampler->state() (and Loader::state()) always says exactly which samples training
// has seen; a checkpoint written between steps resumes at the next unseen batch. The background thread
// works from its own copy of the epoch's indices and never touches the sampler.

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "lockstep/data/dataset.hpp"
#include "lockstep/data/sharded_sampler.hpp"

namespace lockstep {
namespace data {

struct LoaderOptions {
  size_t batch_size = 32;
  // Batches kept ready ahead of the consumer; 0 assembles each batch inside next() (no thread).
  size_t prefetch = 2;
  // Skip the epoch's last batch when it is shorter than batch_size.
  bool drop_last_batch = false;
  // Batches come out in page-locked (pinned) memory, so that a copy to the GPU with non_blocking=true
  // is asynchronous. Needs CUDA (LibTorch's pinned allocator); the trainer sets it for CUDA devices.
  // Only host tensors are pinned: a dataset's GPU tensors pass through as they are.
  bool pin_memory = false;
  // The CUDA device the pinning thread makes current (Note [Pinning thread's device]): the training
  // device (the trainer sets it); unset, the device current for the thread that starts an epoch.
  std::optional<c10::Device> pin_device;
};

class Loader {
 public:
  Loader(DatasetPtr dataset, std::shared_ptr<ShardedSampler> sampler, LoaderOptions options = {});
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // Rewinds to the start of `epoch` (sampler and dataset reseeded) and starts prefetching.
  void start_epoch(int64_t epoch);
  // The next batch of the epoch, or nullopt at its end (until start_epoch). Rethrows an exception raised
  // while assembling the batch. Called before any start_epoch, it continues from the sampler's state.
  std::optional<Example> next();

  // Epoch and samples consumed (Note [Loader position]).
  SamplerState state() const { return sampler_->state(); }
  // Continues from a saved state: the batches a run that never stopped would have produced next.
  void load_state(const SamplerState& state);

  size_t batches_per_epoch() const;
  const LoaderOptions& options() const { return options_; }
  const DatasetPtr& dataset() const { return dataset_; }
  const std::shared_ptr<ShardedSampler>& sampler() const { return sampler_; }

  // Range-for over the rest of the current epoch: `for (auto& batch : loader)`.
  class Iterator {
   public:
    explicit Iterator(Loader* loader);
    Example& operator*() { return *current_; }
    Example* operator->() { return &*current_; }
    Iterator& operator++();
    bool operator!=(const Iterator& other) const { return current_.has_value() != other.current_.has_value(); }

   private:
    Loader* loader_;
    std::optional<Example> current_;
  };
  Iterator begin() { return Iterator(this); }
  Iterator end() { return Iterator(nullptr); }

 private:
  struct Slot {
    Example example;
    std::exception_ptr error;
  };

  // Snapshots the sampler's remaining indices into batches and, with prefetch > 0, starts the thread.
  void launch();
  // Stops and joins the thread and drops prefetched batches.
  void halt();
  void produce();
  // Batch b of plan_, pinned when options_.pin_memory.
  Example assemble(size_t b) const;
  // Advances the sampler past a consumed batch, checking nobody else moved it.
  void consume(size_t batch_length);

  DatasetPtr dataset_;
  std::shared_ptr<ShardedSampler> sampler_;
  LoaderOptions options_;

  bool launched_ = false;
  std::vector<std::vector<int64_t>> plan_;  // this epoch's remaining batches, from the launch position
  size_t consumed_ = 0;                     // batches of plan_ handed out by next()
  SamplerState expected_;                   // sampler state after the last consumed batch

  std::mutex mutex_;
  std::condition_variable not_full_;
  std::condition_variable not_empty_;
  std::deque<Slot> queue_;
  bool stop_ = false;
  bool producer_done_ = false;
  std::thread worker_;
  std::optional<c10::Device> pin_device_;  // the worker's CUDA device, when it pins (Note [Pinning thread's device])
};

}  // namespace data
}  // namespace lockstep
