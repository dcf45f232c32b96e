#pragma once
// Communication hooks: how DataParallel turns one bucket of this rank's gradients into the value
// every rank's gradients should take. The default averages in the bucket's own dtype; the 16-bit
// compression hooks halve the bytes on the wire. Users may supply their own (see CommHook).

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/work.hpp"

namespace lockstep::ddp {

// One bucket, as a communication hook sees it.
struct GradBucket {
  std::size_t index = 0;  // launch position: bucket 0 is launched first (Note [Bucket order])
  std::size_t count = 0;  // buckets in the current assignment
  // Flat and contiguous, one dtype and device: this rank's gradients of the bucket's parameters,
  // back to back. With gradient_as_bucket_view the parameters' .grad() are views into it.
  at::Tensor buffer;
  std::vector<std::string> parameter_names;
  std::vector<std::int64_t> offsets;  // where each parameter's gradient starts in `buffer` (elements)
  std::vector<std::int64_t> numels;
  std::vector<std::vector<std::int64_t>> sizes;  // each parameter's shape (hooks that reshape, e.g. PowerSGD)
  std::uint64_t iteration = 0;  // synchronised backward passes before this one

  bool is_last() const { return index + 1 == count; }
};

// A communication hook reduces one bucket. DataParallel calls it on the thread that runs backward,
// once per bucket per synchronised backward, in bucket order, which is the same on every rank.
// A hook must:
//   - issue the same collectives on every rank (same order, same sizes and dtypes);
//   - return a Work whose successful wait() leaves in `bucket.buffer` the value each gradient should
//     take (for data parallelism: the average over ranks). Post-processing such as casting back
//     belongs in comm::then(work, fn); fn runs on the thread that waits, at the end of backward,
//     bucket after bucket in bucket order on every rank, so fn may itself issue (and wait for) a
//     further collective (PowerSGD does: Note [PowerSGD collective order] in src/ddp/powersgd.cpp);
//   - not touch `bucket.buffer` after that Work completes (DataParallel reuses it).
// It may overwrite `bucket.buffer` before issuing: the local gradients are not needed afterwards.
// State (error feedback, counters) lives in whatever the std::function captures.
using CommHook = std::function<comm::WorkPtr(comm::Communicator& comm, const GradBucket& bucket)>;

// PowerSGD's low-rank compression with error feedback is in lockstep/ddp/powersgd.hpp.

// The default: divides by the world size, then all-reduces with a sum (dividing first keeps
// 16-bit gradients from overflowing in the sum).
CommHook allreduce_hook();

// Casts the bucket to float16 (after dividing by the world size), all-reduces the 16-bit copy and
// casts the result back into the bucket. Half the traffic; each value is rounded to 11 significant
// bits before and during the sum, and magnitudes below 6e-8 flush to zero.
CommHook fp16_compress_hook();

// As fp16_compress_hook with bfloat16: float32's range (no overflow, no flush), 8 significant bits.
CommHook bf16_compress_hook();

// What DataParallel compares across ranks at construction: "none (average)" for an empty hook; the
// name of a hook made above ("fp16_compress_hook", ...); for powersgd_hook() its name and every
// PowerSGDOptions field; for any other callable its type's name (two lambdas of one type that
// captured different values look alike: give their settings in DataParallelOptions::comm_hook_settings,
// which DataParallel compares too).
std::string describe_comm_hook(const CommHook& hook);

}  // namespace lockstep::ddp
