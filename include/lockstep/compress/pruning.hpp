#pragma once
// MagnitudePruning: a trainer callback that prunes weights by magnitude *during* data-parallel
// training, one-shot or gradually (Zhu & Gupta 2017), with every rank holding the identical mask.
//
//   lockstep::compress::PruningOptions prune;
//   prune.target_sparsity = 0.8;
//   prune.begin_step = 200; prune.end_step = 2000; prune.frequency = 100;
//   prune.exclude = {"^conv1\\.", "^fc\\."};        // keep the stem and the classifier dense
//   trainer.add_callback(std::make_shared<lockstep::compress::MagnitudePruning>(prune));
//
// Note [Masks as state]: the masks are boolean buffers of a child module "pruning_masks" that the
// callback adds to the model in on_setup (before the Checkpointer restores anything), so they are
// saved in and restored from checkpoints with the model. They are applied to the gradients after
// they are averaged (on_after_backward) and to the weights after every optimizer step, so neither
// momentum nor weight decay revives a pruned weight. Masks are recomputed only at pruning steps,
// from weights that DataParallel keeps identical on every rank; a checksum over ranks confirms
// that every rank computed the same masks (a mismatch is an error on every rank, naming the layer).
// See docs/compression.md.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/compress/masks.hpp"
#include "lockstep/train/callback.hpp"

namespace torch::nn {
class Module;
}

namespace lockstep::compress {

enum class PruneSchedule {
  OneShot,  // prune to target_sparsity at begin_step
  Gradual,  // cubic from initial_sparsity at begin_step to target_sparsity at end_step
};
PruneSchedule parse_prune_schedule(const std::string& name);  // "one_shot", "gradual"
std::string to_string(PruneSchedule schedule);  // the name parse_prune_schedule reads

struct PruningOptions {
  PruneGranularity granularity = PruneGranularity::Unstructured;
  PruneScope scope = PruneScope::Layer;
  int64_t n = 2;  // N:M (granularity NM): keep N of every M; the sparsity is 1 - N/M, one-shot only
  int64_t m = 4;

  PruneSchedule schedule = PruneSchedule::Gradual;
  double initial_sparsity = 0.0;
  double target_sparsity = 0.5;
  // Steps count optimizer steps (TrainerContext::global_step). Pruning happens before the forward
  // pass of the step whose global_step is begin_step, begin_step + frequency, ..., and end_step.
  int64_t begin_step = 0;
  int64_t end_step = 1000;
  int64_t frequency = 100;
  // Alternatively in epochs (fractions allowed), taking precedence when > 0: begin_step and end_step
  // are begin_epoch and end_epoch times the steps per epoch; begin_step must then stay 0. A gradual
  // schedule given begin_epoch needs end_epoch too. The end step (a one-shot schedule's begin step)
  // must be one the run takes: a schedule that would end after its last step is refused at setup.
  double begin_epoch = 0.0;
  double end_epoch = 0.0;

  // Which weights: ECMAScript regular expressions searched in parameter names ("layer1.0.conv1.weight").
  // Empty include = the weights of every Conv1d/2d/3d and Linear module; for Structured, of every
  // Conv1d/2d/3d only (a Linear's output rows are a classifier's classes: Linear layers are listed in
  // skipped(), and pruned by rows only where include names them). Parameters of fewer than 2 dimensions
  // (biases, normalisation scales and shifts) are never pruned: an include that matches them lists them
  // in skipped(). A pattern that selects nothing is an error (a misspelling must not silently prune
  // nothing).
  std::vector<std::string> include;
  std::vector<std::string> exclude;

  // At on_train_end: print the per-layer table (rank 0), and when permanent_path is set, fold the
  // masks into the weights, drop the masking machinery and save the model there (rank 0, atomically);
  // the file loads into the plain, unpruned model definition with torch::load.
  bool print_table = true;
  std::string permanent_path;
};

// Zhu & Gupta's schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3 for t0 <= t <= t1,
// 0 before t0 and s_f after t1 (one-shot: s_f from t0 on). Masks change only at pruning steps, so
// the sparsity in force at step t is scheduled_sparsity(o, last pruning step <= t).
double scheduled_sparsity(const PruningOptions& options, int64_t step);
bool is_pruning_step(const PruningOptions& options, int64_t step);
// Throws naming the option when `options` are inconsistent (ranges, N:M with a global scope...).
void validate(const PruningOptions& options);

struct LayerSparsity {
  std::string name;  // parameter name, e.g. "layer1.0.conv1.weight"
  std::vector<int64_t> shape;
  int64_t numel = 0;
  int64_t nonzeros = 0;
  int64_t channels = 0;       // output channels (dim 0)
  int64_t zero_channels = 0;  // output channels that are entirely zero: the layer could lose them
  double sparsity() const { return numel > 0 ? 1.0 - static_cast<double>(nonzeros) / static_cast<double>(numel) : 0.0; }
};

// A second fit() with the same callback runs the schedule again from its start (epochs resolved for
// that fit's steps); the masks of the first stay in force until its first pruning step, unless the
// selected weights changed (then they start over at all ones). It must come before a
// QuantizationAwareTraining callback (after it, it would rank int8 values) and cannot run beside an
// ExponentialMovingAverage (the average would undo the masks): both are refused at setup.
class MagnitudePruning final : public train::Callback {
 public:
  explicit MagnitudePruning(PruningOptions options);

  void on_setup(train::TrainerContext& ctx) override;
  void on_train_begin(train::TrainerContext& ctx) override;
  void on_batch_begin(train::TrainerContext& ctx) override;
  void on_after_backward(train::TrainerContext& ctx) override;
  void on_after_optimizer_step(train::TrainerContext& ctx) override;
  void on_epoch_end(train::TrainerContext& ctx) override;
  void on_train_end(train::TrainerContext& ctx) override;

  std::string state_key() const override { return "magnitude_pruning"; }
  std::string agreement() const override;
  std::string save_state() const override;
  void load_state(const std::string& state) override;

  const PruningOptions& options() const { return options_; }
  // The pruned parameters' names, in model order.
  std::vector<std::string> layers() const;
  // Layers left out with the reason (N:M rows not a multiple of M).
  const std::vector<std::pair<std::string, std::string>>& skipped() const { return skipped_; }
  // The sparsity of the masks now in force (over the pruned layers), and per layer.
  double current_sparsity() const { return current_sparsity_; }
  std::vector<LayerSparsity> report() const;

 private:
  struct Layer;
  void update_masks(train::TrainerContext& ctx, double sparsity);
  void apply_to_weights();
  double mask_sparsity() const;  // over the pruned layers' masks
  void verify_across_ranks(comm::Communicator& comm) const;

  PruningOptions options_;
  std::vector<std::shared_ptr<Layer>> layers_;
  std::vector<std::pair<std::string, std::string>> skipped_;
  torch::nn::Module* model_ = nullptr;
  int64_t last_pruning_step_ = -1;
  double current_sparsity_ = 0.0;
  std::shared_ptr<torch::nn::Module> masks_;  // the "pruning_masks" child this callback registered
  PruningOptions configured_;                 // as given: options_ has the epochs resolved into steps
};

// Multiplies the masks into the weights and removes the "pruning_masks" child, so `model` is a plain
// model again (its state loads into, and saves from, the unpruned definition). Returns the final
// per-layer sparsity. A model without masks is left as it is (an empty report).
std::vector<LayerSparsity> make_pruning_permanent(torch::nn::Module& model);
// Saves `model` (parameters and buffers) to `path` atomically: a temporary file, fsync, rename. The
// file ends in a CRC-32 trailer (Note [Checksummed files]), which torch::load skips.
void save_model_atomically(torch::nn::Module& model, const std::string& path);
// Reads such a file into `model` (the plain definition), onto the device of `model`'s first parameter
// (the CPU for a model without any), as torch::load would, but checks the trailer first: a file
// changed on disk or in a copy is an error naming it rather than changed weights. A file without a
// trailer (any torch::save of a module) loads as torch::load would load it.
void load_model_checked(torch::nn::Module& model, const std::string& path);
// The table the callback prints at the end: layer, shape, nonzeros, sparsity, zero channels.
std::string format_sparsity_table(const std::vector<LayerSparsity>& layers);

}  // namespace lockstep::compress
