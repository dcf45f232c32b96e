#pragma once
// Checkpointer: the callback that writes and restores checkpoints.
//
// A checkpoint (one file, torch::serialize archive) holds the model's parameters and buffers, the
// optimizer state, the train loader's position (epoch and samples consumed, Note [Loader position]),
// the global step, every rank's default CPU generator state (and CUDA generator state, for a model on
// a GPU), and the states of all callbacks
// (Note [Callback state]). Rank 0 writes it atomically: to "<name>.tmp", fsync, then rename, so a
// file with a final name is always complete. It ends in a CRC-32 trailer that every rank checks
// before it loads the file (Note [Checksummed files]), so a file changed on disk or in a copy is an
// error naming it, not weights trained on silently. Resuming restores all of it on every rank, so a run
// stopped after any step and resumed (same world size) ends with bitwise the same parameters as a run
// that never stopped.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lockstep/train/callback.hpp"

namespace lockstep::train {

struct CheckpointOptions {
  // Write a checkpoint every N optimizer steps; 0 = never mid-epoch.
  int64_t every_steps = 0;
  // Write one at the end of every epoch (after evaluation).
  bool every_epoch = true;
  // Checkpoints to keep in the directory (oldest removed first; files of a later step than the one
  // just written belong to another run and are left alone); 0 = keep all.
  int64_t keep_last = 3;
  // "auto": continue from the newest valid checkpoint in the directory, if any (invalid ones are
  // skipped with a warning); "never": start afresh, moving an earlier run's checkpoints in the
  // directory into a "previous-run-<time>" folder there (Note [Starting over]); anything else: the
  // path of a checkpoint to load (an error if it is missing or invalid).
  std::string resume = "auto";
  // Where checkpoints go; empty = "<TrainerOptions::output_dir>/checkpoints".
  std::string directory;
  // Also write a checkpoint when training ends (finished or stopped) unless this step was just saved.
  bool at_end = true;
};

// The weights of `path` into `model`, on this rank: fine-tuning from a trained model (pruning or
// quantization-aware training from dense weights; TrainerOptions::init_from calls it on every rank).
// `path` is a Lockstep checkpoint, whose model alone is taken (not its optimizer, step or callbacks'
// state), or a model file (save_model_atomically's, torch::save(model)'s). Its CRC-32 trailer is
// checked when it has one. Every parameter and buffer of the model must be in the file with the
// model's shape, except the buffers of a module the file lacks that has no parameters (the activation
// ranges of ActivationFakeQuant points start unobserved); entries the model lacks (a pruned run's
// masks) are ignored. Copies into the model's tensors (their storage, device and layout stay), and
// only once every one was found: an error naming the file and the tensor changes nothing.
void load_model_weights(torch::nn::Module& model, const std::string& path);

// "checkpoint-step00000123.pt" for step 123.
std::string checkpoint_file_name(int64_t global_step);
// The checkpoints in `directory`, oldest (lowest step) first.
std::vector<std::string> list_checkpoints(const std::string& directory);

class Checkpointer : public Callback {
 public:
  // `directory` must be set (the trainer fills it from output_dir when it adds this callback).
  explicit Checkpointer(CheckpointOptions options);

  void on_setup(TrainerContext& ctx) override;
  void on_train_begin(TrainerContext& ctx) override;
  void on_step_end(TrainerContext& ctx) override;
  void on_after_epoch_end(TrainerContext& ctx) override;
  void on_train_end(TrainerContext& ctx) override;

  // Collective: writes a checkpoint of the current state (rank 0 writes; the others send their
  // generator states, and whatever per-rank state callbacks gather, as PowerSGD's residuals: Note
  // [Callback state]). `position` is where the train loader continues.
  void save(TrainerContext& ctx, const data::SamplerState& position);
  // Collective: loads `path` on every rank into ctx (model, optimizer, step, position, RNG,
  // callbacks). Throws a lockstep::Error naming the file if it is unreadable or incomplete; when one
  // rank refuses it, every rank raises. A refused file (another model or optimizer, a callback refusing
  // its state, on any rank) leaves every rank's model values, optimizer, RNG and ctx as they were
  // (Note [A checkpoint that does not fit]).
  void load(TrainerContext& ctx, const std::string& path);

  // Collective: whether on_train_begin will resume a checkpoint (resume "auto" finding one, or a path);
  // the choice is kept for it. The trainer asks before a run's init_from weights are loaded.
  bool will_resume(TrainerContext& ctx);

  const CheckpointOptions& options() const { return options_; }
  // The path of the last checkpoint written or loaded ("" if none).
  const std::string& last_path() const { return last_path_; }

 private:
  // on_train_begin's part: resume as CheckpointOptions::resume says (collective).
  void resume(TrainerContext& ctx);
  // The checkpoint a resume takes: "" for none (collective: rank 0 picks under "auto").
  std::string choose_resume(TrainerContext& ctx);
  // load() whose error on the ranks that did not refuse begins with `context`.
  void load(TrainerContext& ctx, const std::string& path, const std::string& context);
  // resume: never on rank 0 (Note [Starting over]).
  // Moves the checkpoints of steps after `after_step` (all: -1) into a previous-run-<time> folder.
  void set_aside_earlier_run(int64_t after_step = -1) const;

  CheckpointOptions options_;
  int64_t last_saved_step_ = -1;
  data::SamplerState last_saved_position_;  // where the last checkpoint written or loaded goes on
  int64_t first_step_ = 0;  // global_step once on_train_begin has resumed (or not)
  std::string last_path_;
  std::optional<std::string> chosen_;  // will_resume()'s choice, for the resume that follows
};

}  // namespace lockstep::train
