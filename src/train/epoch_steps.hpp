#pragma once
// Options given in epochs (warmup_epochs, pruning's begin/end_epoch, quantization's begin/freeze_epoch)
// become steps once the steps per epoch are known. A number of epochs whose steps do not fit an
// int64 (warmup_epochs: 1e17 at 100 steps per epoch) would make llround return LLONG_MIN, a negative
// warmup, and a schedule at min_lr from the first step: an error instead.

#include <cmath>
#include <cstdint>

#include "lockstep/core/error.hpp"

namespace lockstep::train {

inline int64_t steps_of_epochs(double epochs, int64_t steps_per_epoch, const char* what) {
  const double steps = epochs * static_cast<double>(steps_per_epoch);
  LOCKSTEP_CHECK(std::isfinite(steps) && steps >= 0.0 && steps < 9.0e18, what, " = ", epochs, " epochs of ",
                 steps_per_epoch, " steps is not a step count (", steps, " steps; at most 9e18)");
  return static_cast<int64_t>(std::llround(steps));
}

}  // namespace lockstep::train
