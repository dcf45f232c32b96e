#include "lockstep/train/loss.hpp"

#include <ATen/ATen.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "lockstep/core/error.hpp"
#include "train/tensor_text.hpp"

namespace lockstep::train {
namespace {

using detail::shape_of;

// The regression and multi-label losses compare element by element. A target that merely broadcasts
// against the output ([B] against [B, 1] gives a [B, B] difference) trains on the wrong numbers
// without a word, so the shapes must be equal.
void check_same_shape(const char* loss, const at::Tensor& output, const at::Tensor& target) {
  LOCKSTEP_CHECK(output.sizes() == target.sizes() && at::isFloatingType(target.scalar_type()),
                 "loss ", loss, ": expected an output and a floating-point target of the same shape; found output ",
                 shape_of(output), " and target ", shape_of(target));
}

void check_cross_entropy(const at::Tensor& output, const at::Tensor& target, int64_t ignore_index) {
  // Over one class, softmax is 1 whatever the scores: the loss and every gradient are 0, and a model
  // (an image-to-image one given this loss by mistake, say) would "train" without learning a thing.
  const int64_t class_dim = output.dim() == 1 ? 0 : 1;
  LOCKSTEP_CHECK(output.dim() == 0 || output.size(class_dim) != 1,
                 "loss cross_entropy: the output ", shape_of(output),
                 " has one class (dimension ", class_dim, "), over which cross entropy is 0 whatever the model "
                 "computes (for regression set the loss to mse, l1 or smooth_l1)");
  if (at::isFloatingType(target.scalar_type())) {  // class probabilities (soft labels)
    LOCKSTEP_CHECK(output.dim() >= 1 && output.sizes() == target.sizes(),
                   "loss cross_entropy: a floating-point target holds class probabilities and must have the "
                   "output's shape; found output ", shape_of(output), " and target ", shape_of(target));
    LOCKSTEP_CHECK(ignore_index == LossOptions{}.ignore_index, "loss cross_entropy: ignore_index (", ignore_index,
                   ") applies to class-index targets; this one holds class probabilities");
    return;
  }
  bool ok = output.dim() >= 2 && target.dim() == output.dim() - 1 && !at::isComplexType(target.scalar_type()) &&
            target.scalar_type() != at::kBool;
  for (int64_t d = 0; ok && d < target.dim(); ++d) ok = target.size(d) == output.size(d == 0 ? 0 : d + 1);
  LOCKSTEP_CHECK(ok, "loss cross_entropy: expected an output of class scores [B, C, ...] and integer class indices "
                     "[B, ...] as the target; found output ", shape_of(output), " and target ", shape_of(target),
                 " (for regression set the loss to mse, l1 or smooth_l1)");
  LOCKSTEP_CHECK(ignore_index < 0 || ignore_index >= output.size(1), "loss cross_entropy: ignore_index ", ignore_index,
                 " is one of the output's ", output.size(1), " classes; the metrics count every target in [0, ",
                 output.size(1), "), so the loss would ignore what they count. Use a label outside that range");
}

// Losses are computed in float32 at least: 16-bit logits from autocast would round the loss.
at::Tensor widened(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t;
}

}  // namespace

const std::vector<std::string>& loss_names() {
  static const std::vector<std::string> names = {"cross_entropy", "bce_with_logits", "mse", "l1", "smooth_l1"};
  return names;
}

void check_loss_options(const LossOptions& options) {
  const auto& names = loss_names();
  if (std::find(names.begin(), names.end(), options.name) == names.end()) {
    std::string known;
    for (const auto& name : names) known += (known.empty() ? "" : ", ") + name;
    LOCKSTEP_FAIL("TrainerOptions::loss.name: unknown loss '", options.name, "'; expected one of ", known,
                  " (or set TrainerOptions::loss_fn to a function of your own)");
  }
  LOCKSTEP_CHECK(options.label_smoothing >= 0 && options.label_smoothing < 1,
                 "TrainerOptions::loss.label_smoothing must be in [0, 1), got ", options.label_smoothing);
  LOCKSTEP_CHECK(options.label_smoothing == 0 || options.name == "cross_entropy",
                 "TrainerOptions::loss.label_smoothing applies to cross_entropy only, not to ", options.name);
  LOCKSTEP_CHECK(options.ignore_index == LossOptions{}.ignore_index || options.name == "cross_entropy",
                 "TrainerOptions::loss.ignore_index applies to cross_entropy only, not to ", options.name);
  LOCKSTEP_CHECK(options.beta > 0 && std::isfinite(options.beta), "TrainerOptions::loss.beta must be > 0, got ",
                 options.beta);
}

LossFn make_loss(const LossOptions& options) {
  check_loss_options(options);
  const std::string& name = options.name;
  if (name == "cross_entropy") {
    const double smoothing = options.label_smoothing;
    const int64_t ignore = options.ignore_index;
    return [smoothing, ignore](const at::Tensor& output, const at::Tensor& target) {
      check_cross_entropy(output, target, ignore);
      namespace F = torch::nn::functional;
      const at::Tensor out = widened(output);
      // Class indices must be int64 for LibTorch; probabilities take the output's type.
      if (at::isFloatingType(target.scalar_type())) {
        return F::cross_entropy(out, target.to(out.scalar_type()),
                                F::CrossEntropyFuncOptions().label_smoothing(smoothing));
      }
      // The sum over the counted targets by their count: PyTorch's mean, except for a batch of ignored
      // targets only, whose 0 / 0 is NaN there, in the gradients too; here 0, with zero gradients.
      const at::Tensor labels = target.to(at::kLong);
      const at::Tensor sum = F::cross_entropy(
          out, labels, F::CrossEntropyFuncOptions().label_smoothing(smoothing).ignore_index(ignore).reduction(torch::kSum));
      return sum / labels.ne(ignore).sum().clamp_min(1).to(sum.scalar_type());
    };
  }
  if (name == "bce_with_logits") {
    return [](const at::Tensor& output, const at::Tensor& target) {
      check_same_shape("bce_with_logits", output, target);
      const at::Tensor out = widened(output);
      return at::binary_cross_entropy_with_logits(out, target.to(out.scalar_type()));
    };
  }
  if (name == "mse") {
    return [](const at::Tensor& output, const at::Tensor& target) {
      check_same_shape("mse", output, target);
      const at::Tensor out = widened(output);
      return at::mse_loss(out, target.to(out.scalar_type()));
    };
  }
  if (name == "l1") {
    return [](const at::Tensor& output, const at::Tensor& target) {
      check_same_shape("l1", output, target);
      const at::Tensor out = widened(output);
      return at::l1_loss(out, target.to(out.scalar_type()));
    };
  }
  const double beta = options.beta;  // smooth_l1 (check_loss_options knows no other name)
  return [beta](const at::Tensor& output, const at::Tensor& target) {
    check_same_shape("smooth_l1", output, target);
    const at::Tensor out = widened(output);
    return at::smooth_l1_loss(out, target.to(out.scalar_type()), at::Reduction::Mean, beta);
  };
}

at::Tensor loss_weight(const LossOptions& options, const at::Tensor& target) {
  LOCKSTEP_CHECK(target.defined() && target.dim() >= 1, "loss_weight: expected a target with a batch dimension");
  const auto samples = static_cast<double>(target.size(0));
  if (options.name != "cross_entropy" || at::isFloatingType(target.scalar_type()) || target.numel() == 0) {
    return at::full({}, samples, target.options().dtype(at::kDouble));
  }
  // The targets counted: B for [B] targets with none ignored. (B x counted / all, "samples' worth",
  // weighed a batch of 1 x 8 targets as one of 1 x 2: not the mean over targets once their number per
  // sample varied from batch to batch, images of different sizes.)
  return target.ne(options.ignore_index).sum(at::kDouble);
}

std::string describe_loss(const LossOptions& options) {
  std::ostringstream os;
  os << options.name;
  if (options.name == "cross_entropy" && options.label_smoothing != 0) {
    os << " (label_smoothing " << options.label_smoothing << ")";
  }
  if (options.name == "cross_entropy" && options.ignore_index != LossOptions{}.ignore_index) {
    os << " (ignore_index " << options.ignore_index << ")";
  }
  if (options.name == "smooth_l1") os << " (beta " << options.beta << ")";
  return os.str();
}

}  // namespace lockstep::train
