#pragma once
// The sums behind an epoch's training metrics (Note [Exact metrics] in trainer.cpp), and the callback
// that keeps them in checkpoints, so that an epoch stopped half-way and resumed reports the metrics
// of the whole epoch, as the uninterrupted run does (Note [Epoch totals in checkpoints]).

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lockstep/train/callback.hpp"
#include "lockstep/train/metric_tracker.hpp"

namespace lockstep::train {

// Indices of EpochTotals::sums: the step timings' sums, on the host.
enum EpochSum { kForward, kBackward, kComm, kExposed, kSteps, kGradNorm, kClipped, kNumSums };

// One rank's part of the current epoch. The loss, the sample count and the metrics' sums are the
// tracker's, on the device, read once at the end of the epoch (Note [No host sync per step]); the
// step timings are on the host. The clipped steps' gradient norms are summed on the device too
// (`grad_norm`) and added to sums[kGradNorm] by settle(), before the host sums are read.
struct EpochTotals {
  explicit EpochTotals(std::vector<MetricPtr> metrics) : tracker(std::move(metrics)) {}
  int64_t epoch = -1;
  std::vector<double> sums = std::vector<double>(kNumSums, 0.0);
  at::Tensor grad_norm;  // float64, 0-dim, on the device: norms since the last settle(); undefined if none
  MetricTracker tracker;
  bool started_epoch = false;
  std::chrono::steady_clock::time_point started{};
  double seconds_before = 0;  // training time of this epoch before the run was resumed
  // Set when the epoch's steps end (freeze_seconds): its evaluation, and a checkpoint written during
  // or after it (a stop that cut the evaluation short), do not count as training time.
  std::optional<double> frozen_seconds;

  // Starts `epoch` at zero.
  void reset(int64_t epoch);
  // Adds a clipped step's gradient norm (a 0-dim tensor, not read) to `grad_norm`.
  void add_grad_norm(const at::Tensor& norm);
  // Moves `grad_norm` into sums[kGradNorm] (reads it: a host synchronisation).
  void settle();
  double seconds() const;  // training time of this epoch so far, before a resume included
  void freeze_seconds() { frozen_seconds = seconds(); }
};

// Note [Epoch totals in checkpoints]: a built-in callback of the trainer. Saving is collective (Note
// [Callback state]): the ranks' totals are summed, so the checkpoint holds the epoch's totals so far
// over all ranks, with rank 0's training time. On resume inside that same epoch, rank 0 starts from
// those totals and the others from zero: the end-of-epoch all-reduce adds up to the whole epoch's.
// A checkpoint written at an epoch's end (the loader at the next epoch) holds a finished epoch's
// totals, which a resume ignores.
class EpochTotalsState : public Callback {
 public:
  explicit EpochTotalsState(EpochTotals* totals) : totals_(totals) {}

  void on_setup(TrainerContext& ctx) override;
  std::string state_key() const override { return "trainer_epoch_totals"; }
  std::string save_state() const override;
  void load_state(const std::string& state) override;

  // Called when the resumed epoch `epoch` starts (after totals->reset): continues from the restored
  // totals if they are that epoch's. Returns whether it did. The metrics' sums continue only when the
  // checkpoint holds the same metrics; otherwise rank 0 says that the epoch's train metrics (not its
  // loss) cover the steps after the resume.
  bool restore(int64_t epoch, int rank);

 private:
  struct Saved {
    int64_t epoch = -1;
    std::vector<double> sums;
    std::vector<std::string> metrics;  // the metrics' names
    std::vector<double> tracked;       // the tracker's sums (MetricTracker::sums())
    double seconds = 0;
  };
  EpochTotals* totals_;
  comm::Communicator* comm_ = nullptr;
  std::optional<Saved> loaded_;
};

}  // namespace lockstep::train
