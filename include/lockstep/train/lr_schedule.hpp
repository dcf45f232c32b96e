#pragma once
// Learning-rate schedules as pure functions of the global step, so a resumed run needs no schedule
// state in its checkpoint: the step counter alone says where the schedule is.

#include <cstdint>
#include <string>

namespace lockstep::train {

enum class LrScheduleKind { Constant, Step, Cosine };

// "constant", "step" or "cosine"; anything else throws naming the accepted values.
LrScheduleKind parse_lr_schedule_kind(const std::string& name);
std::string to_string(LrScheduleKind kind);

struct LrScheduleOptions {
  LrScheduleKind kind = LrScheduleKind::Constant;
  // The peak learning rate before world-size scaling. 0 = the optimizer's first parameter group's lr
  // when the trainer is constructed.
  double base_lr = 0.0;
  // Linear warm-up from base/warmup to base over warmup_epochs * steps_per_epoch + warmup_steps steps.
  double warmup_epochs = 0.0;
  int64_t warmup_steps = 0;
  // Step schedule: multiply by gamma every step_size epochs.
  int64_t step_size = 30;
  double gamma = 0.1;
  // Cosine schedule: decays from base to min_lr at step total_steps (one past the last step run).
  double min_lr = 0.0;
  // Linear scaling rule (Goyal et al. 2017): the peak lr is base_lr * world_size, since the global
  // batch is world_size times the per-rank batch.
  bool scale_lr_with_world_size = false;
};

// Throws, naming the field (as TrainerOptions::lr.<field>), for options no schedule can follow: a
// negative or non-finite base_lr, warm-up or min_lr, a step_size below 1, a gamma outside (0, 1], or a
// cosine min_lr above its peak. `base_lr`: the resolved base (options.base_lr, or the optimizer's lr
// where that is 0).
void check_lr_schedule(const LrScheduleOptions& options, double base_lr, int world_size);

// The learning rate for global step `step` (0-based) of a run of `total_steps` steps with
// `steps_per_epoch` steps per epoch on `world_size` ranks. `base_lr` must already be resolved (> 0 or 0).
double lr_at(const LrScheduleOptions& options, int64_t step, int64_t steps_per_epoch, int64_t total_steps,
             int world_size);

// The fraction of the cosine decay done at `step` (0 during the warm-up, 1 from total_steps on): what
// lr_at's cosine schedule follows, and what a change of total_steps moves.
double cosine_progress(const LrScheduleOptions& options, int64_t step, int64_t steps_per_epoch, int64_t total_steps);

}  // namespace lockstep::train
