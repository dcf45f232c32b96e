#include "lockstep/comm/stop_vote.hpp"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <thread>

#include "lockstep/core/error.hpp"

namespace lockstep::comm {

struct StopVote::Pending {
  WorkPtr work;
  at::Tensor input, output;  // the all-gather's; output on the host, or on the device when on_device_
  at::Tensor host;           // on_device_: pinned copy of output
  std::optional<c10::Event> copied;
};

StopVote::StopVote(CommunicatorPtr comm, c10::Device device, int lag)
    : comm_(std::move(comm)), device_(device), lag_(lag) {
  LOCKSTEP_CHECK(comm_ != nullptr, "StopVote: the communicator is null");
  LOCKSTEP_CHECK(lag_ >= 1, "StopVote: lag must be >= 1, got ", lag_);
  // Over MPI a host tensor needs no device at all; a CUDA one would be staged through host memory.
  on_device_ = device_.is_cuda() && comm_->backend() == "nccl";
}

StopVote::~StopVote() = default;

std::vector<std::int32_t> StopVote::post(std::int32_t code) {
  auto pending = std::make_unique<Pending>();
  const auto options = at::TensorOptions().dtype(at::kInt).device(on_device_ ? device_ : c10::Device(c10::kCPU));
  pending->input = at::full({1}, code, options);
  pending->output = at::empty({comm_->size()}, options);
  pending->work = comm_->allgather(pending->input, pending->output);
  if (on_device_) {
    // Stream-ordered: the current stream waits for the all-gather (the host does not), then copies
    // the codes to pinned memory behind the kernels already queued, and marks the copy with an event.
    pending->work->wait();
    pending->host = at::empty({comm_->size()}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    pending->host.copy_(pending->output, /*non_blocking=*/true);
    const c10::impl::VirtualGuardImpl guard(device_.type());
    pending->copied.emplace(device_.type());
    pending->copied->record(guard.getStream(device_));
  }
  pending_.push_back(std::move(pending));
  if (static_cast<int>(pending_.size()) <= lag_) return {};
  std::unique_ptr<Pending> oldest = std::move(pending_.front());
  pending_.pop_front();
  return read(*oldest);
}

std::vector<std::int32_t> StopVote::read(Pending& pending) {
  at::Tensor codes;
  if (on_device_) {
    // `lag` posts later the copy is normally long done; if the GPU is that far behind, the host
    // waits here for it (LibTorch 1.13's c10::Event has query() but no synchronize()). A failed
    // all-gather (the communicator aborted it: a timeout, a dead peer) lets the stream drain, and
    // the copy then completes with codes nobody wrote: its error is raised instead, and is looked
    // for while waiting too, in case the stream does not drain.
    // Yields first, then sleeps (up to 1 ms a round): a GPU far behind must not cost a core spinning
    // on cudaEventQuery, which the loader's threads and the MPI progress thread need.
    std::chrono::microseconds pause(0);
    for (int round = 0; !pending.copied->query(); ++round) {
      if (pending.work->is_completed()) pending.work->wait();  // raises a failure, else returns at once
      if (round < 64) {
        std::this_thread::yield();
      } else {
        pause = std::min(std::chrono::microseconds(1000), std::max(std::chrono::microseconds(20), pause * 2));
        std::this_thread::sleep_for(pause);
      }
    }
    // The copy ran after the all-gather's end, so the Work is complete: wait() raises its error, if any.
    if (pending.work->is_completed()) pending.work->wait();
    codes = pending.host;
  } else {
    pending.work->wait();
    codes = pending.output;
  }
  const auto* data = codes.data_ptr<std::int32_t>();
  return std::vector<std::int32_t>(data, data + codes.numel());
}

std::vector<std::int32_t> StopVote::finish() {
  std::vector<std::int32_t> first(static_cast<std::size_t>(comm_->size()), 0);
  while (!pending_.empty()) {
    std::unique_ptr<Pending> oldest = std::move(pending_.front());
    pending_.pop_front();
    const std::vector<std::int32_t> codes = read(*oldest);
    for (std::size_t r = 0; r < first.size(); ++r) {
      if (first[r] == 0) first[r] = codes[r];
    }
  }
  return first;
}

}  // namespace lockstep::comm
