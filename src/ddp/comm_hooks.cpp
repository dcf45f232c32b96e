#include "lockstep/ddp/comm_hooks.hpp"

#include <ATen/ATen.h>
#include <c10/util/Type.h>

#include <sstream>

#include "lockstep/core/error.hpp"
#include "lockstep/ddp/powersgd.hpp"

namespace lockstep::ddp {

namespace {

// Named callables rather than lambdas: describe_comm_hook() tells them apart by type and reads the
// wire dtype back (two lambdas from one function share a type whatever they captured).
struct CompressHook {
  at::ScalarType wire_type;
  const char* name;

  comm::WorkPtr operator()(comm::Communicator& comm, const GradBucket& bucket) const {
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
  }
};

struct AllreduceHook {
  comm::WorkPtr operator()(comm::Communicator& comm, const GradBucket& bucket) const {
    if (comm.size() > 1) bucket.buffer.div_(comm.size());  // at one rank: a pass over the bucket for nothing
    return comm.allreduce(bucket.buffer);
  }
};

}  // namespace

CommHook allreduce_hook() { return AllreduceHook{}; }

CommHook fp16_compress_hook() { return CompressHook{at::kHalf, "fp16_compress_hook"}; }
CommHook bf16_compress_hook() { return CompressHook{at::kBFloat16, "bf16_compress_hook"}; }

std::string describe_comm_hook(const CommHook& hook) {
  if (!hook) return "none (average)";
  if (hook.target<AllreduceHook>() != nullptr) return "allreduce_hook";
  if (const auto* compress = hook.target<CompressHook>()) return compress->name;
  if (std::shared_ptr<PowerSGDState> state = powersgd_state_of(hook)) {
    // Every option shapes the collectives or the values summed (Q is drawn from the seed, or warm
    // started, identically on every rank), so ranks that differ in any would corrupt the gradients.
    const PowerSGDOptions& o = state->options();
    std::ostringstream os;
    os.precision(17);
    os << "powersgd_hook (matrix_approximation_rank " << o.matrix_approximation_rank << ", start_iteration "
       << o.start_iteration << ", min_compression_rate " << o.min_compression_rate << ", use_error_feedback "
       << o.use_error_feedback << ", warm_start " << o.warm_start << ", orthogonalization_epsilon "
       << o.orthogonalization_epsilon << ", seed " << o.seed << ")";
    return os.str();
  }
  return c10::demangle(hook.target_type().name());
}

}  // namespace lockstep::ddp
