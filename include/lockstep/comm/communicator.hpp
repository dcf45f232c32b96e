#pragma once
// The Communicator interface: collectives over a fixed group of ranks, each returning a Work.
// Backends (MPI for CPU tensors, NCCL for CUDA tensors) differ only inside their own files.

#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <string>

#include "lockstep/comm/work.hpp"

namespace lockstep::comm {

// Min and Max over floating-point values, on the MPI communicator: NaN where any rank's value is NaN
// (as torch::minimum / torch::maximum), and -0 below +0, so every rank gets the same result whatever
// order the pairs meet in (Note [Min and max are symmetric]). NCCL's own kernels decide on the GPU.
enum class ReduceOp { Sum, Average, Min, Max, Product };
const char* to_string(ReduceOp op);  // "sum", "average", ...: for messages

// The timeout a Work's wait() uses when none is given: 600 s. LOCKSTEP_TIMEOUT_S (seconds) overrides it;
// inf, or anything past kMaxTimeout, means kMaxTimeout (no practical limit).
std::chrono::milliseconds default_timeout();

struct AllreduceOptions {
  ReduceOp op = ReduceOp::Sum;
};
struct BroadcastOptions {
  int root = 0;
};
struct AllgatherOptions {};
struct ReduceScatterOptions {
  ReduceOp op = ReduceOp::Sum;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "mpi", "nccl"

  // In place: every rank's `tensor` ends up holding the reduction over ranks.
  virtual WorkPtr allreduce(at::Tensor tensor, const AllreduceOptions& options = {}) = 0;
  // Out of place: `output` (same shape and dtype as `input`) receives the reduction; input is untouched.
  virtual WorkPtr allreduce(const at::Tensor& input, at::Tensor output, const AllreduceOptions& options = {}) = 0;
  // Every rank's `tensor` ends up holding the root's.
  virtual WorkPtr broadcast(at::Tensor tensor, const BroadcastOptions& options = {}) = 0;
  // `output` holds size() * input.numel() elements: rank r's input lands at [r * n, (r + 1) * n).
  // In place when `input` is exactly this rank's slice of `output`.
  virtual WorkPtr allgather(const at::Tensor& input, at::Tensor output, const AllgatherOptions& options = {}) = 0;
  // `input` holds size() * output.numel() elements; rank r receives the reduction of slice r.
  // In place when `output` is exactly this rank's slice of `input`.
  virtual WorkPtr reduce_scatter(const at::Tensor& input, at::Tensor output,
                                 const ReduceScatterOptions& options = {}) = 0;
  virtual WorkPtr barrier() = 0;

  // The timeout this communicator's Works wait with by default.
  virtual std::chrono::milliseconds timeout() const = 0;
};

using CommunicatorPtr = std::shared_ptr<Communicator>;

}  // namespace lockstep::comm
