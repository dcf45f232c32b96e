#include "lockstep/ddp/comm_hooks.hpp"

#include <ATen/ATen.h>

#include "lockstep/core/error.hpp"

namespace lockstep::ddp {

namespace {

CommHook compress_hook(at::ScalarType wire_type, const char* name) {
  return [wire_type, name](comm::Communicator& comm, const GradBucket& bucket) -> comm::WorkPtr {
    const at::Tensor& buffer = bucket.buffer;
    LOCKSTEP_CHECK(at::isFloatingType(buffer.scalar_type()), name, " compresses floating-point gradients; bucket ",
                   bucket.index, " holds ", buffer.scalar_type(), " (rank ", comm.rank(), ")");
    // Divide while still wide, so that the 16-bit copy holds the per-rank share and the sum of
    // shares cannot exceed the largest gradient magnitude.
    buffer.div_(comm.size());
    if (buffer.scalar_type() == wire_type) return comm.allreduce(buffer);
    at::Tensor wire = buffer.to(wire_type);
    comm::WorkPtr work = comm.allreduce(wire);
    return comm::then(std::move(work), [buffer, wire] { buffer.copy_(wire); });
  };
}

}  // namespace

CommHook allreduce_hook() {
  return [](comm::Communicator& comm, const GradBucket& bucket) -> comm::WorkPtr {
    if (comm.size() > 1) bucket.buffer.div_(comm.size());  // at one rank: a pass over the bucket for nothing
    return comm.allreduce(bucket.buffer);
  };
}

CommHook fp16_compress_hook() { return compress_hook(at::kHalf, "fp16_compress_hook"); }
CommHook bf16_compress_hook() { return compress_hook(at::kBFloat16, "bf16_compress_hook"); }

}  // namespace lockstep::ddp
