#include "lockstep/ddp/powersgd.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

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

struct PowerSGDState::Entry {
  std::vector<std::int64_t> sizes;
  std::int64_t rank = 0;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  at::Tensor error;  // n x m; the input M while in flight
  at::Tensor q;      // m x r: the last step's averaged Q (warm start)
  bool in_flight = false;
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

std::uint64_t fnv1a(const std::string& text) {
  std::uint64_t h = 0xCBF29CE484222325ULL;
  for (unsigned char c : text) h = (h ^ c) * 0x100000001B3ULL;
  return h;
}

// Q for one parameter and iteration: the same on every rank, whatever order the draws happen in.
at::Tensor draw_q(std::uint64_t seed, const std::string& name, std::uint64_t iteration, std::int64_t m, std::int64_t r,
                  const at::TensorOptions& options) {
  at::Generator generator =
      at::detail::createCPUGenerator(splitmix64(seed ^ splitmix64(fnv1a(name) ^ splitmix64(iteration))));
  // Drawn on the CPU so that every device type gets the same numbers from the same seed.
  return at::randn({m, r}, generator, options.device(at::kCPU)).to(options.device());
}

at::ScalarType compute_type(at::ScalarType bucket_type) {
  return bucket_type == at::kHalf || bucket_type == at::kBFloat16 ? at::kFloat : bucket_type;
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

void orthogonalize_columns(const at::Tensor& matrix, double epsilon) {
  LOCKSTEP_CHECK(matrix.dim() == 2, "orthogonalize_columns expects a matrix, got a tensor of shape ", matrix.sizes());
  LOCKSTEP_CHECK(std::isfinite(epsilon) && epsilon >= 0.0, "orthogonalize_columns: epsilon must be >= 0, got ",
                 epsilon);
  const std::int64_t r = matrix.size(1);
  for (std::int64_t i = 0; i < r; ++i) {
    at::Tensor column = matrix.narrow(1, i, 1);
    // On the device, without reading the norm back: a zero column is divided by 1 and stays 0; a
    // tiny one by its norm (|entries| <= norm, so nothing overflows).
    at::Tensor norm = column.norm();
    column.div_(at::where(norm > 0, norm + epsilon, at::ones_like(norm)));
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
  auto it = entries_.find(parameter_name);
  if (it == entries_.end() || !it->second->error.defined() || it->second->in_flight) return {};
  return it->second->error.clone();
}

void PowerSGDState::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  entries_.clear();
}

std::shared_ptr<PowerSGDState::Entry> PowerSGDState::entry_for(const std::string& name,
                                                               const std::vector<std::int64_t>& sizes,
                                                               std::int64_t rank, const at::TensorOptions& options) {
  // Note [PowerSGD state keys]
  std::lock_guard<std::mutex> lock(mutex_);
  std::shared_ptr<Entry>& entry = entries_[name];
  if (!entry || entry->in_flight || entry->sizes != sizes || entry->rank != rank ||
      entry->dtype != options.dtype().toScalarType() || entry->device != options.device()) {
    entry = std::make_shared<Entry>();
    entry->sizes = sizes;
    entry->rank = rank;
    entry->dtype = options.dtype().toScalarType();
    entry->device = options.device();
  }
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

  if (bucket.iteration < options_.start_iteration) {
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
    const at::Tensor fresh = draw_q(options_.seed, bucket.parameter_names[k], bucket.iteration, m, r, options);
    if (!options_.warm_start || !entry.q.defined()) {
      entry.q = fresh;
    } else {
      // Note [PowerSGD degenerate state]
      const at::Tensor usable = at::isfinite(entry.q).all(0).logical_and(entry.q.abs().sum(0) > 0);
      entry.q = at::where(usable, entry.q, fresh);
    }
    at::mm_out(x.p, x.input, entry.q);
    entry.in_flight = true;
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
    x.entry->in_flight = false;
  }
}

CommHook powersgd_hook(PowerSGDOptions options) { return powersgd_hook(std::make_shared<PowerSGDState>(options)); }

CommHook powersgd_hook(std::shared_ptr<PowerSGDState> state) {
  LOCKSTEP_CHECK(state != nullptr, "powersgd_hook needs a PowerSGDState, got nullptr");
  return [state = std::move(state)](comm::Communicator& comm, const GradBucket& bucket) {
    return state->reduce(comm, bucket);
  };
}

}  // namespace lockstep::ddp
