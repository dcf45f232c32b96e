#pragma once
// A Communicator that counts the collectives issued through it and forwards them to another: for
// tests that check how many collectives a feature issues (none in eval mode, one per step, ...).

#include <atomic>
#include <memory>
#include <string>
#include <utility>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::testing {

// Counts the collectives issued through it, and forwards them.
class CountingCommunicator : public lockstep::comm::Communicator {
 public:
  explicit CountingCommunicator(lockstep::comm::CommunicatorPtr inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  lockstep::comm::WorkPtr allreduce(at::Tensor t, const lockstep::comm::AllreduceOptions& o) override {
    ++calls;
    return inner_->allreduce(std::move(t), o);
  }
  lockstep::comm::WorkPtr allreduce(const at::Tensor& in, at::Tensor out,
                                    const lockstep::comm::AllreduceOptions& o) override {
    ++calls;
    return inner_->allreduce(in, std::move(out), o);
  }
  lockstep::comm::WorkPtr broadcast(at::Tensor t, const lockstep::comm::BroadcastOptions& o) override {
    ++calls;
    return inner_->broadcast(std::move(t), o);
  }
  lockstep::comm::WorkPtr allgather(const at::Tensor& in, at::Tensor out,
                                    const lockstep::comm::AllgatherOptions& o) override {
    ++calls;
    ++allgathers;
    return inner_->allgather(in, std::move(out), o);
  }
  lockstep::comm::WorkPtr reduce_scatter(const at::Tensor& in, at::Tensor out,
                                         const lockstep::comm::ReduceScatterOptions& o) override {
    ++calls;
    return inner_->reduce_scatter(in, std::move(out), o);
  }
  lockstep::comm::WorkPtr barrier() override {
    ++calls;
    return inner_->barrier();
  }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }

  std::atomic<int> calls{0};
  std::atomic<int> allgathers{0};

 private:
  lockstep::comm::CommunicatorPtr inner_;
};

}  // namespace lockstep::testing
