#include "lockstep/train/trainer.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <unordered_set>

#include "lockstep/comm/agree.hpp"
#include "lockstep/comm/stop_vote.hpp"
#include "lockstep/core/device.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/core/stop_signals.hpp"
#include "lockstep/data/loader.hpp"
#include "lockstep/data/sharded_sampler.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/train/grad_clip.hpp"
#include "lockstep/train/metric_tracker.hpp"
#include "lockstep/train/model_tensors.hpp"
#include "lockstep/train/powersgd_state_callback.hpp"
#include "lockstep/train/precision.hpp"
#include "lockstep/train/progress.hpp"
#include "core/exception_text.hpp"
#include "train/checksum.hpp"
#include "train/epoch_totals.hpp"

namespace lockstep::train {

bool keeps_checkpoints(const TrainerOptions& options) {
  return options.checkpoints && (!options.output_dir.empty() || !options.checkpoint.directory.empty());
}

namespace {

// The loader of a training or evaluation pass: batches pinned (and pinned for this device) on a GPU.
data::LoaderOptions loader_options_for(const TrainerOptions& options, c10::Device device, size_t batch_size) {
  data::LoaderOptions out;
  out.batch_size = batch_size;
  out.prefetch = options.prefetch;
  out.pin_memory = device.is_cuda();
  if (device.is_cuda() && device.has_index()) out.pin_device = device;
  return out;
}

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Note [Exact metrics]: each rank sums (not averages) its loss, its sample count and each metric's sums
// (correct predictions and their count for accuracy, squared errors for mse, a confusion matrix for
// macro_f1: train/metrics.hpp), and one float64 all-reduce adds the sums, so the epoch's loss and
// metrics are exact over all samples whatever the shard sizes are: never an average of per-rank
// averages. Each sample counts once: the sampler's padding (repeats that make every rank's share
// equal) is trained on but left out of the sums, in training as in evaluation (Note [Exact
// evaluation]). A batch's loss is weighted by the samples its mean stands for (loss_weight: the
// targets cross_entropy counted, when it ignores some).
std::vector<double> allreduce_sums(comm::Communicator& comm, const std::vector<double>& local) {
  at::Tensor t = torch::tensor(local, torch::kFloat64);
  comm.allreduce(t)->wait();
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

// TrainerOptions::device "auto" follows a model already on a GPU; otherwise resolve_device decides.
c10::Device resolve_trainer_device(const std::string& name, torch::nn::Module& model) {
  if (name == "auto") {
    for (const auto& parameter : model.parameters()) {
      if (parameter.is_cuda()) return parameter.device();
    }
  }
  return resolve_device(name, "TrainerOptions::device");
}

// Note [Batches to the device]: the loader pins host batches when the device is a GPU, so these copies
// are asynchronous on the current stream, ordered before the forward pass that reads them.
data::Example to_device(data::Example batch, const c10::Device& device) {
  if (device.is_cpu()) return batch;
  batch.data = batch.data.to(device, /*non_blocking=*/true);
  batch.target = batch.target.to(device, /*non_blocking=*/true);
  return batch;
}

// Note [Stop on signal]: a rank's stop code. Positive: the signal it caught.
constexpr std::int32_t kStopRequested = -1;  // request_stop()
constexpr std::int32_t kStopTimeLimit = -2;  // stop_after_seconds
constexpr std::int32_t kStopCallback = -3;   // Note [A callback's stop]

std::string describe_stop_code(std::int32_t code, const TrainerOptions& options) {
  if (code == kStopRequested) return "request_stop()";
  if (code == kStopTimeLimit) {
    std::ostringstream os;
    os << "stop_after_seconds (" << options.stop_after_seconds << " s)";
    return os.str();
  }
  return signal_name(code);
}

// Collective: posts `code`, then reads every vote in flight (Note [Stop at epoch ends]).
std::vector<std::int32_t> read_every_vote(comm::StopVote& vote, std::int32_t code) {
  vote.post(code);
  return vote.finish();
}

// A double as it is (std::to_string keeps six decimals: lr 1e-7 and 2e-7 would read alike).
std::string exact(double value) {
  char text[40];
  std::snprintf(text, sizeof text, "%.17g", value);
  return text;
}

}  // namespace

DistributedTrainer::DistributedTrainer(std::shared_ptr<torch::nn::Module> model, ForwardFn forward,
                                       std::shared_ptr<torch::optim::Optimizer> optimizer, comm::CommunicatorPtr comm,
                                       TrainerOptions options)
    : model_(std::move(model)),
      forward_(std::move(forward)),
      optimizer_(std::move(optimizer)),
      comm_(std::move(comm)),
      options_(std::move(options)) {
  LOCKSTEP_CHECK(comm_ != nullptr, "DistributedTrainer: the communicator is null");
  // Collective: a check that fails on one rank alone (a device or precision its host lacks, a model
  // that does not fit there, a config that differs) fails every rank here, before DataParallel's
  // collectives, which the others would otherwise wait in for the timeout.
  comm::run_on_every_rank(*comm_, [this] { set_up(); }, "DistributedTrainer");
  dp_ = std::make_unique<ddp::DataParallel>(model_, comm_, options_.ddp);
}

// This rank's checks, device and precision, and the model on its device (the constructor, before
// DataParallel).
void DistributedTrainer::set_up() {
  LOCKSTEP_CHECK(model_ != nullptr, "DistributedTrainer: the model is null");
  LOCKSTEP_CHECK(static_cast<bool>(forward_), "DistributedTrainer: the forward function is empty");
  loss_ = options_.loss_fn ? options_.loss_fn : make_loss(options_.loss);
  for (const auto& name : options_.metrics) check_metric_name(name);
  LOCKSTEP_CHECK(optimizer_ != nullptr, "DistributedTrainer: the optimizer is null");
  LOCKSTEP_CHECK(options_.epochs >= 0, "TrainerOptions::epochs must be >= 0, got ", options_.epochs);
  LOCKSTEP_CHECK(options_.batch_size > 0, "TrainerOptions::batch_size must be positive");
  LOCKSTEP_CHECK(options_.eval_batch_size > 0, "TrainerOptions::eval_batch_size must be positive");
  LOCKSTEP_CHECK(options_.accumulation_steps >= 1, "TrainerOptions::accumulation_steps must be >= 1, got ",
                 options_.accumulation_steps);
  LOCKSTEP_CHECK(options_.clip_grad_norm >= 0 && std::isfinite(options_.clip_grad_norm),
                 "TrainerOptions::clip_grad_norm must be >= 0 (0 = off), got ", options_.clip_grad_norm);
  LOCKSTEP_CHECK(!optimizer_->param_groups().empty(), "DistributedTrainer: the optimizer has no parameter groups");
  {
    // A tensor the optimizer holds twice (model->parameters() of a model with tied weights) would be
    // stepped twice per step.
    std::unordered_set<const void*> held;
    for (const auto& group : optimizer_->param_groups()) {
      for (const at::Tensor& p : group.params()) {
        if (held.insert(p.unsafeGetTensorImpl()).second) continue;
        std::string names;
        for (const auto& item : model_->named_parameters()) {
          if (item.value().is_same(p)) names += (names.empty() ? "'" : ", '") + item.key() + "'";
        }
        LOCKSTEP_FAIL("DistributedTrainer: the optimizer holds a parameter twice (",
                      names.empty() ? "not the model's" : names,
                      "): it would step it twice per step. Module::parameters() lists a tied weight once per "
                      "name; give the optimizer each tensor once");
      }
    }
  }
  base_lr_ = options_.lr.base_lr > 0 ? options_.lr.base_lr : optimizer_->param_groups().front().options().get_lr();
  check_lr_schedule(options_.lr, base_lr_, comm_->size());
  {
    const double first = optimizer_->param_groups().front().options().get_lr();
    for (auto& group : optimizer_->param_groups()) {
      const double lr = group.options().get_lr();
      LOCKSTEP_CHECK(first > 0 || lr == first, "DistributedTrainer: the optimizer's first parameter group has lr 0 but "
                     "another has ", lr, ": the schedule scales every group's lr in proportion to the first group's");
      lr_ratios_.push_back(first > 0 ? lr / first : 1.0);
    }
  }

  device_ = resolve_trainer_device(options_.device, *model_);
  LOCKSTEP_CHECK(options_.precision == "fp32" || options_.precision == "bf16" || options_.precision == "fp16",
                 "TrainerOptions::precision must be fp32, bf16 or fp16, found '", options_.precision, "'");
  autocast_dtype_ = autocast_dtype(options_.precision);
  LOCKSTEP_CHECK(device_.is_cuda() || autocast_dtype_ != c10::ScalarType::Half || autocast_supported(device_, autocast_dtype_),
                 "TrainerOptions::precision fp16 on the CPU needs LibTorch >= 2.4 (this one has no float16 CPU "
                 "kernels for autocast); use bf16 on the CPU");
  LOCKSTEP_CHECK(autocast_supported(device_, autocast_dtype_), "TrainerOptions::precision ", options_.precision,
                 " is not supported on ", device_);
  LOCKSTEP_CHECK(options_.stop_after_seconds >= 0 && std::isfinite(options_.stop_after_seconds),
                 "TrainerOptions::stop_after_seconds must be >= 0 (0 = no limit), got ", options_.stop_after_seconds);
  for (const auto& name : options_.stop_signals) signal_number(name, "TrainerOptions::stop_signals");
  // Without the Checkpointer nothing reads these: a resume asked for would silently train afresh.
  if (!keeps_checkpoints(options_)) {
    const char* why = options_.checkpoints ? "output_dir and checkpoint.directory are both empty"
                                           : "checkpoints is false (checkpoint.enabled)";
    LOCKSTEP_CHECK(options_.checkpoint.resume == "auto" || options_.checkpoint.resume == "never",
                   "TrainerOptions::checkpoint.resume names a checkpoint to resume from ('", options_.checkpoint.resume,
                   "'), but this run keeps no checkpoints (", why, "), so nothing would load it; ",
                   options_.checkpoints ? "set output_dir or checkpoint.directory"
                                        : "set checkpoints true (set every_epoch and at_end false to write none)");
    LOCKSTEP_CHECK(options_.checkpoint.directory.empty(), "TrainerOptions::checkpoint.directory is '",
                   options_.checkpoint.directory, "', but checkpoints is false (checkpoint.enabled): nothing would be "
                   "written there or resumed from it");
  }
  if (autocast_dtype_ == c10::ScalarType::Half) scaler_ = std::make_shared<GradScaler>(options_.grad_scaler);
  // Module::to moves each parameter's data in place, so the optimizer (built on these parameters)
  // keeps pointing at them. DataParallel is built after the move: its buckets live on the device.
  model_->to(device_);
  // Before DataParallel too: its buckets take the parameters' layout (Note [Gradient layout]).
  if (options_.channels_last) to_channels_last(*model_);
}

DistributedTrainer::~DistributedTrainer() = default;

void DistributedTrainer::add_callback(CallbackPtr callback) {
  LOCKSTEP_CHECK(callback != nullptr, "DistributedTrainer::add_callback: null callback");
  user_callbacks_.push_back(std::move(callback));
}

// Note [Ranks agree]: fit() is one long sequence of collectives whose length follows from the data
// set sizes and these options; a rank with another value (a truncated data file, a stale config on
// one node, a callback added on one rank only) would leave the others waiting, or train on
// overlapping shards. So fit() first checks them: one all-gather of a fingerprint when they agree,
// and otherwise the same error on every rank naming the first difference.
void DistributedTrainer::check_ranks_agree(const data::Dataset& train_set, const data::Dataset* eval_set,
                                           const std::string& metrics_failure) const {
  const TrainerOptions& o = options_;
  std::vector<std::pair<std::string, std::string>> entries = {
      {"the training set size", std::to_string(train_set.size())},
      {"the evaluation set size", eval_set ? std::to_string(eval_set->size()) : "none"},
      // Sizes the metrics' sums (a confusion matrix has classes x classes), all-reduced every epoch.
      {"the number of classes", std::to_string(train_set.num_classes())},
      {"epochs", std::to_string(o.epochs)},
      {"batch_size", std::to_string(o.batch_size)},
      {"accumulation_steps", std::to_string(o.accumulation_steps)},
      {"eval_batch_size", std::to_string(o.eval_batch_size)},
      {"drop_last_batch", std::to_string(o.drop_last_batch)},
      {"stop_after_steps", std::to_string(o.stop_after_steps)},
      {"seed", std::to_string(o.seed)},
      {"clip_grad_norm", exact(o.clip_grad_norm)},
      {"precision", o.precision},
      // Each would leave the models different with no collective out of step: silently wrong numbers.
      {"lr (after the optimizer's own, at construction)", exact(base_lr_)},
      // ZeRO's optimizer all-gathers in every step and when a checkpoint is saved; another optimizer
      // on one rank would leave the models different.
      {"the optimizer", c10::demangle(typeid(*optimizer_).name())},
      {"lr.kind", to_string(o.lr.kind)},
      {"lr.warmup_epochs", exact(o.lr.warmup_epochs)},
      {"lr.warmup_steps", std::to_string(o.lr.warmup_steps)},
      {"lr.step_size", std::to_string(o.lr.step_size)},
      {"lr.gamma", exact(o.lr.gamma)},
      {"lr.min_lr", exact(o.lr.min_lr)},
      {"lr.scale_lr_with_world_size", std::to_string(o.lr.scale_lr_with_world_size)},
      {"grad_scaler", o.precision != "fp16" ? "unused"
                                             : exact(o.grad_scaler.init_scale) + " " + exact(o.grad_scaler.growth_factor) +
                                                   " " + exact(o.grad_scaler.backoff_factor) + " " +
                                                   std::to_string(o.grad_scaler.growth_interval)},
      {"channels_last", std::to_string(o.channels_last)},
      // Saving is collective (the generators' states are gathered): whether and when must agree.
      {"output_dir (set or not)", o.output_dir.empty() ? "not set" : "set"},
      // checkpoint.directory alone keeps checkpoints too (a Checkpointer, whose setup is collective).
      {"checkpoint.directory (set or not)", o.checkpoint.directory.empty() ? "not set" : "set"},
      {"checkpoints kept", keeps_checkpoints(o) ? "yes" : "no"},
      // The weights to start from are read on every rank, compared and broadcast (collective).
      {"init_from (set or not)", o.init_from.empty() ? "not set" : "set"},
      // The progress logger shares rank 0's metrics.jsonl errors with a collective (Note [A failed checkpoint]).
      {"progress", std::to_string(o.progress)},
      {"checkpoint.at_end", std::to_string(o.checkpoint.at_end)},
      {"the loss", o.loss_fn ? "a loss_fn of the program's own" : describe_loss(o.loss)},
      {"checkpoints", std::to_string(o.checkpoints)},
      {"checkpoint.every_steps", std::to_string(o.checkpoint.every_steps)},
      {"checkpoint.every_epoch", std::to_string(o.checkpoint.every_epoch)},
      {"checkpoint.resume", o.checkpoint.resume},
  };
  std::string metrics;
  for (const auto& metric : metrics_) metrics += (metrics.empty() ? "" : ", ") + metric->name();
  entries.emplace_back("the metrics", !metrics_failure.empty() ? "cannot be built (" + metrics_failure + ")"
                                     : metrics.empty()        ? "none"
                                                              : metrics);
  std::string callbacks;
  for (const auto& callback : user_callbacks_) {
    callbacks += (callbacks.empty() ? "" : ", ") + c10::demangle(typeid(*callback).name());
  }
  entries.emplace_back("the callbacks", callbacks.empty() ? "none" : callbacks);
  // Their options (Callback::agreement): a pruning schedule or EarlyStopping's patience on one rank
  // alone would have that rank issue other collectives, or stop alone, later.
  for (std::size_t i = 0; i < user_callbacks_.size(); ++i) {
    const std::string agreement = user_callbacks_[i]->agreement();
    if (agreement.empty()) continue;
    entries.emplace_back("the options of callback #" + std::to_string(i) + " (" +
                             c10::demangle(typeid(*user_callbacks_[i]).name()) + ")",
                         agreement);
  }
  comm::check_same_values(*comm_, entries, "DistributedTrainer::fit",
                          "Every rank must train with the same options on the same data (the same files, subsets, "
                          "config and command line).");
}

void DistributedTrainer::request_stop() { stop_asked_.store(true); }

std::int32_t DistributedTrainer::local_stop_code() const {
  if (signals_) {
    if (const int signal = signals_->caught()) return signal;
  }
  if (stop_asked_.load()) return kStopRequested;
  if (options_.stop_after_seconds > 0 && seconds_since(fit_start_) >= options_.stop_after_seconds) return kStopTimeLimit;
  if (callback_stop_) return kStopCallback;
  return 0;
}

// Note [A callback's stop]: a callback sets ctx.stop_requested on its own rank, perhaps on that rank
// alone (a guard that reads this rank's ctx.loss, a file only one node sees). Were the trainer to act
// on it there, that rank would leave the loop and the others would wait for it in the next
// collective. So the trainer never acts on a callback's stop directly: at each stop vote it takes the
// request out of ctx (clears stop_requested and stop_reason) and posts it as this rank's code, until
// every rank stops; every rank then stops alike, as for a signal (Note [Stop on signal]). A request in
// a step or an evaluation batch stops the run after a later step (the vote's lag: two steps at most,
// or the epoch's end); one at an epoch's end (on_evaluation_end, on_epoch_end, on_after_epoch_end)
// is read by the vote that follows on_after_epoch_end, and one in on_setup or on_train_begin by a vote
// before the first epoch: both stop the run there, with no step more. Every rank then has
// stop_requested and the same reason: the callback's own where every rank asked for one reason
// (EarlyStopping), else "<reason, or 'a callback'> on rank r" (the reasons all-gathered once). A
// callback that reads stop_requested in a later event of the same step sees its own request until
// the vote takes it.
std::int32_t DistributedTrainer::stop_code(TrainerContext& ctx) {
  if (ctx.stop_requested && !stop_agreed_) {
    if (!callback_stop_) callback_stop_reason_ = ctx.stop_reason;  // an earlier request keeps its reason
    callback_stop_ = true;
    ctx.stop_requested = false;
    ctx.stop_reason.clear();
  }
  return local_stop_code();
}

// Note [A callback's stop]: the votes before the first epoch and after the last one count callbacks'
// requests only. This rank's other codes (a signal, request_stop()) come first in local_stop_code(),
// and StopVote::finish() gives each rank's first code in flight, so either would hide a callback's
// request: the votes in flight are read first, then each rank votes its callback request alone. The
// other codes persist, and the next vote posts them again.
void DistributedTrainer::take_callback_votes(TrainerContext& ctx) {
  take_stop_votes(ctx, stop_vote_->finish(), /*callbacks_only=*/true);
  stop_code(ctx);
  take_stop_votes(ctx, read_every_vote(*stop_vote_, callback_stop_ ? kStopCallback : 0), /*callbacks_only=*/true);
}

// Note [Stop on signal]: a signal (or a time limit, or request_stop()) reaches one rank, at any point
// of its step; the others know nothing of it. So after every step each rank posts its stop code to a
// comm::StopVote, which hands every rank the same codes two steps later: all ranks stop after the same
// step, with no host synchronisation per step (on a GPU the vote waits on the stream, not the host).
// The stop then takes the stop_after_steps path: the epoch is left unfinished (a resumed run finishes
// it), on_train_end runs, and the Checkpointer writes the checkpoint that resumes bitwise. The handler
// only sets a flag (core/stop_signals.hpp), and the flag is read between steps, so no collective is
// ever interrupted half-way.
//
// Note [Stop at epoch ends]: a vote posted in an epoch's last `lag` steps would only be read two steps
// into the next epoch, after the whole evaluation, and a signal during the evaluation (or while
// on_after_epoch_end writes the epoch's checkpoint) later still. So at the two points where every rank
// already waits for the others (the epoch's metric sums are all-reduced after its steps; the
// evaluation's after it) the trainer also reads every vote in flight: two more blocking all-gathers
// per epoch, none per step. Votes from the steps stop the run before the epoch's evaluation (a resumed
// run evaluates it); votes from its evaluation or end stop it after on_after_epoch_end, with
// ctx.epoch_finished set, so the checkpoint resumes at the next epoch's start (read_every_vote).
void DistributedTrainer::take_stop_votes(TrainerContext& ctx, const std::vector<std::int32_t>& codes,
                                         bool callbacks_only) {
  std::map<std::int32_t, std::vector<int>> ranks_by_code;
  for (std::size_t r = 0; r < codes.size(); ++r) {
    if (codes[r] == 0) continue;
    if (caught_signal_ == 0 && codes[r] > 0) caught_signal_ = codes[r];
    if (callbacks_only && codes[r] != kStopCallback) continue;
    ranks_by_code[codes[r]].push_back(static_cast<int>(r));
  }
  if (ranks_by_code.empty() || stop_agreed_) return;
  std::string reason;
  for (const auto& [code, ranks] : ranks_by_code) {
    if (code != kStopCallback) {
      reason += (reason.empty() ? "" : "; ") + describe_stop_code(code, options_) + " on " + comm::rank_list(ranks);
      continue;
    }
    // Note [A callback's stop]: the reasons live on the ranks that asked; every rank has the codes,
    // so every rank takes part in this (once per fit) all-gather and composes the same reason.
    const std::vector<std::string> reasons = comm::allgather_strings(*comm_, callback_stop_ ? callback_stop_reason_ : "");
    std::map<std::string, std::vector<int>> ranks_by_reason;
    for (const int r : ranks) {
      const std::string& text = reasons[static_cast<std::size_t>(r)];
      ranks_by_reason[text.empty() ? "a callback" : text].push_back(r);
    }
    for (const auto& [text, asked] : ranks_by_reason) {
      // Every rank asked, for one reason (EarlyStopping): that reason as it is.
      const bool everyone = ranks_by_reason.size() == 1 && asked.size() == codes.size();
      reason += (reason.empty() ? "" : "; ") + text + (everyone ? "" : " on " + comm::rank_list(asked));
    }
  }
  agree_stop(ctx, reason);
}

void DistributedTrainer::agree_stop(TrainerContext& ctx, const std::string& reason) {
  ctx.stop_requested = true;
  ctx.stop_reason = reason;
  agreed_reason_ = reason;
  stop_agreed_ = true;
}

void DistributedTrainer::stop_at_step_limit(TrainerContext& ctx) {
  if (!stop_agreed_ && options_.stop_after_steps > 0 && ctx.global_step >= options_.stop_after_steps) {
    agree_stop(ctx, "stop_after_steps (" + std::to_string(options_.stop_after_steps) + ")");
  }
}

void DistributedTrainer::set_lr(double lr) {
  auto& groups = optimizer_->param_groups();
  for (std::size_t i = 0; i < groups.size(); ++i) {
    // The first group's ratio is 1; a group added after construction keeps the first group's lr.
    groups[i].options().set_lr(i < lr_ratios_.size() ? lr * lr_ratios_[i] : lr);
  }
}

std::map<std::string, double> DistributedTrainer::fit(data::DatasetPtr train_set, data::DatasetPtr eval_set) {
  LOCKSTEP_CHECK(train_set != nullptr, "DistributedTrainer::fit: the training set is null");
  const int rank = comm_->rank();
  const int world = comm_->size();
  // Note [Stop on signal]: caught from here to the end of fit(), agreed on after every step.
  struct StopScope {
    DistributedTrainer& trainer;
    ~StopScope() {
      trainer.stop_vote_.reset();
      trainer.signals_.reset();
    }
  } stop_scope{*this};
  signals_ = std::make_unique<StopSignals>(options_.stop_signals);
  stop_vote_ = std::make_unique<comm::StopVote>(comm_, device_);
  fit_start_ = Clock::now();
  stop_reason_.clear();
  caught_signal_ = 0;
  stop_agreed_ = false;
  agreed_reason_.clear();
  callback_stop_ = false;
  callback_stop_reason_.clear();
  // Dropout and other draws differ per rank (each sees other samples) but repeat from run to run.
  torch::manual_seed(options_.seed + static_cast<uint64_t>(rank));

  // Before anything that could fail on one rank alone for a difference the check names (an empty
  // data set, another class count): the ranks then fail together. Metrics that cannot be built (a
  // class count they do not allow) are one of those differences, or fail every rank alike.
  std::exception_ptr metrics_failed;
  std::string metrics_failure;
  try {
    build_metrics(*train_set);
  } catch (...) {
    metrics_failed = std::current_exception();
    metrics_failure = detail::current_exception_text();
  }
  check_ranks_agree(*train_set, eval_set.get(), metrics_failure);
  if (metrics_failed) std::rethrow_exception(metrics_failed);
  // Its size is the same on every rank (just checked): all fail here, before an epoch is spent.
  if (eval_set != nullptr) check_evaluation_set(*eval_set);
  if (!options_.output_dir.empty()) {  // set on every rank or on none: agreed just above
    // Collective (Note [A failed checkpoint]): a directory rank 0 cannot create fails every rank here.
    comm::run_on_root(
        *comm_, 0, [&] { std::filesystem::create_directories(options_.output_dir); },
        "trainer: cannot create output_dir " + options_.output_dir);
  }

  data::ShardedSamplerOptions sampler_options;
  sampler_options.shuffle = true;
  sampler_options.drop_last = false;
  sampler_options.seed = options_.seed;
  auto sampler = std::make_shared<data::ShardedSampler>(train_set->size(), world, rank, sampler_options);
  data::LoaderOptions loader_options = loader_options_for(options_, device_, options_.batch_size);
  loader_options.drop_last_batch = options_.drop_last_batch;
  data::Loader loader(train_set, sampler, loader_options);

  // Note [Callback order]: the Checkpointer first (it resumes in on_train_begin, before the user's
  // callbacks start), the ProgressLogger last (it records the metrics the others add).
  callbacks_.clear();
  if (keeps_checkpoints(options_)) {
    CheckpointOptions checkpoint = options_.checkpoint;
    if (checkpoint.directory.empty()) checkpoint.directory = options_.output_dir + "/checkpoints";
    callbacks_.push_back(std::make_shared<Checkpointer>(checkpoint));
  }
  totals_ = std::make_unique<EpochTotals>(metrics_);
  totals_state_ = std::make_shared<EpochTotalsState>(totals_.get());
  callbacks_.push_back(totals_state_);  // its state: the epoch's metric sums so far
  if (scaler_) callbacks_.push_back(scaler_);  // its scale is checkpointed with the rest
  // A hook made by ddp::powersgd_hook() keeps state that a resume needs (Note [PowerSGD checkpoints]):
  // checkpointed like a callback's, unless the user added a callback for that state already.
  if (std::shared_ptr<ddp::PowerSGDState> powersgd = ddp::powersgd_state_of(options_.ddp.comm_hook)) {
    const bool added = std::any_of(user_callbacks_.begin(), user_callbacks_.end(), [&](const CallbackPtr& cb) {
      const auto* keeper = dynamic_cast<const PowerSGDStateCallback*>(cb.get());
      return keeper != nullptr && keeper->state() == powersgd;
    });
    if (!added) callbacks_.push_back(std::make_shared<PowerSGDStateCallback>(powersgd));
  }
  callbacks_.insert(callbacks_.end(), user_callbacks_.begin(), user_callbacks_.end());
  if (options_.progress) {
    ProgressOptions progress;
    progress.log_every = options_.log_every;
    if (!options_.output_dir.empty()) progress.metrics_path = options_.output_dir + "/metrics.jsonl";
    callbacks_.push_back(std::make_shared<ProgressLogger>(progress));
  }


  TrainerContext ctx;
  ctx.model = model_.get();
  ctx.optimizer = optimizer_.get();
  ctx.data_parallel = dp_.get();
  ctx.communicator = comm_.get();
  ctx.world.rank = rank;
  ctx.world.size = world;
  ctx.options = &options_;
  ctx.train_loader = &loader;
  ctx.callbacks = &callbacks_;
  ctx.trainer_metrics = &metrics_;
  // Note [Accumulation]: a step is accumulation_steps micro-batches; an epoch's last step may have fewer.
  const auto micro_batches = static_cast<int64_t>(loader.batches_per_epoch());
  ctx.steps_per_epoch = (micro_batches + options_.accumulation_steps - 1) / options_.accumulation_steps;
  LOCKSTEP_CHECK(ctx.steps_per_epoch > 0, "DistributedTrainer::fit: no batches per epoch (", train_set->size(),
                 " samples, ", world, " ranks, batch size ", options_.batch_size, ", drop_last_batch ",
                 options_.drop_last_batch, ")");
  ctx.total_steps = ctx.steps_per_epoch * options_.epochs;
  model_->train();

  for (auto& cb : callbacks_) cb->on_setup(ctx);
  start_from_init_weights(ctx);
  for (auto& cb : callbacks_) cb->on_train_begin(ctx);
  int64_t first_epoch = 0;
  bool resumed = false;
  if (ctx.resume_position) {
    loader.load_state(*ctx.resume_position);
    first_epoch = ctx.resume_position->epoch;
    // Steps taken: rounded up, since an epoch's last step may be short (a resume at the epoch's end).
    const int64_t per_step = static_cast<int64_t>(options_.batch_size) * options_.accumulation_steps;
    ctx.batch_in_epoch = (ctx.resume_position->position + per_step - 1) / per_step;
    resumed = true;
    ctx.resume_position.reset();
  }
  // Note [A callback's stop]: one set in on_setup or on_train_begin (EarlyStopping resuming a run it
  // ended) stops every rank before the first epoch. Signals wait for the first step's votes.
  take_callback_votes(ctx);
  // A run resumed at or past stop_after_steps (the same command again) takes no step.
  stop_at_step_limit(ctx);

  std::map<std::string, double> last;
  for (int64_t epoch = first_epoch; epoch < options_.epochs && !ctx.stop_requested; ++epoch) {
    ctx.epoch = epoch;
    ctx.epoch_finished = false;
    ctx.metrics.clear();
    if (!(resumed && epoch == first_epoch)) {
      loader.start_epoch(epoch);
      ctx.batch_in_epoch = 0;
    }
    for (auto& cb : callbacks_) cb->on_epoch_begin(ctx);
    run_epoch(ctx, loader, resumed && epoch == first_epoch);
    // One all-reduce: the step timings' sums, the tracker's (loss, counts, metrics), and the epoch's
    // time (Note [Epoch totals in checkpoints]). Each rank's clock differs, so the time is the mean
    // over ranks: every metric is then the same on every rank, and a callback that decides on one
    // (EarlyStopping monitoring images_per_s) decides alike everywhere.
    totals_->settle();
    std::vector<double> local = totals_->sums;
    const at::Tensor tracked = totals_->tracker.sums().to(at::kCPU);
    local.insert(local.end(), tracked.data_ptr<double>(), tracked.data_ptr<double>() + tracked.numel());
    local.push_back(totals_->seconds());
    totals_->freeze_seconds();  // the evaluation that follows is not training time
    const std::vector<double> sums = allreduce_sums(*comm_, local);
    const double train_seconds = sums.back() / static_cast<double>(world);
    const std::map<std::string, double> trained =
        totals_->tracker.values(std::vector<double>(sums.begin() + kNumSums, sums.end() - 1), "train_");
    const double count = trained.at("train_count");
    const double steps = sums[kSteps];  // summed over ranks
    ctx.metrics["epoch"] = static_cast<double>(epoch + 1);
    ctx.metrics["step"] = static_cast<double>(ctx.global_step);
    ctx.metrics["lr"] = ctx.lr;
    ctx.metrics.insert(trained.begin(), trained.end());  // train_loss, train_count, train_<metric keys>
    // An epoch without steps still has the key; one whose targets were all ignored has no mean (NaN).
    ctx.metrics.emplace("train_loss", count > 0 ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    ctx.metrics["train_time_s"] = train_seconds;
    ctx.metrics["images_per_s"] = train_seconds > 0 ? count / train_seconds : 0.0;
    ctx.metrics["forward_ms"] = steps > 0 ? 1e3 * sums[kForward] / steps : 0.0;
    ctx.metrics["backward_ms"] = steps > 0 ? 1e3 * sums[kBackward] / steps : 0.0;
    ctx.metrics["comm_ms"] = steps > 0 ? 1e3 * sums[kComm] / steps : 0.0;
    ctx.metrics["exposed_comm_ms"] = steps > 0 ? 1e3 * sums[kExposed] / steps : 0.0;
    // Every rank computed the same norms, so the ratio of the sums over ranks is the mean over steps.
    if (options_.clip_grad_norm > 0 && sums[kClipped] > 0) ctx.metrics["grad_norm"] = sums[kGradNorm] / sums[kClipped];
    // A stopped epoch is incomplete: no evaluation and no on_epoch_end; a resumed run finishes it.
    if (ctx.stop_requested) break;

    for (auto& cb : callbacks_) cb->on_evaluation_begin(ctx);
    bool evaluation_cut_short = false;
    if (eval_set) {
      for (const auto& [key, value] : run_evaluation(eval_set, &ctx, &evaluation_cut_short)) ctx.metrics[key] = value;
    }
    ctx.evaluation_cut_short = evaluation_cut_short;
    // Note [Nested evaluation events]: in reverse, so that what callbacks put in place around the
    // evaluation is undone innermost first (weight averaging, then int8 values on top of it).
    for (auto it = callbacks_.rbegin(); it != callbacks_.rend(); ++it) (*it)->on_evaluation_end(ctx);
    if (evaluation_cut_short) break;  // Note [Stop during evaluation]: the epoch stays unfinished
    for (auto& cb : callbacks_) cb->on_epoch_end(ctx);
    ctx.epoch_finished = true;
    for (auto& cb : callbacks_) cb->on_after_epoch_end(ctx);
    last = ctx.metrics;
    // Note [Stop at epoch ends]; after the last epoch only a callback's stop counts (the run is over:
    // the vote after on_train_end reads the others, and stop_reason() stays "").
    if (!stop_agreed_) {
      if (epoch + 1 < options_.epochs) {
        take_stop_votes(ctx, read_every_vote(*stop_vote_, stop_code(ctx)));
      } else {
        take_callback_votes(ctx);
      }
    }
  }
  // Every stop is agreed by now (Note [A callback's stop]); its agreed reason, should a callback have
  // written another on its own rank since.
  ctx.stop_requested = stop_agreed_;
  ctx.stop_reason = stop_agreed_ ? agreed_reason_ : "";
  for (auto& cb : callbacks_) cb->on_train_end(ctx);
  stop_reason_ = ctx.stop_reason;
  // A signal caught after the last vote (late in training, or while on_train_end wrote the checkpoint)
  // is still reported on every rank: one more vote, and every vote in flight read.
  take_stop_votes(ctx, read_every_vote(*stop_vote_, local_stop_code()));
  stop_asked_.store(false);  // a request is for one fit()
  callback_stop_ = false;
  // Rank 0 may still be writing files (checkpoint, metrics.jsonl) that the others want to read once
  // fit() returns.
  comm_->barrier()->wait();
  return last.empty() ? ctx.metrics : last;
}

void DistributedTrainer::build_metrics(const data::Dataset& dataset) {
  std::vector<MetricPtr> metrics = make_metrics(options_.metrics, dataset.info().num_classes, options_.custom_metrics);
  MetricTracker check(metrics);  // names and keys must not repeat
  metrics_ = std::move(metrics);  // only once they are good: a failed build leaves the last ones
  metrics_built_ = true;
}

namespace {
// The CRC-32 (train/checksum.hpp) of the model's parameters' and buffers' bytes (on the CPU), for
// comparing ranks' values once (not per step).
std::string values_fingerprint(const torch::nn::Module& model) {
  std::uint32_t crc = 0;
  for (const at::Tensor& t : parameters_and_buffers(model)) {
    const at::Tensor host = t.detach().to(at::kCPU).contiguous();
    crc = crc32_of(crc, host.data_ptr(), host.nbytes());
  }
  char text[9];
  std::snprintf(text, sizeof(text), "%08x", static_cast<unsigned>(crc));
  return text;
}

// Note [Exact evaluation]'s layout: rank r's i-th sample is the epoch's r + i * world, and positions
// from dataset_size on are the padding, at the end of every rank's share. Of the `batch` samples at
// position `first` of this rank's share, how many are the data set's own.
int64_t samples_not_padding(int64_t rank, int64_t world, int64_t dataset_size, int64_t first, int64_t batch) {
  const int64_t share = dataset_size > rank ? (dataset_size - rank + world - 1) / world : 0;
  return std::clamp<int64_t>(share - first, 0, batch);
}
}  // namespace

// Note [Weights to start from]: TrainerOptions::init_from is loaded at the first fit(), after the
// callbacks' on_setup (their modules, pruning masks and fake-quant points, exist: the file's values go
// around them) and before any on_train_begin (the weight average starts from these weights). Not when
// the Checkpointer will resume a checkpoint: the run continues from that, and the file need not exist
// any more (a preempted fine-tuning run whose dense checkpoints were rotated away). Every rank loads its
// copy (each checks the CRC); a rank that cannot read it fails every rank, and ranks whose copies
// differ fail with the file named.
void DistributedTrainer::start_from_init_weights(TrainerContext& ctx) {
  if (options_.init_from.empty() || init_from_done_) return;
  auto* checkpointer = callbacks_.empty() ? nullptr : dynamic_cast<Checkpointer*>(callbacks_.front().get());
  if (checkpointer == nullptr || !checkpointer->will_resume(ctx)) {
    comm::run_on_every_rank(
        *comm_,
        [this] {
          try {
            load_model_weights(*model_, options_.init_from);
          } catch (const Error& e) {
            throw Error("trainer.init_from: " + e.message(), e.file(), e.line());
          }
        },
        "DistributedTrainer");
    // Each rank read its own copy: a stale copy on one node would train another model there, past
    // DataParallel's check (made at construction). The values' fingerprints must agree.
    comm::check_same_values(*comm_, {{"the weights it read (fingerprint)", values_fingerprint(*model_)}},
                            "DistributedTrainer: trainer.init_from",
                            "Every rank must read the same weights (this rank read " + options_.init_from +
                                "): copy the file anew to the nodes that differ");
    if (ctx.world.rank == 0 && options_.progress) {
      std::printf("starting from the weights in %s (trainer.init_from)\n", options_.init_from.c_str());
      std::fflush(stdout);
    }
  }
  init_from_done_ = true;
}

at::Tensor DistributedTrainer::loss_weight_of(const at::Tensor& target) const {
  // Only cross_entropy over class indices can weigh other than its samples: for the rest, undefined
  // (the tracker's samples) costs no tensor per batch.
  const bool may_ignore = !options_.loss_fn && options_.loss.name == "cross_entropy" &&
                          !at::isFloatingType(target.scalar_type());
  return may_ignore ? loss_weight(options_.loss, target) : at::Tensor();
}

void DistributedTrainer::forward_and_loss(TrainerContext& ctx) {
  AutocastGuard autocast(device_, autocast_dtype_);
  ctx.output = forward_(ctx.batch.data);
  // The built-in losses compute in float32 from 16-bit outputs (train/loss.hpp).
  ctx.loss = loss_(ctx.output, ctx.batch.target);
  LOCKSTEP_CHECK(ctx.loss.defined() && ctx.loss.dim() == 0 && at::isFloatingType(ctx.loss.scalar_type()),
                 "DistributedTrainer: the loss must be a floating-point scalar (the batch's mean), found ",
                 ctx.loss.defined() ? ctx.loss.sizes() : c10::IntArrayRef{}, ctx.loss.defined() ? "" : " (undefined)",
                 options_.loss_fn ? " from TrainerOptions::loss_fn" : "");
}

// Note [Accumulation]: a step of k micro-batches runs the first k - 1 backward passes under no_sync
// (gradients accumulate locally, no communication) and the last one synchronised, which reduces the
// accumulated sum. Each micro-batch's mean loss is weighted by its share of the step's samples
// (divided by the step's micro-batch count when they are equal), so the step's gradient is the mean
// over all its samples: the same step as one batch of k x batch_size (tested). An epoch's last step
// takes the micro-batches that are left, the last of them perhaps short: weighted by their count, a
// short one's samples would weigh more than the others'. Every rank has the same number of samples
// per epoch (the sampler pads), so every rank splits the epoch into the same steps and weights.
void DistributedTrainer::run_epoch(TrainerContext& ctx, data::Loader& loader, bool resumed) {
  // Note [No host sync per step]: the loss, the metrics' sums and the clipped steps' gradient norms
  // stay on the device and are read once, at the end of the epoch (or when a checkpoint is written).
  // Reading them every step (.item()) would make the host wait for the GPU each step, so the next
  // step's kernels could not be queued while this one runs.
  totals_->reset(ctx.epoch);
  // A resumed epoch goes on from the totals its checkpoint held (Note [Epoch totals in checkpoints]).
  if (resumed) totals_state_->restore(ctx.epoch, ctx.world.rank);
  std::vector<double>& sums = totals_->sums;
  LrScheduleOptions schedule = options_.lr;
  schedule.base_lr = base_lr_;
  // The lr of the last step taken: what the epoch reports if it resumed at its end and takes none.
  if (resumed && ctx.global_step > 0) {
    ctx.lr = lr_at(schedule, ctx.global_step - 1, ctx.steps_per_epoch, ctx.total_steps, ctx.world.size);
  }
  const int64_t k = options_.accumulation_steps;
  const auto batches = static_cast<int64_t>(loader.batches_per_epoch());
  // Micro-batches consumed this epoch: a resumed epoch continues where its checkpoint was written.
  int64_t micro = resumed ? loader.state().position / static_cast<int64_t>(options_.batch_size) : 0;
  // Samples in micro-batch b of this rank's epoch, from the loader's plan (the last one may be short).
  const auto batch_size = static_cast<int64_t>(options_.batch_size);
  const auto per_rank = static_cast<int64_t>(loader.sampler()->per_rank());
  const auto micro_samples = [&](int64_t b) { return std::min(batch_size, per_rank - b * batch_size); };
  const int64_t rank = ctx.world.rank, world = ctx.world.size;
  const auto dataset_size = static_cast<int64_t>(loader.sampler()->dataset_size());
  while (auto batch = loader.next()) {
    const int64_t in_step = std::min(k, batches - micro);
    int64_t planned = 0;  // the step's samples
    for (int64_t m = 0; m < in_step; ++m) planned += micro_samples(micro + m);
    ctx.batch = to_device(std::move(*batch), device_);  // Note [Batches to the device]
    ctx.output = at::Tensor();
    ctx.loss = at::Tensor();
    ctx.step_skipped = false;
    ctx.step_samples = 0;
    ctx.lr = lr_at(schedule, ctx.global_step, ctx.steps_per_epoch, ctx.total_steps, ctx.world.size);
    set_lr(ctx.lr);
    for (auto& cb : callbacks_) cb->on_batch_begin(ctx);

    optimizer_->zero_grad();
    at::Tensor step_loss;
    for (int64_t m = 0; m < in_step; ++m) {
      if (m > 0) {
        auto next = loader.next();
        LOCKSTEP_CHECK(next.has_value(), "DistributedTrainer: the loader ran out of batches inside a step (micro-batch ",
                       m + 1, " of ", in_step, ", epoch ", ctx.epoch, ", rank ", ctx.world.rank, ")");
        ctx.batch = to_device(std::move(*next), device_);
      }
      ++micro;
      // Note [Accumulation]: only the step's last backward communicates.
      std::optional<ddp::NoSyncGuard> local;
      if (m + 1 < in_step) local.emplace(dp_->no_sync());
      dp_->before_forward();
      forward_and_loss(ctx);
      dp_->before_backward();
      // Note [Accumulation]: exactly in_step when the micro-batches are equal.
      const double share = static_cast<double>(planned) / static_cast<double>(micro_samples(micro - 1));
      const at::Tensor loss = in_step > 1 ? ctx.loss / share : ctx.loss;
      // Backward runs outside autocast (its ops follow the forward's dtypes), as PyTorch advises.
      if (scaler_) {
        scaler_->scale(loss).backward();
      } else {
        loss.backward();
      }
      local.reset();

      torch::NoGradGuard no_grad;
      ctx.step_samples += ctx.batch.target.size(0);
      // Note [Exact metrics]: the padding is left out.
      const int64_t in_batch = ctx.batch.target.size(0);
      const int64_t counted = samples_not_padding(rank, world, dataset_size, (micro - 1) * batch_size, in_batch);
      if (counted == in_batch) {
        totals_->tracker.update(ctx.output, ctx.batch.target, ctx.loss, loss_weight_of(ctx.batch.target));
      } else if (counted > 0) {
        const at::Tensor output = ctx.output.narrow(0, 0, counted);
        const at::Tensor target = ctx.batch.target.narrow(0, 0, counted);
        AutocastGuard autocast(device_, autocast_dtype_);  // as forward_and_loss calls the loss
        totals_->tracker.update(output, target, loss_(output, target), loss_weight_of(target));
      }
      step_loss = step_loss.defined() ? step_loss + loss.detach() : loss.detach();
      const ddp::StepTimings& t = dp_->last_step();
      sums[kForward] += t.forward_s;
      sums[kBackward] += t.backward_s;
      sums[kComm] += t.communication_s;
      sums[kExposed] += t.exposed_communication_s;
    }
    ctx.loss = step_loss;  // the mean over the step's samples
    // The gradients are averaged over ranks by now; callbacks see them unscaled.
    if (scaler_) ctx.step_skipped = scaler_->unscale(model_->parameters(), *comm_);
    for (auto& cb : callbacks_) cb->on_after_backward(ctx);
    if (options_.clip_grad_norm > 0 && !ctx.step_skipped) {
      // Every rank holds the same averaged gradients, so every rank computes the same norm. It stays on
      // the device (Note [No host sync per step]).
      totals_->add_grad_norm(clip_grad_norm(model_->parameters(), options_.clip_grad_norm));
      sums[kClipped] += 1;
    }
    if (!ctx.step_skipped) optimizer_->step();
    if (scaler_) scaler_->update(ctx.step_skipped);
    ++ctx.global_step;
    sums[kSteps] += 1;
    for (auto& cb : callbacks_) cb->on_after_optimizer_step(ctx);
    for (auto& cb : callbacks_) cb->on_step_end(ctx);
    ++ctx.batch_in_epoch;
    take_stop_votes(ctx, stop_vote_->post(stop_code(ctx)));  // Note [Stop on signal]
    stop_at_step_limit(ctx);
    if (ctx.stop_requested) break;
  }
  // Note [Stop at epoch ends]: the votes of the epoch's last steps, before its evaluation.
  if (!stop_agreed_) take_stop_votes(ctx, read_every_vote(*stop_vote_, stop_code(ctx)));
}

std::map<std::string, double> DistributedTrainer::evaluate(const data::DatasetPtr& eval_set) {
  LOCKSTEP_CHECK(eval_set != nullptr, "DistributedTrainer::evaluate: the data set is null");
  // Inside fit() check_ranks_agree compared these. Each rank cuts its shard by its own set's size, and
  // the sums' sizes follow the classes and metrics: sets of other sizes would mix their samples
  // silently, other classes or metrics would meet in an all-reduce of other sizes.
  std::string metrics;
  for (const auto& name : options_.metrics) metrics += (metrics.empty() ? "" : ", ") + name;
  comm::check_same_values(*comm_,
                          {{"the evaluation set size", std::to_string(eval_set->size())},
                           {"the number of classes", std::to_string(eval_set->num_classes())},
                           {"the metrics", metrics.empty() ? "none" : metrics},
                           {"the metrics of the program's own", std::to_string(options_.custom_metrics.size())}},
                          "DistributedTrainer::evaluate", "Every rank must evaluate the same data set.");
  check_evaluation_set(*eval_set);  // fit() checks its set once, before its first epoch
  return run_evaluation(eval_set, nullptr, nullptr);
}

void DistributedTrainer::check_evaluation_set(const data::Dataset& eval_set) const {
  LOCKSTEP_CHECK(eval_set.size() > 0, "DistributedTrainer: the evaluation set (", eval_set.description(),
                 ") is empty; to train without evaluating, give fit() none (nullptr) (rank ", comm_->rank(), ")");
}

// Note [Stop during evaluation]: an evaluation can outlast a scheduler's grace period (SLURM's KillWait
// is 30 s), so inside fit() it takes the stop vote too, posted before every batch: every rank has the
// same number of evaluation batches (Note [Exact evaluation]), so every rank reads the same codes
// before the same batch and leaves there. Nothing collective is left half-done: the evaluation's only
// collective, the all-reduce of its sums, is skipped on every rank alike. Its metrics would cover a
// part of the set, so there are none; on_evaluation_end still runs (callbacks undo what they put in
// place for it: averaged or int8 weights), on_epoch_end does not, and the epoch stays unfinished: the
// resumed run evaluates it whole. An evaluation shorter than the vote's lag (2 batches) always ends;
// the vote after on_epoch_end then stops the run (Note [Stop at epoch ends]).
std::map<std::string, double> DistributedTrainer::run_evaluation(const data::DatasetPtr& eval_set,
                                                                 TrainerContext* ctx, bool* cut_short) {
  LOCKSTEP_CHECK(eval_set != nullptr, "DistributedTrainer::evaluate: the data set is null");
  if (cut_short != nullptr) *cut_short = false;
  const int rank = comm_->rank();
  const int world = comm_->size();
  data::ShardedSamplerOptions sampler_options;
  sampler_options.shuffle = false;
  sampler_options.drop_last = false;
  auto sampler = std::make_shared<data::ShardedSampler>(eval_set->size(), world, rank, sampler_options);
  data::Loader loader(eval_set, sampler, loader_options_for(options_, device_, options_.eval_batch_size));
  loader.start_epoch(0);

  // Note [Exact evaluation]: the sampler pads the epoch by wrapping around to a multiple of the world
  // size, and rank r's i-th sample sits at global position r + i * world. Positions >= N are the
  // padding (repeats of the first samples): they are masked out, so every sample counts exactly once.
  const auto n = static_cast<int64_t>(eval_set->size());
  if (!metrics_built_) build_metrics(*eval_set);  // evaluate() before any fit()
  // Summed on the device and read once, as in training (Note [No host sync per step]).
  MetricTracker tracker(metrics_);
  int64_t slice_position = 0;
  if (ctx != nullptr) {
    ctx->eval_batch = 0;
    ctx->eval_batches = static_cast<int64_t>(loader.batches_per_epoch());
  }
  const bool was_training = model_->is_training();
  model_->eval();
  {
    torch::NoGradGuard no_grad;
    AutocastGuard autocast(device_, autocast_dtype_);
    while (auto next = loader.next()) {
      if (ctx != nullptr) {  // Note [Stop during evaluation]
        take_stop_votes(*ctx, stop_vote_->post(stop_code(*ctx)));
        if (ctx->stop_requested) break;
      }
      auto batch = std::make_optional(to_device(std::move(*next), device_));
      const int64_t b = batch->target.size(0);
      const int64_t valid = samples_not_padding(rank, world, n, slice_position, b);
      slice_position += b;
      if (valid > 0) {
        at::Tensor output = forward_(batch->data.narrow(0, 0, valid));
        at::Tensor target = batch->target.narrow(0, 0, valid);
        tracker.update(output, target, loss_(output, target), loss_weight_of(target));
      }
      if (ctx != nullptr) {
        ++ctx->eval_batch;
        for (auto& cb : callbacks_) cb->on_evaluation_batch_end(*ctx);
      }
    }
  }
  if (was_training) model_->train();
  if (ctx != nullptr) stop_code(*ctx);  // a callback's request in the last batch's event: held for the vote
  if (ctx != nullptr && ctx->stop_requested) {
    if (cut_short != nullptr) *cut_short = true;
    return {};
  }
  // One all-reduce: the loss, the count and every metric's sums.
  std::map<std::string, double> result = tracker.compute(*comm_, "test_");
  // Samples whose targets were all ignored (loss_weight 0) have no mean loss: NaN, not a 0 that looks
  // perfect. (The set is not empty: check_evaluation_set.)
  result.emplace("test_loss", std::numeric_limits<double>::quiet_NaN());
  return result;
}

}  // namespace lockstep::train
