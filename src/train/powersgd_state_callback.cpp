#include "lockstep/train/powersgd_state_callback.hpp"

#include <torch/torch.h>

#include <iostream>
#include <map>

#include "lockstep/core/error.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/train/grad_scaler.hpp"

namespace lockstep::train {

PowerSGDStateCallback::PowerSGDStateCallback(std::shared_ptr<ddp::PowerSGDState> state) : state_(std::move(state)) {
  LOCKSTEP_CHECK(state_ != nullptr, "PowerSGDStateCallback needs a PowerSGDState, got nullptr");
}

void PowerSGDStateCallback::on_setup(TrainerContext& ctx) {
  communicator_ = ctx.communicator;
  model_ = ctx.model;
  restored_ = false;
}

void PowerSGDStateCallback::on_train_begin(TrainerContext& ctx) {
  // Note [PowerSGD under loss scaling]: the scaler's scale as restored (the Checkpointer ran first).
  scaler_ = nullptr;
  if (ctx.callbacks != nullptr) {
    for (const auto& cb : *ctx.callbacks) {
      if (const auto* scaler = dynamic_cast<const GradScaler*>(cb.get())) scaler_ = scaler;
    }
  }
  if (scaler_ != nullptr) last_scale_ = scaler_->scale_value();
  // The Checkpointer runs first (Note [Callback order]): a resume has set global_step by now.
  if (ctx.global_step > 0 && !restored_ && ctx.communicator->rank() == 0) {
    std::cerr << "lockstep: warning: resumed at step " << ctx.global_step
              << " from a checkpoint without PowerSGD state: error feedback starts from zero (and from a "
                 "checkpoint of an older Lockstep, which lacks the iteration count, start_iteration's "
                 "uncompressed steps come again)\n";
  }
}

void PowerSGDStateCallback::on_after_optimizer_step(TrainerContext& ctx) {
  if (scaler_ == nullptr) return;
  const double scale = scaler_->scale_value();
  if (ctx.step_skipped) {
    state_->rescale_residuals(0.0);
  } else if (scale != last_scale_ && last_scale_ > 0.0) {
    state_->rescale_residuals(scale / last_scale_);
  }
  last_scale_ = scale;
}

std::vector<at::Tensor> PowerSGDStateCallback::save_tensors() const {
  LOCKSTEP_CHECK(communicator_ != nullptr,
                 "PowerSGDStateCallback: save before on_setup (it needs the trainer's communicator)");
  const std::vector<std::string> states = state_->gather_state(*communicator_, /*root=*/0);
  std::vector<at::Tensor> tensors;
  tensors.reserve(states.size());
  for (const std::string& bytes : states) {
    at::Tensor t = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kUInt8);
    std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(t.data_ptr<uint8_t>()));
    tensors.push_back(std::move(t));
  }
  return tensors;
}

void PowerSGDStateCallback::load_tensors(std::vector<at::Tensor> tensors) {
  LOCKSTEP_CHECK(communicator_ != nullptr && model_ != nullptr,
                 "PowerSGDStateCallback: load before on_setup (it needs the trainer's communicator and model)");
  std::vector<std::string> states;
  states.reserve(tensors.size());
  for (const at::Tensor& tensor : tensors) {
    const at::Tensor bytes = tensor.to(torch::kCPU, torch::kUInt8).contiguous();
    const auto* begin = reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>());
    states.emplace_back(begin, begin + bytes.numel());
  }
  tensors.clear();
  std::map<std::string, std::vector<int64_t>> parameters;
  for (const auto& item : model_->named_parameters(/*recurse=*/true)) {
    parameters[item.key()] = item.value().sizes().vec();
  }
  state_->restore_state(states, *communicator_, &parameters);
  restored_ = true;
}

}  // namespace lockstep::train
