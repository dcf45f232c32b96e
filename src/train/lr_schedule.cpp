#include "lockstep/train/lr_schedule.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "lockstep/core/error.hpp"
#include "train/epoch_steps.hpp"

namespace lockstep::train {

LrScheduleKind parse_lr_schedule_kind(const std::string& name) {
  if (name == "constant") return LrScheduleKind::Constant;
  if (name == "step") return LrScheduleKind::Step;
  if (name == "cosine") return LrScheduleKind::Cosine;
  LOCKSTEP_FAIL("unknown lr schedule '", name, "': expected one of constant, step, cosine");
}

std::string to_string(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::Constant: return "constant";
    case LrScheduleKind::Step: return "step";
    case LrScheduleKind::Cosine: return "cosine";
  }
  return "?";
}

void check_lr_schedule(const LrScheduleOptions& options, double base_lr, int world_size) {
  const auto non_negative = [](double value, const char* field) {
    LOCKSTEP_CHECK(std::isfinite(value) && value >= 0, "TrainerOptions::lr.", field,
                   " must be a finite number >= 0, got ", value);
  };
  non_negative(options.base_lr, "base_lr (0: the optimizer's lr)");
  non_negative(options.warmup_epochs, "warmup_epochs");
  non_negative(options.min_lr, "min_lr");
  LOCKSTEP_CHECK(options.warmup_steps >= 0, "TrainerOptions::lr.warmup_steps must be >= 0, got ",
                 options.warmup_steps);
  LOCKSTEP_CHECK(options.step_size >= 1, "TrainerOptions::lr.step_size must be >= 1, got ", options.step_size);
  LOCKSTEP_CHECK(std::isfinite(options.gamma) && options.gamma > 0 && options.gamma <= 1,
                 "TrainerOptions::lr.gamma must be in (0, 1], got ", options.gamma);
  const double peak = base_lr * (options.scale_lr_with_world_size ? world_size : 1);
  LOCKSTEP_CHECK(options.kind != LrScheduleKind::Cosine || options.min_lr <= peak, "TrainerOptions::lr.min_lr ",
                 options.min_lr, " is above the cosine schedule's peak ", peak,
                 ": the schedule would rise instead of decaying");
}

namespace {

// The warm-up's length in steps.
int64_t warmup_steps(const LrScheduleOptions& options, int64_t steps_per_epoch) {
  LOCKSTEP_CHECK(steps_per_epoch > 0, "lr_at: steps_per_epoch must be positive, got ", steps_per_epoch);
  const int64_t warmup_from_epochs = steps_of_epochs(options.warmup_epochs, steps_per_epoch, "lr schedule warmup_epochs");
  LOCKSTEP_CHECK(warmup_from_epochs <= std::numeric_limits<int64_t>::max() - std::max<int64_t>(0, options.warmup_steps),
                 "lr schedule warmup: ", options.warmup_epochs, " epochs and ", options.warmup_steps,
                 " steps is not a step count");
  return warmup_from_epochs + options.warmup_steps;
}

double progress_after_warmup(int64_t step, int64_t warmup, int64_t total_steps) {
  const int64_t span = std::max<int64_t>(1, total_steps - warmup);
  return std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(span));
}

}  // namespace

double cosine_progress(const LrScheduleOptions& options, int64_t step, int64_t steps_per_epoch, int64_t total_steps) {
  const int64_t warmup = warmup_steps(options, steps_per_epoch);
  return step < warmup ? 0.0 : progress_after_warmup(step, warmup, total_steps);
}

double lr_at(const LrScheduleOptions& options, int64_t step, int64_t steps_per_epoch, int64_t total_steps,
             int world_size) {
  LOCKSTEP_CHECK(step >= 0, "lr_at: step must be non-negative, got ", step);
  const double peak = options.base_lr * (options.scale_lr_with_world_size ? world_size : 1);
  const int64_t warmup = warmup_steps(options, steps_per_epoch);
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  switch (options.kind) {
    case LrScheduleKind::Constant:
      return peak;
    case LrScheduleKind::Step: {
      LOCKSTEP_CHECK(options.step_size > 0, "lr schedule step_size must be positive, got ", options.step_size);
      const int64_t epoch = step / steps_per_epoch;
      return peak * std::pow(options.gamma, static_cast<double>(epoch / options.step_size));
    }
    case LrScheduleKind::Cosine: {
      const double progress = progress_after_warmup(step, warmup, total_steps);
      return options.min_lr + (peak - options.min_lr) * 0.5 * (1.0 + std::cos(M_PI * progress));
    }
  }
  return peak;
}

}  // namespace lockstep::train
