#pragma once
// PowerSGDStateCallback: puts a ddp::PowerSGDState in the trainer's checkpoints (every rank's
// error-feedback residuals, the warm-start Qs, the iteration count and the stats), so that a resumed
// PowerSGD run is bitwise the run that never stopped (Note [PowerSGD checkpoints] in
// src/ddp/powersgd.cpp).
//
// The trainer adds one by itself when TrainerOptions::ddp.comm_hook was made by ddp::powersgd_hook()
// (ddp::powersgd_state_of finds its state), which covers config files (ddp.comm_hook: powersgd) and
// hooks built by hand with powersgd_hook(options) or powersgd_hook(state). Add one yourself only when
// your hook wraps a state in a function of its own, which the trainer cannot see into:
//
//   auto state = std::make_shared<lockstep::ddp::PowerSGDState>(powersgd_options);
//   trainer_options.ddp.comm_hook = [state](lockstep::comm::Communicator& comm, const lockstep::ddp::GradBucket& b) {
//     /* ... */ return state->reduce(comm, b);
//   };
//   lockstep::train::DistributedTrainer trainer(model, optimizer, comm, trainer_options);
//   trainer.add_callback(std::make_shared<lockstep::train::PowerSGDStateCallback>(state));
//
// (the trainer adds none of its own for a state that a callback of yours already holds).

#include <memory>
#include <string>
#include <vector>

#include "lockstep/train/callback.hpp"

namespace lockstep::ddp {
class PowerSGDState;
}

namespace lockstep::train {

class GradScaler;

class PowerSGDStateCallback : public Callback {
 public:
  explicit PowerSGDStateCallback(std::shared_ptr<ddp::PowerSGDState> state);

  const std::shared_ptr<ddp::PowerSGDState>& state() const { return state_; }

  // Remembers the communicator and the model (for the checks on load).
  void on_setup(TrainerContext& ctx) override;
  // Warns (rank 0) when training resumed from a checkpoint that held no PowerSGD state (written
  // without PowerSGD or by an older Lockstep): error feedback then starts from zero (and, from an
  // older Lockstep's checkpoint, which lacks the iteration count, so does the iteration).
  void on_train_begin(TrainerContext& ctx) override;
  // Note [PowerSGD under loss scaling]: with a GradScaler among the trainer's callbacks (fp16), keeps
  // the residuals in the units of the scaled gradients the hook sees: rescaled when the scale grows
  // or backs off, dropped after a step the scaler skipped (that step's approximation was never
  // applied, and an overflowing step's gradients are discarded everywhere else too).
  void on_after_optimizer_step(TrainerContext& ctx) override;

  std::string state_key() const override { return "powersgd"; }
  // Collective (the Checkpointer calls it on every rank): every rank's serialised state, gathered on
  // rank 0, which returns one byte tensor per rank; the other ranks return none.
  std::vector<at::Tensor> save_tensors() const override;
  // Every rank gets every rank's tensors and restores its own (ddp::PowerSGDState::restore_state),
  // checked against the model's parameters. Throws a lockstep::Error on another world size or other
  // PowerSGD options.
  void load_tensors(std::vector<at::Tensor> tensors) override;

 private:
  std::shared_ptr<ddp::PowerSGDState> state_;
  // From on_setup: the trainer's (they live as long as the trainer).
  comm::Communicator* communicator_ = nullptr;
  const GradScaler* scaler_ = nullptr;  // the trainer's, if any (fp16)
  double last_scale_ = 0.0;             // its scale when the last step's gradients were made
  torch::nn::Module* model_ = nullptr;
  bool restored_ = false;
};

}  // namespace lockstep::train
