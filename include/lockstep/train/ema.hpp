#pragma once
// ExponentialMovingAverage: a trainer callback keeping an exponential moving average of the model's
// weights (Polyak averaging, as timm's ModelEmaV2 and tf.train.ExponentialMovingAverage), updated after
// every optimizer step, evaluated instead of the raw weights, and left in the model at the end:
//
//   trainer.add_callback(std::make_shared<lockstep::train::ExponentialMovingAverage>(EmaOptions{0.999}));
//   // config: ema: {enabled: true, decay: 0.999}
//
// After update t (0-based) the average is  ema = d_t * ema + (1 - d_t) * w,  with d_t = decay, or with
// warmup min(decay, (1 + t) / (10 + t)) so that the first averages are not held at the initial weights.
// Floating-point parameters and buffers (batch norm's running statistics) are averaged; other buffers
// (counters), and those of modules that are a train::BufferState (QAT's activation ranges: Note
// [Buffers that are state]), are copied. Every rank holds the same weights after a step, so every rank holds the same
// average, with no communication; the average is checkpointed (Callback::save_tensors) and a resumed
// run continues it bitwise.
// With quantization-aware training, add this callback first, as QAT requires (in on_after_optimizer_step the weights
// are float: QAT puts int8 values in place only from on_batch_begin to on_after_backward), evaluation quantizes the average (Note [Nested evaluation events]),
// and at the end QAT exports the int8 values of the average. Not combined with pruning, whose masked
// weights the average would let decay instead of staying zero; the config reader and MagnitudePruning refuse that.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lockstep/train/callback.hpp"

namespace lockstep::train {

struct EmaOptions {
  double decay = 0.9999;  // in [0, 1): the weight of the old average at each update
  // d_t = min(decay, (1 + t) / (10 + t)) (timm's and TensorFlow's num_updates adjustment).
  bool warmup = true;
  // Update every N optimizer steps (an fp16 step the scaler skipped folds in unchanged weights).
  int64_t every_steps = 1;
  // Evaluate with the averaged weights (the epoch's test_loss / test_acc are the average's).
  bool evaluate = true;
  // Leave the averaged weights in the model when training ends (for export and a final evaluation).
  bool apply_at_end = true;
};

// Throws naming the option and the value.
void validate(const EmaOptions& options);

class ExponentialMovingAverage : public Callback {
 public:
  explicit ExponentialMovingAverage(EmaOptions options = {});

  void on_train_begin(TrainerContext& ctx) override;
  void on_after_optimizer_step(TrainerContext& ctx) override;
  void on_evaluation_begin(TrainerContext& ctx) override;
  void on_evaluation_end(TrainerContext& ctx) override;
  void on_train_end(TrainerContext& ctx) override;

  std::string state_key() const override { return "ema"; }
  std::string agreement() const override;
  std::string save_state() const override;
  void load_state(const std::string& state) override;
  std::vector<at::Tensor> save_tensors() const override { return average_; }
  void load_tensors(std::vector<at::Tensor> tensors) override;

  const EmaOptions& options() const { return options_; }
  // The average, one tensor per model parameter then buffer (registration order); empty before training.
  const std::vector<at::Tensor>& average() const { return average_; }
  int64_t updates() const { return updates_; }
  // The decay of update t.
  double decay_at(int64_t t) const;

 private:
  void swap_in(TrainerContext& ctx);
  void restore(TrainerContext& ctx);

  EmaOptions options_;
  std::vector<at::Tensor> average_;
  std::vector<at::Tensor> saved_;  // the raw weights while the average is swapped in
  std::vector<bool> copied_;       // per tensor: a BufferState module's buffer, copied rather than averaged
  int64_t updates_ = 0;
  double last_decay_ = 0.0;
};

}  // namespace lockstep::train
