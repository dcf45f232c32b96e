#include "lockstep/train/ema.hpp"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <sstream>
#include <cmath>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "lockstep/core/error.hpp"
#include "lockstep/train/model_tensors.hpp"

namespace lockstep::train {

void validate(const EmaOptions& o) {
  LOCKSTEP_CHECK(o.decay >= 0.0 && o.decay < 1.0, "EmaOptions::decay must be in [0, 1), got ", o.decay);
  LOCKSTEP_CHECK(o.every_steps >= 1, "EmaOptions::every_steps must be >= 1, got ", o.every_steps);
}

ExponentialMovingAverage::ExponentialMovingAverage(EmaOptions options) : options_(options) { validate(options_); }

std::string ExponentialMovingAverage::agreement() const {
  // Each rank averages its own copy of the (identical) model: the same options keep the copies equal.
  return nlohmann::json{{"decay", options_.decay},       {"warmup", options_.warmup},
                        {"every_steps", options_.every_steps}, {"evaluate", options_.evaluate},
                        {"apply_at_end", options_.apply_at_end}}
      .dump();
}

double ExponentialMovingAverage::decay_at(int64_t t) const {
  if (!options_.warmup) return options_.decay;
  return std::min(options_.decay, (1.0 + static_cast<double>(t)) / (10.0 + static_cast<double>(t)));
}

void ExponentialMovingAverage::on_train_begin(TrainerContext& ctx) {
  const std::vector<at::Tensor> now = parameters_and_buffers(*ctx.model);
  copied_ = state_buffer_mask(*ctx.model);  // Note [Buffers that are state]
  if (!average_.empty()) {
    // Restored from a checkpoint (load_tensors ran in the Checkpointer's on_train_begin, before this).
    LOCKSTEP_CHECK(average_.size() == now.size(), "ExponentialMovingAverage: the checkpoint holds ", average_.size(),
                   " averaged tensors but the model has ", now.size());
    for (size_t i = 0; i < now.size(); ++i) {
      LOCKSTEP_CHECK(average_[i].sizes() == now[i].sizes(), "ExponentialMovingAverage: averaged tensor ", i,
                     " has shape ", average_[i].sizes(), " but the model's is ", now[i].sizes());
      average_[i] = average_[i].to(now[i].device(), now[i].scalar_type());
    }
    return;
  }
  at::NoGradGuard no_grad;
  for (const auto& t : now) average_.push_back(t.detach().clone());
}

// Every rank holds the same weights after a step, so every rank folds in the same values. The
// Checkpointer writes in on_step_end, after this, so a checkpoint holds the average of its step.
void ExponentialMovingAverage::on_after_optimizer_step(TrainerContext& ctx) {
  if (ctx.global_step % options_.every_steps != 0 || average_.empty()) return;
  const double d = decay_at(updates_);
  at::NoGradGuard no_grad;
  const std::vector<at::Tensor> now = parameters_and_buffers(*ctx.model);
  for (size_t i = 0; i < now.size(); ++i) {
    if (at::isFloatingType(now[i].scalar_type()) && !copied_[i]) {
      average_[i].mul_(d).add_(now[i].detach(), 1.0 - d);
    } else {
      average_[i].copy_(now[i]);
    }
  }
  ++updates_;
  last_decay_ = d;
}

void ExponentialMovingAverage::swap_in(TrainerContext& ctx) {
  if (!saved_.empty() || average_.empty()) return;
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> now = parameters_and_buffers(*ctx.model);
  for (size_t i = 0; i < now.size(); ++i) {
    saved_.push_back(now[i].detach().clone());
    now[i].copy_(average_[i]);
  }
  notify_buffers_replaced(*ctx.model);
}

void ExponentialMovingAverage::restore(TrainerContext& ctx) {
  if (saved_.empty()) return;
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> now = parameters_and_buffers(*ctx.model);
  for (size_t i = 0; i < now.size(); ++i) now[i].copy_(saved_[i]);
  saved_.clear();
  notify_buffers_replaced(*ctx.model);
}

void ExponentialMovingAverage::on_evaluation_begin(TrainerContext& ctx) {
  if (options_.evaluate) swap_in(ctx);
}

void ExponentialMovingAverage::on_evaluation_end(TrainerContext& ctx) {
  restore(ctx);
  ctx.metrics["ema_updates"] = static_cast<double>(updates_);
  ctx.metrics["ema_decay"] = last_decay_;
}

void ExponentialMovingAverage::on_train_end(TrainerContext& ctx) {
  restore(ctx);
  if (options_.apply_at_end && !average_.empty()) {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> now = parameters_and_buffers(*ctx.model);
    for (size_t i = 0; i < now.size(); ++i) now[i].copy_(average_[i]);
    notify_buffers_replaced(*ctx.model);
  }
}

std::string ExponentialMovingAverage::save_state() const { return std::to_string(updates_); }

void ExponentialMovingAverage::load_state(const std::string& state) {
  std::istringstream in(state);
  int64_t updates = 0;
  LOCKSTEP_CHECK(static_cast<bool>(in >> updates), "ExponentialMovingAverage: checkpointed state '",
                 state.substr(0, 40), "' is not an update count");
  updates_ = updates;  // only once read (a refused state changes nothing)
  // The reported decay is the last update's: a run resumed at an epoch's end takes no step before it
  // reports that epoch again.
  last_decay_ = updates_ > 0 ? decay_at(updates_ - 1) : 0.0;
}

void ExponentialMovingAverage::load_tensors(std::vector<at::Tensor> tensors) { average_ = std::move(tensors); }

}  // namespace lockstep::train
