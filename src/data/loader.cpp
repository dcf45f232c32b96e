#include "lockstep/data/loader.hpp"

#include "lockstep/core/device.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

Loader::Loader(DatasetPtr dataset, std::shared_ptr<ShardedSampler> sampler, LoaderOptions options)
    : dataset_(std::move(dataset)), sampler_(std::move(sampler)), options_(options) {
  LOCKSTEP_CHECK(dataset_ != nullptr, "Loader: dataset is null");
  LOCKSTEP_CHECK(sampler_ != nullptr, "Loader over ", dataset_->description(), ": sampler is null");
  LOCKSTEP_CHECK(options_.batch_size > 0, "Loader over ", dataset_->description(), ": batch size must be positive");
  LOCKSTEP_CHECK(sampler_->dataset_size() == dataset_->size(), "Loader over ", dataset_->description(),
                 ": the sampler was built for ", sampler_->dataset_size(), " samples but the dataset has ",
                 dataset_->size());
  LOCKSTEP_CHECK(!options_.pin_device || (options_.pin_device->is_cuda() && options_.pin_device->has_index()),
                 "Loader over ", dataset_->description(), ": pin_device must be a CUDA device cuda:N, got ",
                 *options_.pin_device);
}

Loader::~Loader() { halt(); }

Example Loader::assemble(size_t b) const {
  Example example = dataset_->get_batch(plan_[b]);
  if (options_.pin_memory) {
    // Only host tensors are pinned: a dataset that already returns GPU tensors (data kept on the
    // device) passes them through, where pin_memory() would throw.
    const auto pin = [](at::Tensor& t) {
      if (t.defined() && t.device().is_cpu() && !t.is_pinned()) t = t.pin_memory();
    };
    pin(example.data);
    pin(example.target);
  }
  return example;
}

size_t Loader::batches_per_epoch() const {
  return sampler_->batches_per_epoch(options_.batch_size, options_.drop_last_batch);
}

void Loader::start_epoch(int64_t epoch) {
  halt();
  sampler_->set_epoch(epoch);
  launch();
}

void Loader::load_state(const SamplerState& state) {
  halt();
  sampler_->load_state(state);
  launch();
}

void Loader::launch() {
  // Reseeding happens here, with no thread running (the contract of Dataset::set_epoch).
  dataset_->set_epoch(sampler_->epoch());
  plan_.clear();
  const std::vector<int64_t>& indices = sampler_->indices();
  for (size_t start = sampler_->position(); start < indices.size(); start += options_.batch_size) {
    const size_t end = std::min(start + options_.batch_size, indices.size());
    if (end - start < options_.batch_size && options_.drop_last_batch) break;
    plan_.emplace_back(indices.begin() + static_cast<std::ptrdiff_t>(start),
                       indices.begin() + static_cast<std::ptrdiff_t>(end));
  }
  consumed_ = 0;
  expected_ = sampler_->state();
  stop_ = false;
  producer_done_ = false;
  // Note [Pinning thread's device]: a thread starts on CUDA device 0, and pinning memory there would
  // open a context on GPU 0 for each rank of a node (hundreds of MiB each; refused in exclusive-process
  // mode): the worker takes options_.pin_device (the trainer's GPU), or else the caller's current
  // device, as PyTorch's pin-memory thread does.
  pin_device_ = !options_.pin_memory ? std::nullopt : options_.pin_device ? options_.pin_device : current_cuda_device();
  if (options_.prefetch > 0) worker_ = std::thread([this] { produce(); });
  // Last: a launch that threw (no thread to start: EAGAIN) is tried again by the next next(), rather
  // than left waiting for a producer that never started.
  launched_ = true;
}

void Loader::halt() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  not_full_.notify_all();
  // A batch being assembled cannot be interrupted; join waits for it and then the thread sees stop_.
  if (worker_.joinable()) worker_.join();
  queue_.clear();
  launched_ = false;
}

void Loader::produce() {
  for (size_t b = 0; b < plan_.size(); ++b) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      not_full_.wait(lock, [this] { return stop_ || queue_.size() < options_.prefetch; });
      if (stop_) return;
    }
    Slot slot;
    try {
      // Note [Pinning thread's device]; inside the try: an error leaving the thread would end the process.
      if (b == 0 && pin_device_) set_current_cuda_device(*pin_device_);
      slot.example = assemble(b);
    } catch (...) {
      slot.error = std::current_exception();
    }
    const bool failed = static_cast<bool>(slot.error);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(slot));
      if (failed) producer_done_ = true;
    }
    not_empty_.notify_one();
    if (failed) return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    producer_done_ = true;
  }
  not_empty_.notify_one();
}

void Loader::consume(size_t batch_length) {
  const SamplerState now = sampler_->state();
  LOCKSTEP_CHECK(now.epoch == expected_.epoch && now.position == expected_.position, "Loader over ",
                 dataset_->description(), ": the sampler moved to epoch ", now.epoch, " position ", now.position,
                 " behind the loader's back (expected epoch ", expected_.epoch, " position ", expected_.position,
                 "); use Loader::start_epoch or Loader::load_state instead");
  sampler_->next_batch(batch_length);
  expected_ = sampler_->state();
}

std::optional<Example> Loader::next() {
  if (!launched_) launch();
  if (consumed_ >= plan_.size()) return std::nullopt;

  if (options_.prefetch == 0) {
    // As with a thread: a batch that failed fails again on every later call until start_epoch or
    // load_state (which clear the queue), rather than being assembled again (a transient read error
    // would then let the epoch go on as if nothing had been lost).
    if (!queue_.empty() && queue_.front().error) std::rethrow_exception(queue_.front().error);
    Example example;
    try {
      // Note [Pinning thread's device]: on the caller's thread here, which pins on pin_device as the
      // worker would, and gets its own device back.
      struct DeviceBack {
        std::optional<c10::Device> previous;
        ~DeviceBack() {
          try {
            if (previous) set_current_cuda_device(*previous);
          } catch (...) {  // a destructor must not throw (maybe unwinding assemble()'s error)
          }
        }
      } back;
      if (pin_device_) {
        const std::optional<c10::Device> current = current_cuda_device();
        if (current && *current != *pin_device_) {
          set_current_cuda_device(*pin_device_);
          back.previous = current;
        }
      }
      example = assemble(consumed_);
    } catch (...) {
      Slot failed;
      failed.error = std::current_exception();
      queue_.push_back(std::move(failed));
      throw;
    }
    consume(plan_[consumed_].size());
    ++consumed_;
    return example;
  }

  Slot slot;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    not_empty_.wait(lock, [this] { return !queue_.empty() || producer_done_; });
    // The producer stops after an error, so an empty queue here means it already reported one.
    LOCKSTEP_CHECK(!queue_.empty(), "Loader over ", dataset_->description(), ": background thread ended early");
    if (queue_.front().error) std::rethrow_exception(queue_.front().error);  // stays queued: next() rethrows again
    slot = std::move(queue_.front());
    queue_.pop_front();
  }
  not_full_.notify_one();
  consume(plan_[consumed_].size());
  ++consumed_;
  return std::move(slot.example);
}

Loader::Iterator::Iterator(Loader* loader) : loader_(loader) {
  if (loader_) current_ = loader_->next();
}

Loader::Iterator& Loader::Iterator::operator++() {
  current_ = loader_->next();
  return *this;
}

}  // namespace data
}  // namespace lockstep
