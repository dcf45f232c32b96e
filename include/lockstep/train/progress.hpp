#pragma once
// ProgressLogger: rank 0's view of training. During an epoch, a progress line every log_every steps
// (images/s, ETA) and, in its evaluation, every log_every evaluation batches (ETA), redrawn in place with '\r' on a terminal and printed as plain lines otherwise (logs,
// mpirun pipes); after each epoch a summary line and one JSON object in <output_dir>/metrics.jsonl
// holding every entry of TrainerContext::metrics.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "lockstep/train/callback.hpp"

namespace lockstep::train {

struct ProgressOptions {
  int64_t log_every = 20;     // steps between progress lines; 0 = none
  // empty = no metrics.jsonl. A fresh run (global step 0) that finds an earlier run's lines there
  // moves them to "<stem>.previous-<UTC time><ext>" beside it (Note [Starting over]: nothing is lost).
  std::string metrics_path;
  // -1: decide by isatty(stdout), plain lines under mpirun, LOCKSTEP_PROGRESS_TTY=0/1 forces (see
  // Note [Progress terminal]); 0: plain lines; 1: redraw in place.
  int interactive = -1;
};

class ProgressLogger : public Callback {
 public:
  explicit ProgressLogger(ProgressOptions options);

  void on_train_begin(TrainerContext& ctx) override;
  void on_epoch_begin(TrainerContext& ctx) override;
  void on_after_optimizer_step(TrainerContext& ctx) override;
  void on_evaluation_begin(TrainerContext& ctx) override;
  void on_evaluation_batch_end(TrainerContext& ctx) override;
  void on_epoch_end(TrainerContext& ctx) override;
  // After an early stop: one line saying after which step and why (TrainerContext::stop_reason).
  void on_train_end(TrainerContext& ctx) override;

 private:
  // Rank 0: appends the epoch's line to options_.metrics_path.
  void append_metrics_line(const TrainerContext& ctx) const;
  ProgressOptions options_;
  bool interactive_ = false;
  bool line_open_ = false;
  std::chrono::steady_clock::time_point epoch_start_;
  std::chrono::steady_clock::time_point evaluation_start_;
  int64_t epoch_first_step_ = 0;
  int64_t images_ = 0;
  bool evaluating_ = false;  // between this epoch's on_evaluation_begin and on_epoch_end
};

}  // namespace lockstep::train
