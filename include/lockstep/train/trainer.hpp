#pragma once
// DistributedTrainer: a complete synchronous data-parallel training loop over ddp::DataParallel, with
// a sharded, reshuffled train loader, a loss of your choice (loss.hpp: cross entropy by default),
// metrics exact over ranks (metrics.hpp: accuracy by default) on the training batches and an exact
// evaluation, a learning-rate schedule, and callbacks (callback.hpp) for everything else.
//
//   auto model = lockstep::models::ResNet18(options);
//   auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
//   lockstep::train::DistributedTrainer trainer(model, opt, runtime.communicator(), trainer_options);
//   trainer.add_callback(my_callback);
//   trainer.fit(train_set, test_set);
//
// Construction is collective (DataParallel checks the ranks' models and broadcasts rank 0's).
// See docs/training.md.

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/data/dataset.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/train/callback.hpp"
#include "lockstep/train/checkpoint.hpp"
#include "lockstep/train/grad_scaler.hpp"
#include "lockstep/train/loss.hpp"
#include "lockstep/train/lr_schedule.hpp"
#include "lockstep/train/metrics.hpp"

namespace torch::optim {
class Optimizer;
}
namespace lockstep {
class StopSignals;
}
namespace lockstep::comm {
class StopVote;
}

namespace lockstep::train {

struct EpochTotals;
class EpochTotalsState;

struct TrainerOptions {
  int64_t epochs = 1;
  size_t batch_size = 32;        // per rank and micro-batch; a step's global batch is
                                 // batch_size * accumulation_steps * world size
  // Gradient accumulation: each optimizer step runs this many micro-batches of batch_size per rank,
  // the first ones under DataParallel::no_sync (no communication), each loss weighted by its share of
  // the step's samples, so a step's gradient is the mean over all its samples (Note [Accumulation]).
  // Callback events and global_step count optimizer steps, not micro-batches.
  int64_t accumulation_steps = 1;
  // Clip the gradients' global L2 norm to this (0 = off), after on_after_backward and before the
  // optimizer step, on gradients already averaged over ranks (so every rank clips alike) and unscaled
  // (precision fp16). Adds the metric grad_norm: the epoch's mean norm before clipping.
  double clip_grad_norm = 0.0;
  size_t eval_batch_size = 256;  // per rank
  // Seeds the train sampler's shuffle, and torch's default generator with seed + rank (dropout
  // etc.). Model initialisation needs no seed: DataParallel copies rank 0's model to every rank.
  uint64_t seed = 0;
  LrScheduleOptions lr;
  // What is minimised (train/loss.hpp): a built-in by name, or loss_fn, a function of the program's
  // own ((output, target) -> the batch's mean loss), which replaces it when set.
  LossOptions loss;
  LossFn loss_fn;
  // Computed on the training batches (train_<key>) and in the evaluation (test_<key>), exact over ranks
  // (train/metrics.hpp): the built-ins named here, then custom_metrics. The loss is always reported
  // (train_loss, test_loss); a regression would name {"mse", "mae"}, a run that wants no more than the
  // loss {}.
  std::vector<std::string> metrics = {"accuracy"};
  std::vector<MetricPtr> custom_metrics;
  // metrics.jsonl and checkpoints/ go here; empty = no metrics.jsonl, and no checkpoints unless
  // checkpoint.directory is set.
  std::string output_dir;
  // Start from the weights in this file (a Lockstep checkpoint's model, or a model file: the rules of
  // load_model_weights, train/checkpoint.hpp), loaded on every rank by the first fit(), before the
  // callbacks' on_train_begin. For fine-tuning: pruning or quantization-aware training from a trained
  // dense model. A run that resumes a checkpoint (checkpoint.resume) continues from that instead, and
  // does not read this file. Empty = the model as given.
  std::string init_from;
  // Progress line every log_every steps (rank 0); 0 = no progress lines, summaries only.
  int64_t log_every = 20;
  // Add the built-in ProgressLogger (rank 0 prints; metrics.jsonl when output_dir is set).
  bool progress = true;
  // Add the built-in Checkpointer (when output_dir or checkpoint.directory is set). Without it, a
  // checkpoint.resume that names a file, or a checkpoint.directory with this false, is an error.
  bool checkpoints = true;
  CheckpointOptions checkpoint;
  ddp::DataParallelOptions ddp;
  // Loader: batches prepared ahead by a background thread; drop a short last batch of each epoch.
  size_t prefetch = 2;
  bool drop_last_batch = false;
  // Stop after this many global steps (0 = run all epochs); for tests of resuming and quick runs.
  int64_t stop_after_steps = 0;
  // Note [Stop on signal]: signals that end training cleanly: every rank stops after the same step (a
  // step or two after the signal reached any one of them), the Checkpointer writes its checkpoint
  // (checkpoint.at_end), and fit() returns; stop_reason() and caught_signal() say why. A second signal
  // of the same kind ends the process at once. Names as lockstep::signal_number() takes them
  // ("SIGTERM", "USR1", ...); empty: none. A signal that already has a handler of the program's own
  // when fit() starts is left alone (core/stop_signals.hpp).
  std::vector<std::string> stop_signals = {"SIGTERM", "SIGUSR1"};
  // End training the same way once fit() has run this long on any rank (0 = no limit), so that a job
  // with a wall-clock limit ends with a checkpoint instead of being killed in the middle of a step.
  double stop_after_seconds = 0.0;
  // Where the model trains: "auto" (the model's device if it is already on a GPU, else the current
  // CUDA device when CUDA is usable, else the CPU), "cpu", "cuda" or "cuda:N". The model is moved there
  // before DataParallel is built; batches follow with non-blocking copies from pinned memory.
  std::string device = "auto";
  // "fp32"; "bf16": forward and loss under autocast to bfloat16; "fp16": autocast to float16 with
  // dynamic loss scaling (GradScaler: steps whose gradients hold inf/nan are skipped on every rank).
  // See docs/gpu.md for which devices support which.
  std::string precision = "fp32";
  GradScalerOptions grad_scaler;
  // Store the model's 4-D parameters and buffers channels_last once it is on its device (Note
  // [Channels last], train/model_tensors.hpp): NHWC convolutions, usually the faster ones on GPUs with
  // tensor cores, and the same results as NCHW up to rounding.
  bool channels_last = false;
};

// Whether fit() adds the built-in Checkpointer: checkpoints on, and output_dir or checkpoint.directory
// set (somewhere to put the files).
bool keeps_checkpoints(const TrainerOptions& options);

class DistributedTrainer {
 public:
  using ForwardFn = std::function<at::Tensor(const at::Tensor&)>;

  // Collective. `forward` maps a batch's data to the output that the loss and the metrics compare with
  // the batch's target (for classification: images [B, C, H, W] to logits [B, classes]). The optimizer
  // must hold each parameter once: Module::parameters() lists a tied weight once per name, and an
  // optimizer given that list would step it twice (refused; config::make_optimizer takes each once).
  DistributedTrainer(std::shared_ptr<torch::nn::Module> model, ForwardFn forward,
                     std::shared_ptr<torch::optim::Optimizer> optimizer, comm::CommunicatorPtr comm,
                     TrainerOptions options = {});
  // For TORCH_MODULE holders whose Impl has forward(Tensor).
  template <typename Impl>
  DistributedTrainer(const torch::nn::ModuleHolder<Impl>& model, std::shared_ptr<torch::optim::Optimizer> optimizer,
                     comm::CommunicatorPtr comm, TrainerOptions options = {})
      : DistributedTrainer(std::static_pointer_cast<torch::nn::Module>(model.ptr()),
                           [impl = model.ptr()](const at::Tensor& x) { return impl->forward(x); }, std::move(optimizer),
                           std::move(comm), std::move(options)) {}
  ~DistributedTrainer();
  DistributedTrainer(const DistributedTrainer&) = delete;
  DistributedTrainer& operator=(const DistributedTrainer&) = delete;

  // Callbacks run in the order added, after the built-in Checkpointer (and the GradScaler of precision
  // fp16, and a PowerSGDStateCallback when options.ddp.comm_hook was made by ddp::powersgd_hook(), so
  // that its state is checkpointed) and before the built-in ProgressLogger (so the logger sees every
  // metric the others add).
  void add_callback(CallbackPtr callback);

  // Collective. Trains for options.epochs (resuming first if a checkpoint says so), evaluating on
  // `eval_set` after each epoch (skipped when null). Returns the last epoch's metrics.
  std::map<std::string, double> fit(data::DatasetPtr train_set, data::DatasetPtr eval_set);

  // Asks fit() to stop cleanly, as a stop signal does (Note [Stop on signal]): every rank stops after
  // the same step, a step or two later. Any thread, any one rank; takes effect in the running fit() or
  // the next one.
  void request_stop();
  // Why the last fit() stopped before its last step ("" when it ran to the end), e.g. "SIGUSR1 on rank
  // 1", "request_stop() on ranks 0, 2", "stop_after_seconds (3600 s) on rank 0", "stop_after_steps
  // (40)", "a callback". The same on every rank.
  const std::string& stop_reason() const { return stop_reason_; }
  // The stop signal that a rank caught during the last fit() (the lowest such rank's), whether or not
  // it came in time to end training early; 0: none. The same on every rank: a program's cue to exit as
  // the signal asked once it has saved what it wants (train_resnet exits with 128 + the signal).
  int caught_signal() const { return caught_signal_; }

  // Collective: the loss and the metrics over `eval_set`, each sample counted exactly once over all
  // ranks. Keys: test_loss, test_count, and test_<key> for each metric's keys (test_acc by default).
  std::map<std::string, double> evaluate(const data::DatasetPtr& eval_set);

  ddp::DataParallel& data_parallel() { return *dp_; }
  torch::nn::Module& model() { return *model_; }
  torch::optim::Optimizer& optimizer() { return *optimizer_; }
  const TrainerOptions& options() const { return options_; }
  const std::vector<CallbackPtr>& callbacks() const { return callbacks_; }
  // Where the model and the batches live (TrainerOptions::device, resolved).
  const c10::Device& device() const { return device_; }
  // The loss scaler of precision "fp16" (null otherwise).
  const std::shared_ptr<GradScaler>& grad_scaler() const { return scaler_; }

 private:
  void run_epoch(TrainerContext& ctx, data::Loader& loader, bool resumed);
  // Refuses an empty evaluation set, naming it (the sampler's own error would not).
  void check_evaluation_set(const data::Dataset& eval_set) const;
  // evaluate(); inside fit() (`ctx` given) it also posts the stop vote before every batch and returns
  // no metrics, with *cut_short set, when a stop ends it early (Note [Stop during evaluation]).
  std::map<std::string, double> run_evaluation(const data::DatasetPtr& eval_set, TrainerContext* ctx,
                                               bool* cut_short);
  // The constructor's checks and moves, on this rank (the constructor shares their failure).
  void set_up();
  // Note [Stop on signal]: this rank's stop code, posted to the stop vote after every step.
  std::int32_t local_stop_code() const;
  // Note [A callback's stop]: takes a stop that a callback set in ctx since the last vote (the
  // trainer's own are agreed already) and holds it as this rank's vote; then local_stop_code().
  std::int32_t stop_code(TrainerContext& ctx);
  // The callbacks-only votes before the first epoch and after the last (Note [A callback's stop]).
  void take_callback_votes(TrainerContext& ctx);
  // Acts on the codes a stop vote returned (every rank gets the same ones). With `callbacks_only`,
  // only callbacks' codes stop the run (the others are posted again by the next vote).
  void take_stop_votes(TrainerContext& ctx, const std::vector<std::int32_t>& codes, bool callbacks_only = false);
  // Every rank stops, for `reason` (the same on every rank): what a vote or stop_after_steps decided.
  void agree_stop(TrainerContext& ctx, const std::string& reason);
  // stop_after_steps: every rank stops once ctx.global_step reaches it (the same on every rank).
  void stop_at_step_limit(TrainerContext& ctx);
  void set_lr(double lr);
  // `metrics_failure`: why build_metrics failed on this rank ("" if it did not).
  void check_ranks_agree(const data::Dataset& train_set, const data::Dataset* eval_set,
                         const std::string& metrics_failure) const;
  // Forward and loss under the precision's autocast.
  void forward_and_loss(TrainerContext& ctx);
  // metrics_ from options_.metrics and custom_metrics, sized by the data set's class count.
  void build_metrics(const data::Dataset& dataset);
  // The loss's weight in the epoch's loss (loss_weight) for the built-in cross_entropy over class
  // indices; undefined (the batch's samples) for every other loss.
  at::Tensor loss_weight_of(const at::Tensor& target) const;
  // options_.init_from's weights at the first fit(), unless a checkpoint will be resumed (collective).
  void start_from_init_weights(TrainerContext& ctx);

  std::shared_ptr<torch::nn::Module> model_;
  ForwardFn forward_;
  LossFn loss_;  // options_.loss_fn, else the built-in options_.loss names
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  comm::CommunicatorPtr comm_;
  TrainerOptions options_;
  std::unique_ptr<ddp::DataParallel> dp_;
  std::vector<CallbackPtr> user_callbacks_;
  std::vector<CallbackPtr> callbacks_;  // built-ins + user's, in event order (set by fit)
  double base_lr_ = 0.0;
  // Each parameter group's lr at construction over the first group's: the schedule sets the first
  // group's lr and the others keep their proportion (a backbone at 1/100 of the head's lr stays so).
  std::vector<double> lr_ratios_;
  c10::Device device_ = c10::Device(c10::kCPU);
  c10::ScalarType autocast_dtype_ = c10::ScalarType::Float;  // Float: no autocast
  std::shared_ptr<GradScaler> scaler_;
  // Note [Stop on signal]: live during fit().
  std::unique_ptr<StopSignals> signals_;
  std::unique_ptr<comm::StopVote> stop_vote_;
  std::chrono::steady_clock::time_point fit_start_{};
  std::atomic<bool> stop_asked_{false};  // request_stop()
  std::string stop_reason_;
  int caught_signal_ = 0;
  bool stop_agreed_ = false;  // ctx.stop_requested came from a vote (or stop_after_steps): every rank has it
  std::string agreed_reason_;  // its reason, the same on every rank
  // Note [A callback's stop]: a callback on this rank asked to stop (with this reason, "" for none
  // given); posted to the vote until every rank stops.
  bool callback_stop_ = false;
  std::string callback_stop_reason_;

  // Accumulated over one epoch on this rank: loss sum, count, the metrics' sums, forward/backward/comm/exposed
  // seconds, steps (Note [Exact metrics]); checkpointed by the built-in EpochTotalsState (Note [Epoch
  // totals in checkpoints]).
  std::unique_ptr<EpochTotals> totals_;
  std::shared_ptr<EpochTotalsState> totals_state_;
  // The metrics of the last fit() (num_classes from its training set) or evaluate() (from its set).
  std::vector<MetricPtr> metrics_;
  bool metrics_built_ = false;
  bool init_from_done_ = false;  // start_from_init_weights ran (a later fit() continues the model)
};

}  // namespace lockstep::train
