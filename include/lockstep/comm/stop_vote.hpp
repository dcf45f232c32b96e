#pragma once
// StopVote: lets any one rank end a loop that every rank runs in lockstep (a signal that reached one
// node, a time limit, a user's request) so that every rank leaves after the same step, with no host
// synchronisation per step. Each step every rank posts a code (0: carry on); the codes of all ranks
// come back `lag` posts later, the same on every rank.
//
// Cost per post: one all-gather of one int32 per rank. On the CPU (and over MPI) the vote is a host
// tensor whose all-gather has long finished when it is read. Over NCCL it lives on the GPU: the
// all-gather is ordered on the current stream like the step's kernels, its result copied to pinned
// memory without blocking, and read `lag` posts later, once an event says the copy is done (so the
// host never runs more than `lag` steps ahead of the GPU, and never waits for a step in flight).

#include <c10/core/Device.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::comm {

class StopVote {
 public:
  // `device`: where the loop's work runs (the vote follows it onto a GPU when `comm` is NCCL).
  StopVote(CommunicatorPtr comm, c10::Device device, int lag = 2);
  // Does not wait for votes in flight (a rank that leaves by an exception must not hang here); their
  // buffers stay alive until the communicator is done with them.
  ~StopVote();
  StopVote(const StopVote&) = delete;
  StopVote& operator=(const StopVote&) = delete;

  // Collective. Posts this rank's code and returns, indexed by rank, the codes posted `lag` posts ago,
  // or an empty vector for the first `lag` posts.
  std::vector<std::int32_t> post(std::int32_t code);
  // Collective: waits for the votes still in flight and returns, per rank, the first non-zero code
  // among them (0 where none). The vote can be posted to again afterwards.
  std::vector<std::int32_t> finish();

  int lag() const { return lag_; }

 private:
  struct Pending;
  std::vector<std::int32_t> read(Pending& pending);

  CommunicatorPtr comm_;
  c10::Device device_;
  bool on_device_ = false;  // NCCL with a GPU: the vote's tensors live on the device
  int lag_;
  std::deque<std::unique_ptr<Pending>> pending_;
};

}  // namespace lockstep::comm
