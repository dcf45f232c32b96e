#pragma once
// The loss DistributedTrainer minimises: a built-in chosen by name (LossOptions, YAML trainer.loss), or
// a function of the program's own (TrainerOptions::loss_fn), so that the trainer serves regression,
// multi-label and dense prediction as well as classification.
//
//   options.loss.name = "mse";                             // a built-in
//   options.loss_fn = [](const at::Tensor& out, const at::Tensor& target) {  // or any function
//     return torch::nn::functional::huber_loss(out, target);
//   };

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

namespace lockstep::train {

// (the model's output, the batch's target) -> the batch's mean loss, a scalar. It runs inside the
// precision's autocast, on the training device. The trainer backpropagates it and weights it by the
// batch's sample count (target.size(0)) for the epoch's train_loss and test_loss (Note [Exact metrics]),
// so "mean" should be over the batch's samples (or over equally many elements per sample). The
// built-in cross_entropy is weighted by the targets it counted instead (loss_weight).
using LossFn = std::function<at::Tensor(const at::Tensor& output, const at::Tensor& target)>;

struct LossOptions {
  // "cross_entropy": classification; output [B, C] (or [B, C, d1, ...]) logits, target int64 class
  //     indices [B] (or [B, d1, ...]), or class probabilities shaped like the output.
  // "bce_with_logits": multi-label; output logits and target in [0, 1] of the same shape.
  // "mse", "l1", "smooth_l1": regression; output and target of the same shape.
  std::string name = "cross_entropy";
  // cross_entropy: the weight moved from the true class to all classes alike, in [0, 1).
  double label_smoothing = 0.0;
  // cross_entropy with class indices: targets equal to it are left out of the loss and of its mean
  // (PyTorch's default, -100). The metrics leave out every target outside [0, C), so a void label such
  // as 255 (segmentation) needs ignore_index 255 here; one inside [0, C) is refused (the metrics would
  // count what the loss ignores). The mean is over the targets counted, and the epoch's loss weights
  // each batch by them (loss_weight), so it is the mean over every counted target. A batch whose
  // targets are all ignored has loss 0 and no gradient (PyTorch's mean is NaN there, and a NaN would
  // reach every rank's weights through the averaged gradients). The step's gradient weights batches and
  // ranks by their samples, as PyTorch DDP averages the ranks' means.
  int64_t ignore_index = -100;
  // smooth_l1: where the loss turns from quadratic to linear; > 0.
  double beta = 1.0;
};

// The built-in names, for messages and the config's checks.
const std::vector<std::string>& loss_names();
// Throws a lockstep::Error naming the field (TrainerOptions::loss.<field>) when an option is invalid.
void check_loss_options(const LossOptions& options);
// The built-in loss the options name (checked first).
LossFn make_loss(const LossOptions& options);
// What the built-in loss's mean over `target` is a mean over, for the epoch's loss: a float64 scalar on
// the target's device (nothing waits for it). For cross_entropy with class indices, the targets it
// counted (those not equal to ignore_index: B for [B] targets with none ignored, B x H x W for dense
// ones, 0 for a batch of ignored targets only), so the epoch's loss is the mean over every counted
// target, whatever their number per sample; B (target.size(0)) for every other loss and target.
at::Tensor loss_weight(const LossOptions& options, const at::Tensor& target);
// E.g. "cross_entropy (label_smoothing 0.1)": for messages and the ranks' agreement check.
std::string describe_loss(const LossOptions& options);

}  // namespace lockstep::train
