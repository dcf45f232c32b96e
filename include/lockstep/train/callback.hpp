#pragma once
// Callback: the trainer's only extension point. Progress reporting, checkpointing, pruning and
// quantisation are all callbacks; the trainer has no special case for any of them.
//
// Event order in DistributedTrainer::fit (Note [Callback order]):
//   on_setup          (every callback, before any on_train_begin)
//   on_train_begin
//   for each epoch:  on_epoch_begin
//                    for each step:  on_batch_begin, (forward, backward: gradients averaged over ranks),
//                                    on_after_backward, (optimizer step), on_after_optimizer_step,
//                                    on_step_end
//                    (with TrainerOptions::accumulation_steps > 1, one step runs several micro-batches'
//                    forward and backward between on_batch_begin and on_after_backward)
//                    on_evaluation_begin, (evaluation: on_evaluation_batch_end per batch),
//                    on_evaluation_end
//                    on_epoch_end, on_after_epoch_end
//   on_train_end (also after a stop request)
// on_evaluation_begin and on_evaluation_end run every epoch that ends, with or without an evaluation
// set. A stop (a signal, a time limit) may cut an evaluation short (Note [Stop during evaluation]):
// on_evaluation_end still runs, with stop_requested set and no test_* metrics, and on_epoch_end does
// not (the resumed run evaluates the epoch again). Callbacks run in the order they were added, except on_evaluation_end, which runs in reverse so
// that begin/end pairs nest (Note [Nested evaluation events]: a callback added later changes the model
// on top of an earlier one's change and undoes its own first). Every event runs on every rank, so a callback may use
// the communicator, as long as it does the same collectives on every rank.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/core/world.hpp"
#include "lockstep/data/dataset.hpp"
#include "lockstep/data/sharded_sampler.hpp"

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}
namespace lockstep::ddp {
class DataParallel;
}
namespace lockstep::data {
class Loader;
}

namespace lockstep::train {

struct TrainerOptions;
class Callback;
class Metric;

// What callbacks see and may change. Pointers stay valid for the whole fit().
struct TrainerContext {
  torch::nn::Module* model = nullptr;
  torch::optim::Optimizer* optimizer = nullptr;
  ddp::DataParallel* data_parallel = nullptr;
  comm::Communicator* communicator = nullptr;
  World world;
  const TrainerOptions* options = nullptr;
  data::Loader* train_loader = nullptr;
  // All of the trainer's callbacks in event order (the Checkpointer saves their states).
  const std::vector<std::shared_ptr<Callback>>* callbacks = nullptr;
  // The metrics the trainer computes (TrainerOptions::metrics, then custom_metrics): their keys, with
  // train_ and test_ before them, are in `metrics` after each epoch.
  const std::vector<std::shared_ptr<const Metric>>* trainer_metrics = nullptr;

  int64_t epoch = 0;           // the current epoch (0-based)
  int64_t global_step = 0;     // optimizer steps taken so far (after on_after_optimizer_step: including this one)
  int64_t batch_in_epoch = 0;  // index of the current step within the epoch
  int64_t steps_per_epoch = 0;
  int64_t total_steps = 0;
  double lr = 0.0;  // the learning rate of the current step

  // The current batch, the model's output and its (this rank's, mean) loss; valid from on_batch_begin (batch
  // only) through on_after_optimizer_step. With accumulation, batch and output are the step's last
  // micro-batch (the first one at on_batch_begin) and loss is the mean over the step's samples.
  data::Example batch;
  at::Tensor output;
  at::Tensor loss;
  // This rank's samples in the current step (all its micro-batches); set before on_after_backward.
  int64_t step_samples = 0;
  // Set before on_after_backward when this step's optimizer step will be skipped (precision fp16 and
  // a non-finite gradient on some rank: see GradScaler); the same on every rank.
  bool step_skipped = false;

  // During an evaluation inside fit(): the batches evaluated on this rank so far and in all (the same
  // on every rank), as on_evaluation_batch_end sees them.
  int64_t eval_batch = 0;
  int64_t eval_batches = 0;

  // This epoch's metrics, reduced over ranks; filled by the trainer before on_evaluation_end
  // (train_loss, train_<metric key>..., test_*, images_per_s, lr, step times) and cleared at
  // on_epoch_begin. Callbacks may add
  // their own entries; the progress callback writes them all to metrics.jsonl.
  std::map<std::string, double> metrics;

  // A callback may set this (with stop_reason) to end fit(), on one rank or on all: the trainer
  // takes the request to its stop vote, so every rank stops after the same step (Note [A callback's
  // stop], train/trainer.cpp). Set in a step or an evaluation batch, the run stops after a later step
  // (two at most) or at the epoch's end; set at an epoch's end (on_evaluation_end, on_epoch_end,
  // on_after_epoch_end), after that epoch; set in on_setup or on_train_begin, before the first epoch.
  // on_train_end still runs, and then every rank has it set. The trainer sets it for stop_after_steps
  // and for a stop signal, time limit or request_stop() that a rank received (Note [Stop on signal]).
  bool stop_requested = false;
  // Set before on_evaluation_end when a stop cut the evaluation short (Note [Stop during evaluation]):
  // its metrics are missing and the epoch stays unfinished. A stop_requested set by another callback
  // after a complete evaluation leaves it false.
  bool evaluation_cut_short = false;
  // True from the end of on_epoch_end to the next on_epoch_begin: the epoch is done (evaluated and
  // ended). A run that stops then (Note [Stop at epoch ends]) resumes at the next epoch's start.
  bool epoch_finished = false;
  // Why the trainer stopped early, when it did ("SIGUSR1 on rank 1", ...; see
  // DistributedTrainer::stop_reason()): set with stop_requested, so on_train_end can report it.
  std::string stop_reason;

  // Set by a resuming callback (the Checkpointer) in on_train_begin: the trainer continues the train
  // loader from here instead of epoch 0 (global_step and epoch must be set with it).
  std::optional<data::SamplerState> resume_position;
};

class Callback {
 public:
  virtual ~Callback() = default;

  // Runs on every callback before any on_train_begin, so before the Checkpointer restores a
  // checkpoint: the place to change the model's structure (register buffers a checkpoint must hold,
  // as pruning masks do). The train loop has not started; global_step is 0.
  virtual void on_setup(TrainerContext& ctx) {}
  virtual void on_train_begin(TrainerContext& ctx) {}
  virtual void on_train_end(TrainerContext& ctx) {}
  virtual void on_epoch_begin(TrainerContext& ctx) {}
  // After the epoch's evaluation: add the epoch's metrics here (the ProgressLogger, added last,
  // writes them).
  virtual void on_epoch_end(TrainerContext& ctx) {}
  // After every callback's on_epoch_end: the epoch is complete, its metrics and every callback's
  // state included, so this is where the epoch's checkpoint is written (the Checkpointer saves here).
  // A callback that throws in on_epoch_end leaves the epoch without a checkpoint: a resumed run
  // trains it again rather than skipping what it never recorded.
  virtual void on_after_epoch_end(TrainerContext& ctx) {}
  virtual void on_batch_begin(TrainerContext& ctx) {}
  // Gradients are averaged over ranks; the optimizer has not stepped yet. Changing .grad() here
  // changes the step.
  virtual void on_after_backward(TrainerContext& ctx) {}
  virtual void on_after_optimizer_step(TrainerContext& ctx) {}
  // After every callback's on_after_optimizer_step: the step is complete, every callback's state
  // included, so this is where checkpoints are written (the Checkpointer saves here).
  virtual void on_step_end(TrainerContext& ctx) {}
  // Around the epoch's evaluation (the model is put in eval mode inside it): a callback may change
  // what is evaluated (quantization-aware training evaluates the int8 weights) and undo it after.
  virtual void on_evaluation_begin(TrainerContext& ctx) {}
  // After each batch of the epoch's evaluation (eval_batch of eval_batches; every rank has the same
  // number), in eval mode and without gradients: for progress reports. The metrics come at the end.
  virtual void on_evaluation_batch_end(TrainerContext& ctx) {}
  virtual void on_evaluation_end(TrainerContext& ctx) {}

  // Checkpointed state (Note [Callback state]): a callback that returns a non-empty state_key() has
  // save_state()'s string stored in every checkpoint under that key and handed to load_state() on
  // resume (before the trainer continues). The format of the string is the callback's own (JSON,
  // numbers, a serialised archive...). Keys must be unique among the trainer's callbacks (a duplicate
  // is an error when saving) and use only letters, digits and '_'.
  //
  // Saving is collective: the Checkpointer calls save_state() and then save_tensors() of each such
  // callback, in callback order, on every rank, and writes rank 0's results. So state that is the
  // same on every rank needs nothing special, and state that differs per rank may be gathered to
  // rank 0 with the communicator (from on_setup's ctx) inside these calls, as PowerSGD's residuals are
  // (PowerSGDStateCallback). Loading is not collective: every rank reads the same file and gets the
  // same string and tensors (all ranks' parts, for gathered state: each takes its own). They are
  // loaded after the optimizer's state and before the model's values (Note [A checkpoint that does
  // not fit], checkpoint.cpp), so load_state() and load_tensors() may check the state against the
  // model's shapes, not its values; throwing refuses the checkpoint on every rank, with the model and
  // the optimizer left as they were. Check before changing anything: a refusal should change nothing.
  virtual std::string state_key() const { return ""; }
  virtual std::string save_state() const { return ""; }
  virtual void load_state(const std::string& state) {}
  // Tensor state (weight averages and the like), checkpointed under the same state_key as tensors
  // rather than text; load_tensors receives them in the same order, after load_state.
  virtual std::vector<at::Tensor> save_tensors() const { return {}; }
  virtual void load_tensors(std::vector<at::Tensor> tensors) {}

  // What must be the same on every rank for this callback to stay in step (its options: when and over
  // which weights it issues collectives, or changes the model). DistributedTrainer::fit compares it
  // across ranks with its own options before the first step, so ranks given other pruning schedules,
  // say, get one error naming the callback instead of collectives of other sizes later. Empty: nothing
  // beyond the callback's type (which fit() compares anyway).
  virtual std::string agreement() const { return ""; }
};

using CallbackPtr = std::shared_ptr<Callback>;

}  // namespace lockstep::train
