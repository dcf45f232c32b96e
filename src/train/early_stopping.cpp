#include "lockstep/train/early_stopping.hpp"

#include <cmath>
#include <iomanip>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cstdio>

#include "lockstep/core/error.hpp"
#include "lockstep/train/ema.hpp"
#include "lockstep/train/metrics.hpp"
#include "lockstep/train/model_tensors.hpp"

namespace lockstep::train {

namespace {

bool ends_with(const std::string& text, const std::string& tail) {
  return text.size() >= tail.size() && text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
}

}  // namespace

EarlyStopping::EarlyStopping(EarlyStoppingOptions options)
    : options_(std::move(options)), best_(std::numeric_limits<double>::quiet_NaN()) {
  LOCKSTEP_CHECK(!options_.monitor.empty(), "EarlyStoppingOptions::monitor is empty; expected a metric name such as "
                                            "test_loss or test_acc");
  LOCKSTEP_CHECK(options_.mode == "min" || options_.mode == "max" || options_.mode == "auto",
                 "EarlyStoppingOptions::mode must be min, max or auto, got '", options_.mode, "'");
  LOCKSTEP_CHECK(options_.patience >= 1, "EarlyStoppingOptions::patience must be >= 1, got ", options_.patience);
  LOCKSTEP_CHECK(options_.min_delta >= 0 && std::isfinite(options_.min_delta),
                 "EarlyStoppingOptions::min_delta must be a finite number >= 0, got ", options_.min_delta);
  mode_ = options_.mode;
  if (mode_ == "auto") mode_ = ends_with(options_.monitor, "acc") || ends_with(options_.monitor, "accuracy") ? "max" : "min";
}

std::string EarlyStopping::agreement() const {
  // Each rank decides from the same metrics: the same options make it decide alike (a rank that
  // stopped alone would leave the others in the next epoch's collectives).
  return nlohmann::json{{"monitor", options_.monitor}, {"mode", options_.mode}, {"patience", options_.patience},
                        {"min_delta", options_.min_delta}, {"restore_best_weights", options_.restore_best_weights}}
      .dump();
}

std::string EarlyStopping::reason() const {
  std::ostringstream os;
  os.precision(6);
  os << "early stopping: " << options_.monitor << " did not improve";
  if (options_.min_delta > 0) os << " by more than " << options_.min_delta;
  os << " for " << waited_ << " epoch" << (waited_ == 1 ? "" : "s");
  if (std::isnan(best_)) {
    os << " (no finite value yet)";
  } else {
    os << " (best " << best_ << " at epoch " << best_epoch_ << ")";
  }
  return os.str();
}

void EarlyStopping::on_setup(TrainerContext& ctx) {
  if (options_.restore_best_weights && ctx.callbacks != nullptr) {
    // An average after this callback puts the raw weights back at each evaluation's end before this one
    // copies them (on_evaluation_end runs in reverse order), and its own at the run's end over the best
    // epoch's: the model would end as the last average, under a message saying the best was restored.
    bool after_this = false;
    for (const auto& callback : *ctx.callbacks) {
      LOCKSTEP_CHECK(!after_this || dynamic_cast<const ExponentialMovingAverage*>(callback.get()) == nullptr,
                     "EarlyStopping: with restore_best_weights, add ExponentialMovingAverage before it. After it, "
                     "the best weights kept would be the raw ones, not the average that was evaluated, and the "
                     "average put in at the end would replace them");
      after_this = after_this || callback.get() == this;
    }
  }
  if (options_.mode != "auto" || ctx.trainer_metrics == nullptr) return;
  for (const std::string prefix : {"train_", "test_"}) {
    if (options_.monitor.rfind(prefix, 0) != 0) continue;
    const std::string key = options_.monitor.substr(prefix.size());
    for (const auto& metric : *ctx.trainer_metrics) {
      for (const auto& k : metric->keys()) {
        if (k == key) mode_ = metric->higher_is_better() ? "max" : "min";
      }
    }
  }
}

void EarlyStopping::on_train_begin(TrainerContext& ctx) {
  // The Checkpointer (first) has restored this callback's state: a run that stopped early stays stopped.
  if (stopped() && !ctx.stop_requested) {
    ctx.stop_requested = true;
    ctx.stop_reason = reason();
  }
}

void EarlyStopping::on_evaluation_end(TrainerContext& ctx) {
  // A stop cut the evaluation short: its metrics are not there (a resumed run evaluates again). A stop
  // another callback asked for after a complete evaluation (on_evaluation_end runs in reverse order)
  // still counts this epoch: it may be the best one.
  if (ctx.evaluation_cut_short) return;
  const auto it = ctx.metrics.find(options_.monitor);
  if (it == ctx.metrics.end()) {
    std::string keys;
    for (const auto& [key, value] : ctx.metrics) keys += (keys.empty() ? "" : ", ") + key;
    LOCKSTEP_FAIL("EarlyStopping: the monitored metric '", options_.monitor, "' is not among epoch ", ctx.epoch + 1,
                  "'s metrics (", keys, ")",
                  options_.monitor.rfind("test_", 0) == 0 ? "; test_* metrics need an evaluation set" : "");
  }
  const double value = it->second;
  const bool better = std::isfinite(value) &&
                      (std::isnan(best_) || (mode_ == "min" ? value < best_ - options_.min_delta
                                                            : value > best_ + options_.min_delta));
  if (better) {
    best_ = value;
    best_epoch_ = ctx.epoch + 1;
    waited_ = 0;
    if (options_.restore_best_weights && ctx.model != nullptr) {
      at::NoGradGuard no_grad;
      best_weights_.clear();
      for (const auto& t : parameters_and_buffers(*ctx.model)) {
        best_weights_.push_back(t.detach().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true));
      }
    }
  } else {
    ++waited_;
  }
  ctx.metrics["early_stopping_wait"] = static_cast<double>(waited_);
  if (stopped() && !ctx.stop_requested) {  // another callback's earlier request keeps its reason
    ctx.stop_requested = true;
    ctx.stop_reason = reason();
  }
}

void EarlyStopping::on_train_end(TrainerContext& ctx) {
  // A signal's stop (or a request, a time limit) ends this process, not the run: leave the weights.
  const bool run_over = !ctx.stop_requested || stopped();
  if (!options_.restore_best_weights || best_weights_.empty() || !run_over || ctx.model == nullptr) return;
  std::vector<at::Tensor> now = parameters_and_buffers(*ctx.model);
  LOCKSTEP_CHECK(now.size() == best_weights_.size(), "EarlyStopping: the best weights hold ", best_weights_.size(),
                 " tensors but the model has ", now.size(), " parameters and buffers");
  at::NoGradGuard no_grad;
  for (std::size_t i = 0; i < now.size(); ++i) {
    LOCKSTEP_CHECK(now[i].sizes() == best_weights_[i].sizes(), "EarlyStopping: best-weights tensor ", i, " has shape ",
                   best_weights_[i].sizes(), " but the model's is ", now[i].sizes());
    now[i].copy_(best_weights_[i]);
  }
  notify_buffers_replaced(*ctx.model);  // Note [Buffers that are state]
  if (ctx.world.rank == 0) {
    std::printf("early stopping: restored the weights of epoch %lld (%s %.6g)\n", static_cast<long long>(best_epoch_),
                options_.monitor.c_str(), best_);
    std::fflush(stdout);
  }
}

std::string EarlyStopping::save_state() const {
  std::ostringstream out;
  out.precision(17);
  // Quoted: a metric's key may hold a space ("test_top 5"); an unquoted monitor (older checkpoints) reads
  // back as before.
  out << std::quoted(options_.monitor) << ' ' << mode_ << ' ';
  if (std::isnan(best_)) {
    out << "nan";
  } else {
    out << best_;
  }
  out << ' ' << best_epoch_ << ' ' << waited_;
  return out.str();
}

void EarlyStopping::load_state(const std::string& state) {
  std::istringstream in(state);
  std::string monitor, mode, best_text;
  int64_t best_epoch = 0, waited = 0;
  in >> std::quoted(monitor) >> mode >> best_text >> best_epoch >> waited;
  LOCKSTEP_CHECK(!in.fail(), "EarlyStopping: the checkpoint's state '", state, "' is not one this callback wrote");
  LOCKSTEP_CHECK(monitor == options_.monitor && mode == mode_, "EarlyStopping: the checkpoint monitored ", monitor,
                 " (", mode, "), this run monitors ", options_.monitor, " (", mode_,
                 "); resume with the same early_stopping settings or start afresh");
  best_ = best_text == "nan" ? std::numeric_limits<double>::quiet_NaN() : std::stod(best_text);
  best_epoch_ = best_epoch;
  waited_ = waited;
}

void EarlyStopping::load_tensors(std::vector<at::Tensor> tensors) {
  // A checkpoint is read onto the model's device: the best weights are kept on the host, as when saved.
  best_weights_.clear();
  for (const auto& t : tensors) best_weights_.push_back(t.to(at::kCPU));
}

}  // namespace lockstep::train
