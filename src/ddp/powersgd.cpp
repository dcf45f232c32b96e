#include "lockstep/ddp/powersgd.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/serialize/archive.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <sstream>

#include "lockstep/comm/agree.hpp"
#include "core/exception_text.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::ddp {

// Note [PowerSGD collective order]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// PowerSGD needs two all-reduces per bucket, the second (Q) computed from the result of the first (P).
// The hook issues P's and returns comm::then(work, finish); finish orthogonalises, issues Q's all-reduce
// and waits for it. finish runs on the thread that first waits on the bucket's Work, and that is the
// reducer at the end of backward: Reducer::finish_backward issues the flags all-reduce and the buffer
// broadcast, then waits the buckets' Works strictly in bucket order (Note [Bucket order]) on every
// rank. So every rank issues, in one synchronised backward,
//     P_0, P_1, ..., P_{B-1}   (during backward, in bucket order: Note [Bucket order], point 2)
//     flags, broadcast(s)      (finish_backward, before any wait)
//     Q_0, Q_1, ..., Q_{B-1}   (finish_backward's waits, in bucket order)
// and whether a bucket has a Q all-reduce at all depends only on shapes and options, which all ranks
// share. Collectives match by issue order, so this is safe. It relies on nobody waiting a bucket's Work
// earlier at a rank-dependent moment (e.g. "whichever finished first"); Reducer::finish_backward says so.
// The alternative, waiting for P inside the hook, would be as safe but would stall backward at every
// bucket; this way the P all-reduces overlap the rest of backward and only the Q rounds (a fraction of
// P's size for square-ish matrices plus the small matrix products) are exposed at the end. The
// continuation uses the Communicator it was given by reference: the reducer holds it for longer.
//
// Note [PowerSGD state keys]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// Residuals and warm-start Qs are kept per parameter name, not per bucket: the reducer rebuilds its
// buckets once, after the first synchronised backward (Note [Bucket order], point 1), which is before
// the default start_iteration (10) but not before start_iteration 0 or 1, and a parameter's state must
// follow it into its new bucket. An entry whose shape, rank, dtype or device no longer matches is
// started afresh (zero residual, new Q). Between the hook and its continuation an entry's `error` holds
// this step's input M (residual added) so that the residual M - M' needs no extra copy; an entry still
// marked in flight when the next step reaches it belongs to a step that never finished (an error ended
// it) and is reset rather than trusted.
//
// Note [PowerSGD residuals read during a step]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// error() may be called from another thread while a backward runs (a monitor, a logger). The hook and
// its continuation write an entry's residual outside the state's mutex (holding it through the matrix
// products would serialise buckets for nothing), so an entry is marked in flight under the mutex at the
// moment a step takes it, before any write, and unmarked only after the continuation's last write, with
// release order; error() reads the mark under the mutex, with acquire order, and returns nothing for
// an entry in flight. It therefore returns a residual as one step left it, never a half-written one
// (formerly the mark was set only after the hook had added M into the residual).
//
// Note [PowerSGD degenerate state]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Warm start feeds each step's Q into the next, so a Q column that is 0 stays 0 for good: a gradient
// that is 0 for one step (a parameter unused in that step under find_unused_parameters, a masked
// layer) gives P = 0, Q = 0, and from then on an approximation of rank < r, down to nothing, while the
// residual grows without bound. A NaN or inf (an fp16 overflow step, which GradScaler skips) does the
// same with NaN, and the residual would carry it into every later step. (As far as we know, PyTorch's
// hook guards against neither.) So a warm-start Q column that is 0 or not finite is replaced by a fresh
// random one, on the device; and a matrix's residual is reset to 0 when its P or Q was not finite,
// which an inf or NaN anywhere in M makes them (that step's result is not finite then either, so
// nothing that was applied is lost). Testing P and Q (n r + m r values) rather than the residual
// (n m) keeps it cheap: a pass of nan_to_num_ over the residuals cost the wide-MLP benchmark 15% of
// its step. For CPU tensors the test is read on the host (free); on other devices it stays there, as
// a masked fill, so that the host does not wait for the device. The step with the bad gradient still
// returns its NaN/inf, as the 16-bit hooks do, for GradScaler to see.
//
// Note [PowerSGD checkpoints]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~
// What a later step depends on, besides the gradients: each entry's residual (each rank its own) and
// warm-start Q (the same on every rank after its all-reduce, but saved per rank so that nothing rests
// on that), and the iteration, which decides whether a bucket is compressed yet (start_iteration) and
// which random Q a fresh draw gives (seed, name, iteration). The iteration is the reducer's count of
// synchronised backward passes, and a resumed run has a new reducer counting from 0; so a restored
// state counts on from the saved count instead: the first bucket after restore_state() takes the
// saved next iteration, and later ones keep the same offset to GradBucket::iteration. Stats are
// restored too, so that they describe the whole run. Everything else is derived from shapes and
// options, which must therefore match: matrix_approximation_rank and min_compression_rate decide
// which matrices are compressed and Q's width, use_error_feedback and warm_start what the saved
// tensors mean, so restore_state() refuses a change of any of them, and of the world size (a rank
// cannot take over another's residual, and there is no meaningful way to split or merge them). A
// changed start_iteration, seed or epsilon leaves the saved tensors meaningful (the run is then another
// one, deliberately), so those are allowed. Restored entries are checked against the model's parameters
// when the caller passes them (the trainer does), and in any case when a step first meets them: a
// restored entry whose shape or rank does not match is an error, never silently replaced by a fresh
// one as an ordinary entry would be (Note [PowerSGD state keys]). A different device or dtype (a resume
// on a GPU, another precision) only moves the values. Each rank serialises its state to one string (a
// torch::serialize archive), gather_strings() collects them on the writing rank one broadcast per rank,
// so no other rank ever holds more than one rank's residuals, and the Checkpointer writes them as
// byte tensors: world size x the compressed gradients' bytes per checkpoint.

struct PowerSGDState::Entry {
  std::vector<std::int64_t> sizes;
  std::int64_t rank = 0;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  at::Tensor error;  // n x m; the input M while in flight
  at::Tensor q;      // m x r: the last step's averaged Q (warm start)
  // Note [PowerSGD residuals read during a step]: set under the state's mutex when a step takes the
  // entry (entry_for), cleared by the step's continuation after its last write (release), read under the
  // mutex (acquire) by error() before it touches `error`.
  std::atomic<bool> in_flight{false};
  bool restored = false;  // from restore_state(), not yet met by a step (Note [PowerSGD checkpoints])
};

struct PowerSGDState::Step {
  struct Matrix {
    std::shared_ptr<Entry> entry;
    at::Tensor m;      // n x m in the compute dtype: a view of `work`; receives P Q^T
    at::Tensor input;  // M plus the residual: the entry's `error` with error feedback, else m
    at::Tensor out;    // n x m in the bucket's dtype: a view of the bucket buffer (== m without a cast)
    at::Tensor p;      // n x r view of p_flat
    at::Tensor q;      // m x r view of q_flat
  };
  struct Part {
    std::int64_t offset = 0, numel = 0, flat_offset = 0;
  };

  PowerSGDOptions options;
  int world = 1;
  at::Tensor buffer, work;
  at::Tensor p_flat, q_flat;  // [uncompressed part / world | P_0 | P_1 ...], [Q_0 | Q_1 ...]
  std::vector<Part> uncompressed;
  std::vector<Matrix> matrices;

  void finish(comm::Communicator& comm);
};

namespace {

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Q for one parameter and iteration: the same on every rank, whatever order the draws happen in.
at::Tensor draw_q(std::uint64_t seed, const std::string& name, std::uint64_t iteration, std::int64_t m, std::int64_t r,
                  const at::TensorOptions& options) {
  at::Generator generator =
      at::detail::createCPUGenerator(splitmix64(seed ^ splitmix64(comm::fingerprint(name) ^ splitmix64(iteration))));
  // Drawn on the CPU so that every device type gets the same numbers from the same seed. For a GPU
  // through pinned memory and a non-blocking copy: from pageable memory the copy would wait for
  // everything queued on the stream, a host synchronisation in every bucket's hook (the caching host
  // allocator keeps the pinned block until the copy has run).
  const at::Tensor q = at::randn({m, r}, generator, options.device(at::kCPU));
  if (!options.device().is_cuda()) return q;
  return q.pin_memory().to(options.device(), /*non_blocking=*/true);
}

at::ScalarType compute_type(at::ScalarType bucket_type) {
  return bucket_type == at::kHalf || bucket_type == at::kBFloat16 ? at::kFloat : bucket_type;
}

// The format of one rank's serialised state (Note [PowerSGD checkpoints]).
constexpr std::int64_t kStateVersion = 1;

struct PowerSGDHook {
  std::shared_ptr<PowerSGDState> state;
  comm::WorkPtr operator()(comm::Communicator& comm, const GradBucket& bucket) const {
    return state->reduce(comm, bucket);
  }
};

std::string describe_shape(const std::vector<std::int64_t>& sizes) {
  std::ostringstream os;
  os << at::IntArrayRef(sizes);
  return os.str();
}

}  // namespace

void validate(const PowerSGDOptions& o) {
  LOCKSTEP_CHECK(o.matrix_approximation_rank >= 1, "PowerSGD: matrix_approximation_rank must be >= 1, got ",
                 o.matrix_approximation_rank);
  LOCKSTEP_CHECK(std::isfinite(o.min_compression_rate) && o.min_compression_rate >= 1.0,
                 "PowerSGD: min_compression_rate must be a finite number >= 1 (below 1 a matrix would be sent "
                 "compressed although that takes more bytes), got ",
                 o.min_compression_rate);
  LOCKSTEP_CHECK(std::isfinite(o.orthogonalization_epsilon) && o.orthogonalization_epsilon >= 0.0,
                 "PowerSGD: orthogonalization_epsilon must be a finite number >= 0, got ", o.orthogonalization_epsilon);
}

std::int64_t compressed_rank(const std::vector<std::int64_t>& sizes, const PowerSGDOptions& options) {
  if (sizes.size() < 2) return 0;
  const std::int64_t n = sizes[0];
  std::int64_t m = 1;
  for (std::size_t d = 1; d < sizes.size(); ++d) m *= sizes[d];
  if (n <= 0 || m <= 0) return 0;
  const std::int64_t r = std::min({n, m, options.matrix_approximation_rank});
  const double compressed = static_cast<double>(n + m) * static_cast<double>(r) * options.min_compression_rate;
  return compressed < static_cast<double>(n) * static_cast<double>(m) ? r : 0;
}

namespace {
double machine_epsilon(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::epsilon());
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::epsilon());
    default: return std::numeric_limits<float>::epsilon();
  }
}
}  // namespace

void orthogonalize_columns(const at::Tensor& matrix, double epsilon) {
  LOCKSTEP_CHECK(matrix.dim() == 2, "orthogonalize_columns expects a matrix, got a tensor of shape ", matrix.sizes());
  LOCKSTEP_CHECK(std::isfinite(epsilon) && epsilon >= 0.0, "orthogonalize_columns: epsilon must be >= 0, got ",
                 epsilon);
  const std::int64_t r = matrix.size(1);
  // A column left with less than this share of its norm once the earlier columns' parts are removed
  // lay in their span (a matrix of rank below r): what is left is rounding noise, which normalised
  // would be a unit vector far from orthogonal to the earlier columns. sqrt(machine epsilon).
  const double kept_share = std::sqrt(machine_epsilon(matrix.scalar_type()));
  const at::Tensor floors = matrix.norm(2, {0}) * kept_share;
  for (std::int64_t i = 0; i < r; ++i) {
    at::Tensor column = matrix.narrow(1, i, 1);
    // On the device, without reading the norm back: a column at or below its floor (a zero one
    // included) is divided by infinity and becomes 0; a tiny one by its norm (|entries| <= norm, so
    // nothing overflows).
    at::Tensor norm = column.norm();
    column.div_(at::where(norm > floors[i], norm + epsilon, std::numeric_limits<double>::infinity()));
    if (i + 1 < r) {
      at::Tensor rest = matrix.narrow(1, i + 1, r - i - 1);
      rest.sub_(at::mm(column, at::mm(column.t(), rest)));
    }
  }
}

// ---- PowerSGDState ----

PowerSGDState::PowerSGDState(PowerSGDOptions options) : options_(options) { validate(options_); }

PowerSGDStats PowerSGDState::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

at::Tensor PowerSGDState::error(const std::string& parameter_name) const {
  std::lock_guard<std::mutex> lock(mutex_);
  // Note [PowerSGD residuals read during a step]
  auto it = entries_.find(parameter_name);
  if (it == entries_.end() || it->second->in_flight.load(std::memory_order_acquire) || !it->second->error.defined()) {
    return {};
  }
  return it->second->error.clone();
}

void PowerSGDState::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  entries_.clear();
}

void PowerSGDState::rescale_residuals(double factor) {
  LOCKSTEP_CHECK(std::isfinite(factor) && factor >= 0.0, "PowerSGDState::rescale_residuals: factor must be a finite "
                 "number >= 0, got ", factor);
  at::NoGradGuard no_grad;
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [name, entry] : entries_) {
    if (!entry->error.defined()) continue;
    if (factor == 0.0) {
      entry->error.zero_();
    } else {
      entry->error.mul_(factor);
    }
  }
}

std::uint64_t PowerSGDState::iteration_of(const GradBucket& bucket) {
  // Note [PowerSGD checkpoints]
  std::lock_guard<std::mutex> lock(mutex_);
  if (offset_pending_) {
    iteration_offset_ = static_cast<std::int64_t>(next_iteration_) - static_cast<std::int64_t>(bucket.iteration);
    offset_pending_ = false;
  }
  const auto iteration = static_cast<std::uint64_t>(static_cast<std::int64_t>(bucket.iteration) + iteration_offset_);
  next_iteration_ = std::max(next_iteration_, iteration + 1);
  return iteration;
}

std::shared_ptr<PowerSGDState::Entry> PowerSGDState::entry_for(const std::string& name,
                                                               const std::vector<std::int64_t>& sizes,
                                                               std::int64_t rank, const at::TensorOptions& options) {
  // Note [PowerSGD state keys]
  std::lock_guard<std::mutex> lock(mutex_);
  std::shared_ptr<Entry>& entry = entries_[name];
  if (entry && entry->restored) {
    // Note [PowerSGD checkpoints]: checked, not silently started afresh.
    LOCKSTEP_CHECK(entry->sizes == sizes && entry->rank == rank, "PowerSGD: the state restored for parameter '", name,
                   "' is for a gradient of shape ", describe_shape(entry->sizes), " compressed at rank ", entry->rank,
                   ", but this step reduces one of shape ", describe_shape(sizes), " at rank ", rank,
                   ": the checkpoint was written for another model or other PowerSGD options");
    const at::ScalarType dtype = options.dtype().toScalarType();
    if (entry->error.defined()) entry->error = entry->error.to(options.device(), dtype);
    if (entry->q.defined()) entry->q = entry->q.to(options.device(), dtype);
    entry->dtype = dtype;
    entry->device = options.device();
    entry->restored = false;
    entry->in_flight.store(true, std::memory_order_relaxed);  // Note [PowerSGD residuals read during a step]
    return entry;
  }
  if (!entry || entry->in_flight || entry->sizes != sizes || entry->rank != rank ||
      entry->dtype != options.dtype().toScalarType() || entry->device != options.device()) {
    entry = std::make_shared<Entry>();
    entry->sizes = sizes;
    entry->rank = rank;
    entry->dtype = options.dtype().toScalarType();
    entry->device = options.device();
  }
  entry->in_flight.store(true, std::memory_order_relaxed);  // Note [PowerSGD residuals read during a step]
  return entry;
}

comm::WorkPtr PowerSGDState::reduce(comm::Communicator& comm, const GradBucket& bucket) {
  const at::Tensor& buffer = bucket.buffer;
  const int rank = comm.rank();
  const std::size_t count = bucket.numels.size();
  LOCKSTEP_CHECK(buffer.defined() && at::isFloatingType(buffer.scalar_type()),
                 "powersgd_hook compresses floating-point gradients; bucket ", bucket.index, " holds ",
                 buffer.defined() ? std::string(c10::toString(buffer.scalar_type())) : std::string("nothing"),
                 " (rank ", rank, ")");
  LOCKSTEP_CHECK(buffer.dim() == 1 && buffer.is_contiguous(), "powersgd_hook: bucket ", bucket.index,
                 " must be a flat, contiguous buffer; found shape ", buffer.sizes(), " (rank ", rank, ")");
  LOCKSTEP_CHECK(
      bucket.parameter_names.size() == count && bucket.offsets.size() == count && bucket.sizes.size() == count,
      "powersgd_hook: bucket ", bucket.index, " lists ", count, " numels but ", bucket.parameter_names.size(),
      " names, ", bucket.offsets.size(), " offsets and ", bucket.sizes.size(),
      " shapes; PowerSGD needs every parameter's shape (GradBucket::sizes) (rank ", rank, ")");
  at::NoGradGuard no_grad;
  const std::uint64_t iteration = iteration_of(bucket);

  if (iteration < options_.start_iteration) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.plain_buckets;
      stats_.plain_bytes += static_cast<std::int64_t>(buffer.nbytes());
    }
    buffer.div_(comm.size());
    return comm.allreduce(buffer);
  }

  auto step = std::make_shared<Step>();
  step->options = options_;
  step->world = comm.size();
  step->buffer = buffer;
  const at::ScalarType compute = compute_type(buffer.scalar_type());
  // 16-bit buckets are worked on in float32: Gram-Schmidt and the residual need the precision, and a
  // residual kept in fp16 would flush the small values error feedback exists to keep.
  step->work = compute == buffer.scalar_type() ? buffer : buffer.to(compute);
  const at::TensorOptions options = step->work.options();

  std::int64_t uncompressed_numel = 0, p_numel = 0, q_numel = 0;
  std::vector<std::int64_t> ranks(count);
  for (std::size_t k = 0; k < count; ++k) {
    const std::vector<std::int64_t>& sizes = bucket.sizes[k];
    std::int64_t numel = 1;
    for (std::int64_t s : sizes) numel *= s;
    LOCKSTEP_CHECK(numel == bucket.numels[k] && bucket.offsets[k] >= 0 && bucket.offsets[k] + numel <= buffer.numel(),
                   "powersgd_hook: parameter '", bucket.parameter_names[k], "' of bucket ", bucket.index, " has shape ",
                   at::IntArrayRef(sizes), " (", numel, " elements) at offset ", bucket.offsets[k], ", but numel ",
                   bucket.numels[k], " in a buffer of ", buffer.numel(), " (rank ", rank, ")");
    ranks[k] = compressed_rank(sizes, options_);
    if (ranks[k] == 0) {
      step->uncompressed.push_back({bucket.offsets[k], numel, uncompressed_numel});
      uncompressed_numel += numel;
    } else {
      p_numel += sizes[0] * ranks[k];
      q_numel += numel / sizes[0] * ranks[k];
    }
  }
  step->p_flat = at::empty({uncompressed_numel + p_numel}, options);
  step->q_flat = at::empty({q_numel}, options);
  for (const Step::Part& part : step->uncompressed) {
    step->p_flat.narrow(0, part.flat_offset, part.numel).copy_(step->work.narrow(0, part.offset, part.numel));
  }
  // Averaged as allreduce_hook does: divided before the sum.
  step->p_flat.narrow(0, 0, uncompressed_numel).div_(step->world);

  std::int64_t p_offset = uncompressed_numel, q_offset = 0;
  for (std::size_t k = 0; k < count; ++k) {
    const std::int64_t r = ranks[k];
    if (r == 0) continue;
    const std::int64_t n = bucket.sizes[k][0];
    const std::int64_t m = bucket.numels[k] / n;
    Step::Matrix x;
    x.entry = entry_for(bucket.parameter_names[k], bucket.sizes[k], r, options);
    x.m = step->work.narrow(0, bucket.offsets[k], n * m).view({n, m});
    x.out = step->work.is_same(buffer) ? x.m : buffer.narrow(0, bucket.offsets[k], n * m).view({n, m});
    x.p = step->p_flat.narrow(0, p_offset, n * r).view({n, r});
    x.q = step->q_flat.narrow(0, q_offset, m * r).view({m, r});
    p_offset += n * r;
    q_offset += m * r;
    Entry& entry = *x.entry;
    x.input = x.m;
    if (options_.use_error_feedback) {
      // Summed into the residual's own storage (one pass, no copy): it is the input until finish()
      // subtracts what was applied.
      if (entry.error.defined()) {
        entry.error.add_(x.m);
      } else {
        entry.error = x.m.clone();
      }
      x.input = entry.error;
    }
    const at::Tensor fresh = draw_q(options_.seed, bucket.parameter_names[k], iteration, m, r, options);
    if (!options_.warm_start || !entry.q.defined()) {
      entry.q = fresh;
    } else {
      // Note [PowerSGD degenerate state]
      const at::Tensor usable = at::isfinite(entry.q).all(0).logical_and(entry.q.abs().sum(0) > 0);
      entry.q = at::where(usable, entry.q, fresh);
    }
    at::mm_out(x.p, x.input, entry.q);
    step->matrices.push_back(std::move(x));
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.compressed_buckets;
    stats_.gradient_bytes += static_cast<std::int64_t>(buffer.nbytes());
    stats_.compressed_bytes += static_cast<std::int64_t>(step->p_flat.nbytes() + step->q_flat.nbytes());
    stats_.compressed_matrices += step->matrices.size();
    stats_.uncompressed_tensors += step->uncompressed.size();
  }
  // Note [PowerSGD collective order]
  comm::WorkPtr work = comm.allreduce(step->p_flat);
  return comm::then(std::move(work), [step, &comm] { step->finish(comm); });
}

void PowerSGDState::Step::finish(comm::Communicator& comm) {
  at::NoGradGuard no_grad;
  for (const Part& part : uncompressed) {
    buffer.narrow(0, part.offset, part.numel).copy_(p_flat.narrow(0, part.flat_offset, part.numel));
  }
  for (Matrix& x : matrices) {
    orthogonalize_columns(x.p, options.orthogonalization_epsilon);
    at::mm_out(x.q, x.input.t(), x.p);
  }
  if (q_flat.numel() > 0) {
    comm.allreduce(q_flat)->wait();  // Note [PowerSGD collective order]
    q_flat.div_(world);
  }
  for (Matrix& x : matrices) {
    at::mm_out(x.m, x.p, x.q.t());
    if (!x.out.is_same(x.m)) x.out.copy_(x.m);
    // Against what was applied (for 16-bit buckets: after rounding), so the residual keeps that too.
    if (options.use_error_feedback) {
      x.entry->error.sub_(x.out);
      // Note [PowerSGD degenerate state]
      const at::Tensor finite = at::isfinite(x.p).all().logical_and(at::isfinite(x.q).all());
      if (x.entry->error.is_cpu()) {
        if (!finite.item<bool>()) x.entry->error.zero_();
      } else {
        x.entry->error.masked_fill_(finite.logical_not(), 0.0);
      }
    }
    if (options.warm_start) x.entry->q = x.q;
    x.entry->in_flight.store(false, std::memory_order_release);
  }
}

// ---- Checkpoints: Note [PowerSGD checkpoints] ----

std::vector<std::string> PowerSGDState::gather_state(comm::Communicator& comm, int root) const {
  torch::serialize::OutputArchive archive;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    archive.write("powersgd_state_version", c10::IValue(kStateVersion));
    archive.write("world_size", c10::IValue(static_cast<std::int64_t>(comm.size())));
    archive.write("rank", c10::IValue(static_cast<std::int64_t>(comm.rank())));
    archive.write("matrix_approximation_rank", c10::IValue(options_.matrix_approximation_rank));
    archive.write("min_compression_rate", c10::IValue(options_.min_compression_rate));
    archive.write("use_error_feedback", c10::IValue(options_.use_error_feedback));
    archive.write("warm_start", c10::IValue(options_.warm_start));
    archive.write("next_iteration", c10::IValue(static_cast<std::int64_t>(next_iteration_)));
    const std::vector<std::int64_t> stats = {static_cast<std::int64_t>(stats_.plain_buckets),
                                             stats_.plain_bytes,
                                             static_cast<std::int64_t>(stats_.compressed_buckets),
                                             stats_.gradient_bytes,
                                             stats_.compressed_bytes,
                                             static_cast<std::int64_t>(stats_.compressed_matrices),
                                             static_cast<std::int64_t>(stats_.uncompressed_tensors)};
    archive.write("stats", at::tensor(stats, at::kLong));
    std::int64_t count = 0;
    for (const auto& [name, entry] : entries_) {
      // An entry in flight belongs to a step that an error ended; the next step would start it
      // afresh (Note [PowerSGD state keys]), and so does leaving it out.
      if (entry->in_flight) continue;
      const std::string key = "entry" + std::to_string(count++) + "_";
      archive.write(key + "name", c10::IValue(name));
      archive.write(key + "sizes", at::tensor(entry->sizes, at::kLong));
      archive.write(key + "rank", c10::IValue(entry->rank));
      // Q is a view into its bucket's flat buffer: cloned, or the archive would hold the whole buffer.
      if (entry->q.defined()) archive.write(key + "q", entry->q.cpu().clone());
      if (entry->error.defined()) archive.write(key + "error", entry->error.cpu());
    }
    archive.write("entries", c10::IValue(count));
  }
  std::string mine;
  archive.save_to([&mine](const void* data, std::size_t size) {
    mine.append(static_cast<const char*>(data), size);
    return size;
  });
  return comm::gather_strings(comm, mine, root);
}

void PowerSGDState::restore_state(const std::vector<std::string>& states, const comm::Communicator& comm,
                                  const std::map<std::string, std::vector<std::int64_t>>* parameters) {
  const int rank = comm.rank();
  const int world = comm.size();
  LOCKSTEP_CHECK(static_cast<int>(states.size()) == world, "PowerSGD: the saved state holds the residuals of ",
                 states.size(), " ranks but this job has ", world, " (rank ", rank,
                 "): each rank's error feedback is its own, so resume a PowerSGD run at the world size it was saved at");
  std::map<std::string, std::shared_ptr<Entry>> entries;
  PowerSGDStats stats;
  std::int64_t next_iteration = 0;
  torch::serialize::InputArchive archive;
  auto read_int = [&archive](const std::string& key) {
    c10::IValue value;
    archive.read(key, value);
    return value.toInt();
  };
  auto read_double = [&archive](const std::string& key) {
    c10::IValue value;
    archive.read(key, value);
    return value.toDouble();
  };
  auto read_bool = [&archive](const std::string& key) {
    c10::IValue value;
    archive.read(key, value);
    return value.toBool();
  };
  try {
    const std::string& bytes = states[static_cast<std::size_t>(rank)];
    archive.load_from(bytes.data(), bytes.size(), at::Device(at::kCPU));
    const std::int64_t version = read_int("powersgd_state_version");
    LOCKSTEP_CHECK(version == kStateVersion, "PowerSGD: the saved state has format version ", version, ", expected ",
                   kStateVersion, " (rank ", rank, ")");
    const std::int64_t saved_world = read_int("world_size"), saved_rank = read_int("rank");
    LOCKSTEP_CHECK(saved_world == world && saved_rank == rank, "PowerSGD: entry ", rank,
                   " of the saved states is the state of rank ", saved_rank, " of ", saved_world,
                   ", not of rank ", rank, " of ", world);
    const std::int64_t saved_rank_option = read_int("matrix_approximation_rank");
    LOCKSTEP_CHECK(saved_rank_option == options_.matrix_approximation_rank,
                   "PowerSGD: the saved state was made with matrix_approximation_rank ", saved_rank_option,
                   " but this run has ", options_.matrix_approximation_rank,
                   ": its warm-start Qs and residuals belong to the saved rank, so resume with the options it was "
                   "saved with (rank ", rank, ")");
    const double saved_rate = read_double("min_compression_rate");
    LOCKSTEP_CHECK(saved_rate == options_.min_compression_rate,
                   "PowerSGD: the saved state was made with min_compression_rate ", saved_rate, " but this run has ",
                   options_.min_compression_rate,
                   ": it decides which gradients have state, so resume with the options it was saved with (rank ",
                   rank, ")");
    const bool saved_feedback = read_bool("use_error_feedback"), saved_warm = read_bool("warm_start");
    LOCKSTEP_CHECK(saved_feedback == options_.use_error_feedback && saved_warm == options_.warm_start,
                   "PowerSGD: the saved state was made with use_error_feedback ", saved_feedback, " and warm_start ",
                   saved_warm, " but this run has ", options_.use_error_feedback, " and ", options_.warm_start,
                   ": resume with the options it was saved with (rank ", rank, ")");
    next_iteration = read_int("next_iteration");
    at::Tensor saved_stats;
    archive.read("stats", saved_stats);
    LOCKSTEP_CHECK(saved_stats.numel() == 7, "PowerSGD: the saved stats hold ", saved_stats.numel(),
                   " counters, expected 7 (rank ", rank, ")");
    const auto* counters = saved_stats.to(at::kLong).contiguous().data_ptr<std::int64_t>();
    stats.plain_buckets = static_cast<std::uint64_t>(counters[0]);
    stats.plain_bytes = counters[1];
    stats.compressed_buckets = static_cast<std::uint64_t>(counters[2]);
    stats.gradient_bytes = counters[3];
    stats.compressed_bytes = counters[4];
    stats.compressed_matrices = static_cast<std::uint64_t>(counters[5]);
    stats.uncompressed_tensors = static_cast<std::uint64_t>(counters[6]);

    const std::int64_t count = read_int("entries");
    for (std::int64_t i = 0; i < count; ++i) {
      const std::string key = "entry" + std::to_string(i) + "_";
      c10::IValue name_value;
      archive.read(key + "name", name_value);
      const std::string name = name_value.toStringRef();
      auto entry = std::make_shared<Entry>();
      at::Tensor sizes;
      archive.read(key + "sizes", sizes);
      sizes = sizes.to(at::kLong).contiguous();
      entry->sizes.assign(sizes.data_ptr<std::int64_t>(), sizes.data_ptr<std::int64_t>() + sizes.numel());
      entry->rank = read_int(key + "rank");
      const std::int64_t expected_rank = compressed_rank(entry->sizes, options_);
      LOCKSTEP_CHECK(entry->rank == expected_rank && expected_rank > 0, "PowerSGD: the saved state of parameter '",
                     name, "' (shape ", describe_shape(entry->sizes), ") is compressed at rank ", entry->rank,
                     ", but these options give rank ", expected_rank, " (rank ", rank, ")");
      if (parameters != nullptr) {
        const auto found = parameters->find(name);
        LOCKSTEP_CHECK(found != parameters->end(), "PowerSGD: the saved state has a residual for parameter '", name,
                       "', which this model does not have: it was saved for another model (rank ", rank, ")");
        LOCKSTEP_CHECK(found->second == entry->sizes, "PowerSGD: the saved state of parameter '", name,
                       "' is for shape ", describe_shape(entry->sizes), " but the model's is ",
                       describe_shape(found->second), ": it was saved for another model (rank ", rank, ")");
      }
      const std::int64_t n = entry->sizes[0], m = sizes.prod().item<std::int64_t>() / n;
      at::Tensor q, error;
      if (archive.try_read(key + "q", q)) {
        LOCKSTEP_CHECK(q.sizes() == at::IntArrayRef({m, entry->rank}), "PowerSGD: the saved Q of parameter '", name,
                       "' has shape ", q.sizes(), ", expected [", m, ", ", entry->rank, "] (rank ", rank, ")");
        entry->q = q;
      }
      if (archive.try_read(key + "error", error)) {
        LOCKSTEP_CHECK(error.sizes() == at::IntArrayRef({n, m}), "PowerSGD: the saved residual of parameter '", name,
                       "' has shape ", error.sizes(), ", expected [", n, ", ", m, "] (rank ", rank, ")");
        entry->error = error;
      }
      entry->restored = true;  // dtype and device are set when a step first meets it
      entries[name] = std::move(entry);
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    LOCKSTEP_FAIL("PowerSGD: rank ", rank, "'s part of the saved state is not a readable PowerSGD state (",
                  states[static_cast<std::size_t>(rank)].size(), " bytes): ", detail::exception_text(e));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  entries_ = std::move(entries);
  stats_ = stats;
  next_iteration_ = static_cast<std::uint64_t>(next_iteration);
  offset_pending_ = true;
}

// ---- The hook ----

CommHook powersgd_hook(PowerSGDOptions options) { return powersgd_hook(std::make_shared<PowerSGDState>(options)); }

CommHook powersgd_hook(std::shared_ptr<PowerSGDState> state) {
  LOCKSTEP_CHECK(state != nullptr, "powersgd_hook needs a PowerSGDState, got nullptr");
  return PowerSGDHook{std::move(state)};
}

std::shared_ptr<PowerSGDState> powersgd_state_of(const CommHook& hook) {
  const auto* powersgd = hook.target<PowerSGDHook>();
  return powersgd != nullptr ? powersgd->state : nullptr;
}

}  // namespace lockstep::ddp
