#pragma once
// A world of one rank for single-process tests: every collective is already complete and leaves the
// tensors as they are (a sum or average over one rank), and the collectives are counted.

#include <ATen/ATen.h>

#include <chrono>
#include <string>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/work.hpp"

namespace lockstep::testing {

class SoloCommunicator final : public comm::Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "solo"; }
  std::chrono::milliseconds timeout() const override { return std::chrono::milliseconds(1000); }
  using Communicator::allreduce;
  comm::WorkPtr allreduce(at::Tensor, const comm::AllreduceOptions&) override { return done("allreduce"); }
  comm::WorkPtr allreduce(const at::Tensor& in, at::Tensor out, const comm::AllreduceOptions&) override {
    out.copy_(in);
    return done("allreduce");
  }
  comm::WorkPtr broadcast(at::Tensor, const comm::BroadcastOptions&) override { return done("broadcast"); }
  comm::WorkPtr allgather(const at::Tensor& in, at::Tensor out, const comm::AllgatherOptions&) override {
    out.copy_(in.reshape(out.sizes()));
    return done("allgather");
  }
  comm::WorkPtr reduce_scatter(const at::Tensor& in, at::Tensor out, const comm::ReduceScatterOptions&) override {
    out.copy_(in.reshape(out.sizes()));
    return done("reduce_scatter");
  }
  comm::WorkPtr barrier() override { return done("barrier"); }
  int allreduces = 0;

 private:
  comm::WorkPtr done(const char* op) {
    if (std::string(op) == "allreduce") ++allreduces;
    comm::WorkInfo info;
    info.op = op;
    return comm::completed_work(info);
  }
};

}  // namespace lockstep::testing
