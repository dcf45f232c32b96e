#pragma once
// PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019): a communication hook that all-reduces a
// rank-r approximation of each gradient matrix instead of the matrix, with error feedback, after
// PyTorch's ddp_comm_hooks.powerSGD_hook. An n x m gradient costs (n + m) * r values on the wire
// instead of n * m.
//
//   lockstep::ddp::DataParallelOptions options;
//   options.comm_hook = lockstep::ddp::powersgd_hook({/*matrix_approximation_rank=*/2});
//
// Per bucket and step (from start_iteration on): each gradient with >= 2 dimensions is viewed as a
// matrix M (first dimension x the rest). Matrices too small to gain (compressed_rank() == 0) and 1-D
// gradients (biases, BatchNorm) form the uncompressed part, averaged exactly. For the others:
//   M += e                        error feedback: what earlier steps' approximations left out
//   P  = M Q                      Q (m x r): warm-started from the last step, else drawn afresh
//   all-reduce P                  (one flat buffer per bucket; the uncompressed part rides along)
//   P  = orthogonalize(P)         Gram-Schmidt on the columns (orthogonalize_columns)
//   Q  = M^T P;  all-reduce Q;  Q /= world size
//   M' = P Q^T                    the average's projection onto span(P): written into the bucket
//   e  = M - M'                   this rank's residual, kept for the next step
// If every rank's M has its columns in one common r-dimensional subspace, M' is the exact average.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/work.hpp"
#include "lockstep/ddp/comm_hooks.hpp"

namespace lockstep::ddp {

// Defaults as PyTorch's PowerSGDState, except start_iteration (10 here; PyTorch's start_powerSGD_iter
// is 1000: set that for its behaviour) and orthogonalization_epsilon (0 is safe here, unlike there).
struct PowerSGDOptions {
  // r: columns of P and Q. 1 often suffices (the paper's ResNet-18/CIFAR-10 run used 2); higher is
  // closer to the exact average and costs r times the traffic. Must be >= 1.
  std::int64_t matrix_approximation_rank = 1;
  // Buckets of synchronised backward passes 0 .. start_iteration - 1 are averaged uncompressed
  // (GradBucket::iteration), so that error feedback starts from gradients that settled a little
  // rather than from the large, quickly changing ones of a fresh model.
  std::uint64_t start_iteration = 10;
  // A matrix is compressed only if (n + m) * r * min_compression_rate < n * m. Must be >= 1.
  double min_compression_rate = 2.0;
  // Adds each step's residual to the next step's gradient. Without it the part of the gradient
  // outside span(P) is lost and training usually suffers.
  bool use_error_feedback = true;
  // Reuses last step's (averaged) Q as this step's starting point: one step of power iteration per
  // training step, which tracks the dominant subspace. Without it Q is drawn afresh each step.
  bool warm_start = true;
  // Gram-Schmidt divides a column by (norm + epsilon). A column whose norm is 0 becomes 0 whatever
  // epsilon is (PyTorch's default of 0 gives NaN there), so 0 is safe here and keeps columns exactly
  // unit length. Must be >= 0 and finite.
  double orthogonalization_epsilon = 0.0;
  // Seeds the random Q draws, identically on every rank (each draw: seed, parameter name, iteration).
  std::uint64_t seed = 0;
};

// Throws lockstep::Error naming the option, the value and the allowed range.
void validate(const PowerSGDOptions& options);

// The rank PowerSGD uses for a gradient of shape `sizes`: min(n, m, matrix_approximation_rank), or 0
// when it is sent uncompressed (fewer than 2 dimensions, an empty matrix, or too little to gain:
// (n + m) * r * min_compression_rate >= n * m), with n = sizes[0] and m = the product of the rest.
std::int64_t compressed_rank(const std::vector<std::int64_t>& sizes, const PowerSGDOptions& options);

// Orthonormalises the columns of the 2-D `matrix` in place by (modified) Gram-Schmidt, column 0
// first. A column that is 0 after the earlier columns' parts are removed becomes 0 (no NaN), and so
// does one left with at most sqrt(machine epsilon) of its norm: it lay in the earlier columns' span
// (a matrix of rank below r), and its rounding noise, normalised, would not be orthogonal to them.
void orthogonalize_columns(const at::Tensor& matrix, double epsilon = 0.0);

// Counters over the buckets a PowerSGD state reduced. Bytes are those of the tensors handed to
// all-reduce (a ring all-reduce moves about 2 (n-1)/n times that per rank).
struct PowerSGDStats {
  std::uint64_t plain_buckets = 0;        // averaged uncompressed, before start_iteration
  std::int64_t plain_bytes = 0;           // their all-reduced bytes (their gradients' bytes)
  std::uint64_t compressed_buckets = 0;   // reduced by PowerSGD
  std::int64_t gradient_bytes = 0;        // gradient bytes of those buckets, in the bucket dtype
  std::int64_t compressed_bytes = 0;      // what was all-reduced for them: P and the uncompressed part, then Q
  std::uint64_t compressed_matrices = 0;  // matrices approximated (summed over buckets)
  std::uint64_t uncompressed_tensors = 0;

  // gradient_bytes / compressed_bytes: how many times fewer bytes PowerSGD sent (0 before any).
  double compression_ratio() const {
    return compressed_bytes > 0 ? static_cast<double>(gradient_bytes) / static_cast<double>(compressed_bytes) : 0.0;
  }
};

// What a PowerSGD hook keeps between steps: per parameter (by name) the error-feedback residual and
// the warm-start Q, and the iteration count. One state per DataParallel: two models would mix their
// parameters' state. Note [PowerSGD state keys]
//
// Checkpoints (Note [PowerSGD checkpoints]): gather_state() collects every rank's state on one rank,
// to be written beside the model; restore_state() gives each rank its own back. The trainer does
// both by itself for a hook made by powersgd_hook() (train::PowerSGDStateCallback); a custom loop:
//   auto states = state->gather_state(*comm);          // every rank; rank 0 gets them all
//   if (comm->rank() == 0) write(states);              // e.g. as byte tensors in its archive
//   ... on resume, every rank: state->restore_state(read(), *comm, &parameter_shapes);
class PowerSGDState {
 public:
  explicit PowerSGDState(PowerSGDOptions options = {});
  PowerSGDState(const PowerSGDState&) = delete;
  PowerSGDState& operator=(const PowerSGDState&) = delete;

  const PowerSGDOptions& options() const { return options_; }
  PowerSGDStats stats() const;
  // This rank's residual for the parameter (n x m, float32 for 16-bit buckets, else the bucket's
  // dtype; a copy), or an undefined tensor when there is none (not compressed yet, or no feedback) or
  // while a step is reducing the parameter (safe to call from another thread during backward).
  at::Tensor error(const std::string& parameter_name) const;
  // Forgets every residual and Q (the next step starts as the first did). Stats and the iteration
  // count are kept.
  void reset();
  // Note [PowerSGD under loss scaling]: multiplies every residual by `factor` (between steps). The
  // residuals are in the units of the gradients the hook saw, which a GradScaler multiplies by its
  // scale: when the scale changes, factor = new scale / old scale keeps them in step; 0 drops them
  // (a step the scaler skipped). train::PowerSGDStateCallback does both in the trainer.
  void rescale_residuals(double factor);

  // Collective (every rank, between steps: no backward in flight). Serialises this rank's state (its
  // residuals, the warm-start Qs, the iteration count, the stats, and the options and world size they
  // belong to) and gathers every rank's on `root`: there, one string per rank, indexed by rank; an
  // empty vector on the other ranks. Each rank's string holds about its compressed gradients' bytes.
  std::vector<std::string> gather_state(comm::Communicator& comm, int root = 0) const;
  // Restores this rank's part of what gather_state() returned (every rank passes the same vector, as
  // read from one checkpoint), so that the next step continues exactly where the saved run would
  // have: residuals, Qs, stats, and GradBucket::iteration counted on from the saved count (a new
  // DataParallel counts from 0). `parameters`, when given, are the model's parameter names and shapes:
  // state for a name not among them, or for another shape, is then an error here rather than at the
  // next step. Not collective, but every rank checks the same things and so throws alike: a
  // lockstep::Error, leaving this state unchanged, when the states were saved at another world size,
  // with another matrix_approximation_rank, min_compression_rate, use_error_feedback or warm_start
  // (start_iteration, seed and orthogonalization_epsilon may change), or are not PowerSGD states.
  void restore_state(const std::vector<std::string>& states, const comm::Communicator& comm,
                     const std::map<std::string, std::vector<std::int64_t>>* parameters = nullptr);

  // The hook's body: reduces one bucket (the CommHook contract, comm_hooks.hpp).
  comm::WorkPtr reduce(comm::Communicator& comm, const GradBucket& bucket);

 private:
  struct Entry;  // one parameter's residual and Q
  struct Step;   // one bucket's reduction, from the hook to its continuation
  std::shared_ptr<Entry> entry_for(const std::string& name, const std::vector<std::int64_t>& sizes, std::int64_t rank,
                                   const at::TensorOptions& options);
  // GradBucket::iteration counted on from a restored state (Note [PowerSGD checkpoints]).
  std::uint64_t iteration_of(const GradBucket& bucket);

  PowerSGDOptions options_;
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<Entry>> entries_;
  PowerSGDStats stats_;
  std::uint64_t next_iteration_ = 0;     // 1 + the last iteration reduced (0 before any)
  std::int64_t iteration_offset_ = 0;    // added to GradBucket::iteration
  bool offset_pending_ = false;          // restored: the next bucket's iteration is next_iteration_
};

// The state of a hook made by powersgd_hook(), or nullptr for any other hook (or an empty one). How
// the trainer finds the state to checkpoint without being told.
std::shared_ptr<PowerSGDState> powersgd_state_of(const CommHook& hook);

// A PowerSGD communication hook with a state of its own (validates the options here).
CommHook powersgd_hook(PowerSGDOptions options = {});
// The same over a state the caller keeps, to read its stats() or error()s.
CommHook powersgd_hook(std::shared_ptr<PowerSGDState> state);

}  // namespace lockstep::ddp
