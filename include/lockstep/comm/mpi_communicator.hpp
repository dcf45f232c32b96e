#pragma once
// MpiCommunicator: collectives over OpenMPI, run in issue order on one background progress thread so
// the caller's computation goes on while they run. CPU tensors travel as they are; CUDA tensors are
// staged through pinned host memory (copied out when issued, copied back by the first wait(), on the
// waiting thread's current stream), so single-GPU and mixed set-ups work without NCCL.

#include <chrono>
#include <memory>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::comm {

struct MpiCommunicatorOptions {
  // How long wait() waits by default; 0 means comm::default_timeout().
  std::chrono::milliseconds timeout{0};
  // Note [Checked collectives]: before each collective the ranks all-gather what they are about to do
  // (operation, reduction, dtype, element count, root) and, where they differ, every rank raises the
  // same error naming each rank's call, and none runs it, instead of garbage (float16 against
  // bfloat16, Sum against Average), "message truncated" or a hang. One small extra all-gather per
  // collective: for debugging, as PyTorch's TORCH_DISTRIBUTED_DEBUG=DETAIL. Also turned on by the
  // environment variable LOCKSTEP_CHECK_COLLECTIVES=1.
  bool check_collectives = false;
};

class MpiCommunicator final : public Communicator {
 public:
  // Duplicates MPI_COMM_WORLD (so its traffic never mixes with the user's). MPI must be initialised
  // with MPI_THREAD_MULTIPLE (lockstep::Runtime does so); otherwise this throws.
  explicit MpiCommunicator(MpiCommunicatorOptions options = {});
  ~MpiCommunicator() override;

  int rank() const override;
  int size() const override;
  std::string backend() const override { return "mpi"; }
  std::chrono::milliseconds timeout() const override;

  using Communicator::allreduce;
  WorkPtr allreduce(at::Tensor tensor, const AllreduceOptions& options = {}) override;
  WorkPtr allreduce(const at::Tensor& input, at::Tensor output, const AllreduceOptions& options = {}) override;
  WorkPtr broadcast(at::Tensor tensor, const BroadcastOptions& options = {}) override;
  WorkPtr allgather(const at::Tensor& input, at::Tensor output, const AllgatherOptions& options = {}) override;
  WorkPtr reduce_scatter(const at::Tensor& input, at::Tensor output,
                         const ReduceScatterOptions& options = {}) override;
  WorkPtr barrier() override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lockstep::comm
