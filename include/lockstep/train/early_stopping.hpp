#pragma once
// EarlyStopping: ends training when a metric has stopped improving, as Keras' and PyTorch Lightning's
// EarlyStopping do:
//
//   lockstep::train::EarlyStoppingOptions stop;   // monitor test_loss, mode auto (min), patience 3
//   trainer.add_callback(std::make_shared<lockstep::train::EarlyStopping>(stop));
//   // config: early_stopping: {enabled: true, monitor: test_loss, patience: 3}
//
// After each epoch's evaluation (on_evaluation_end, where the epoch's metrics are complete and reduced
// over ranks, so every rank decides alike with no communication) it compares the monitored metric with
// the best so far; after `patience` epochs in a row without an improvement of more than `min_delta`, it
// asks the trainer to stop after that epoch (TrainerContext::stop_requested, with a stop_reason that
// names the metric, its best value and epoch). The epoch still ends (its checkpoint is written with
// this callback's state), so a run resumed from it stops again at once instead of training on. An
// evaluation a signal cut short (Note [Stop during evaluation]) is not counted.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lockstep/train/callback.hpp"

namespace lockstep::train {

struct EarlyStoppingOptions {
  // A key of the epoch's metrics: test_loss, train_loss, test_<key> or train_<key> of the trainer's
  // metrics (test_acc, test_macro_f1, test_mse, ...), or one a callback adds before on_evaluation_end.
  // A missing key is an error naming the keys there are.
  std::string monitor = "test_loss";
  // "min" (lower is better), "max", or "auto": for a trainer metric's key, its direction
  // (Metric::higher_is_better); otherwise max when the name ends in "acc" or "accuracy", else min.
  std::string mode = "auto";
  // Epochs in a row without an improvement before stopping; >= 1.
  int64_t patience = 3;
  // An improvement must exceed this (in the metric's units); >= 0.
  double min_delta = 0.0;
  // Keep a copy (host memory) of the model's parameters and buffers as on_evaluation_end sees them in
  // the best epoch, checkpointed with the rest, and put it back when training ends (stopped early or
  // run to its end; not after a signal's stop, whose run goes on). Add this callback after an
  // ExponentialMovingAverage so that the copy is of the averaged weights that were evaluated (an
  // average added after it is refused at setup).
  // Note [Best weights and compression]: putting an earlier epoch's weights back would undo a
  // compression that came after it. QuantizationAwareTraining refuses this option, and so does
  // MagnitudePruning unless its schedule's last pruning step comes within the first epoch.
  bool restore_best_weights = false;
};

class EarlyStopping final : public Callback {
 public:
  explicit EarlyStopping(EarlyStoppingOptions options = {});

  // Mode "auto": takes the direction of the trainer metric that the monitored key belongs to.
  void on_setup(TrainerContext& ctx) override;
  void on_train_begin(TrainerContext& ctx) override;
  void on_evaluation_end(TrainerContext& ctx) override;
  void on_train_end(TrainerContext& ctx) override;

  // The best value seen (NaN before any), the epoch (1-based) it came in, and the epochs since.
  double best() const { return best_; }
  int64_t best_epoch() const { return best_epoch_; }
  int64_t epochs_without_improvement() const { return waited_; }
  bool stopped() const { return waited_ >= options_.patience; }
  // "min" or "max", auto resolved.
  const std::string& mode() const { return mode_; }
  const EarlyStoppingOptions& options() const { return options_; }

  std::string state_key() const override { return "early_stopping"; }
  std::string agreement() const override;
  std::string save_state() const override;
  void load_state(const std::string& state) override;
  std::vector<at::Tensor> save_tensors() const override { return best_weights_; }
  void load_tensors(std::vector<at::Tensor> tensors) override;

 private:
  std::string reason() const;

  EarlyStoppingOptions options_;
  std::string mode_;
  double best_;
  int64_t best_epoch_ = 0;
  int64_t waited_ = 0;
  std::vector<at::Tensor> best_weights_;  // restore_best_weights: parameters, then buffers, on the host
};

}  // namespace lockstep::train
