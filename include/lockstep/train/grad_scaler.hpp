#pragma once
// GradScaler: dynamic loss scaling for float16 training (what torch.cuda.amp.GradScaler does in
// Python). The loss is multiplied by a scale before backward so that small float16 gradients do not
// underflow; after the gradients are averaged over ranks they are divided by it again and checked for
// inf/nan. A step with any non-finite gradient is skipped and the scale halved; after
// growth_interval good steps in a row the scale doubles.
//
// Note [Identical skip decision]: whether a step is skipped is decided by a Max all-reduce of this
// rank's "found inf/nan" flag, so every rank skips or steps together even if their gradients were to
// differ (they are averaged, so normally they do not): a rank that stepped alone would drift from
// the others for good.
//
// The trainer uses it when TrainerOptions::precision is "fp16". It is also a Callback, only for its
// checkpointed state (scale, growth tracker) and for adding loss_scale / skipped_steps to the metrics.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/train/callback.hpp"

namespace lockstep::train {

struct GradScalerOptions {
  double init_scale = 65536.0;  // 2^16, as PyTorch
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;  // good steps in a row before the scale grows
};

class GradScaler final : public Callback {
 public:
  explicit GradScaler(GradScalerOptions options = {});

  // loss * scale (for backward).
  at::Tensor scale(const at::Tensor& loss) const;
  // Collective (Note [Identical skip decision]). Divides every defined gradient of `parameters` by the
  // scale in place and returns true when any of them, on any rank, holds inf or nan: skip the step.
  // Gradients on one GPU take one multi-tensor kernel (PyTorch's _amp_foreach_non_finite_check_and_
  // unscale_), others five small ones each. Reading the agreed flag waits for the device, as PyTorch's
  // GradScaler.step does.
  bool unscale(const std::vector<at::Tensor>& parameters, comm::Communicator& comm);
  // After the step (taken or skipped): back off on overflow, grow after growth_interval good steps.
  void update(bool found_inf);

  double scale_value() const { return scale_; }      // the loss is multiplied by this
  int64_t growth_tracker() const { return growth_tracker_; }  // good steps in a row since the last change
  int64_t skipped_steps() const { return skipped_steps_; }
  const GradScalerOptions& options() const { return options_; }

  void on_evaluation_end(TrainerContext& ctx) override;
  std::string state_key() const override { return "grad_scaler"; }
  std::string save_state() const override;
  void load_state(const std::string& state) override;

 private:
  GradScalerOptions options_;
  double scale_;
  int64_t growth_tracker_ = 0;
  int64_t skipped_steps_ = 0;
};

}  // namespace lockstep::train
