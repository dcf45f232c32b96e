// The trainer's built-in losses and metrics, against values computed here by hand or by plain loops
// (closed forms, never the code under test).
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "lockstep/core/error.hpp"
#include "lockstep/train/loss.hpp"
#include "lockstep/train/metric_tracker.hpp"
#include "lockstep/train/metrics.hpp"

using Catch::Matchers::Contains;
using lockstep::train::LossOptions;
using lockstep::train::make_loss;
using lockstep::train::make_metric;

namespace {

LossOptions loss_named(const std::string& name) {
  LossOptions o;
  o.name = name;
  return o;
}

// A metric's values over one batch.
std::vector<double> values_of(const std::string& name, const at::Tensor& output, const at::Tensor& target,
                              int64_t classes = 0) {
  auto metric = make_metric(name, classes);
  const at::Tensor sums = metric->batch_sums(output, target).to(torch::kDouble).contiguous();
  REQUIRE(sums.numel() == metric->num_sums());
  return metric->values(std::vector<double>(sums.data_ptr<double>(), sums.data_ptr<double>() + sums.numel()));
}

double value_of(const std::string& name, const at::Tensor& output, const at::Tensor& target, int64_t classes = 0) {
  const std::vector<double> values = values_of(name, output, target, classes);
  REQUIRE(values.size() == 1);
  return values[0];
}

}  // namespace

TEST_CASE("loss: the built-ins compute the textbook formulas", "[train][loss]") {
  torch::manual_seed(1);
  const at::Tensor out = torch::randn({6, 3}, torch::kDouble);
  const at::Tensor target = torch::randn({6, 3}, torch::kDouble);
  const at::Tensor diff = out - target;
  CHECK(make_loss(loss_named("mse"))(out, target).item<double>() == Approx(diff.pow(2).mean().item<double>()));
  CHECK(make_loss(loss_named("l1"))(out, target).item<double>() == Approx(diff.abs().mean().item<double>()));
  LossOptions smooth = loss_named("smooth_l1");
  smooth.beta = 0.5;
  const at::Tensor a = diff.abs();
  const at::Tensor expected_smooth = torch::where(a < 0.5, 0.5 * a.pow(2) / 0.5, a - 0.25).mean();
  CHECK(make_loss(smooth)(out, target).item<double>() == Approx(expected_smooth.item<double>()));

  // Binary cross entropy on logits: -(y log s(x) + (1 - y) log(1 - s(x))).
  const at::Tensor y = torch::rand({6, 3}, torch::kDouble);
  const at::Tensor s = torch::sigmoid(out);
  const double bce = -(y * s.log() + (1 - y) * (1 - s).log()).mean().item<double>();
  CHECK(make_loss(loss_named("bce_with_logits"))(out, y).item<double>() == Approx(bce));

  // Cross entropy with label smoothing eps over C classes: (1 - eps) * nll + eps * mean_c(-log p_c).
  const at::Tensor labels = torch::tensor({0, 2, 1, 1, 0, 2}, torch::kLong);
  const at::Tensor log_p = torch::log_softmax(out, 1);
  double plain = 0, uniform = 0;
  for (int64_t i = 0; i < 6; ++i) {
    plain -= log_p[i][labels[i].item<int64_t>()].item<double>();
    uniform -= log_p[i].mean().item<double>();
  }
  plain /= 6;
  uniform /= 6;
  CHECK(make_loss(LossOptions{})(out, labels).item<double>() == Approx(plain));
  LossOptions smoothed;
  smoothed.label_smoothing = 0.1;
  CHECK(make_loss(smoothed)(out, labels).item<double>() == Approx(0.9 * plain + 0.1 * uniform));
  // A void label (255) with ignore_index 255: left out of the loss and its mean; without it, an error.
  const at::Tensor voided = torch::tensor({0, 255, 1, 255, 0, 2}, torch::kLong);
  double kept = 0;
  for (int64_t i : {0, 2, 4, 5}) kept -= log_p[i][voided[i].item<int64_t>()].item<double>();
  LossOptions void_label;
  void_label.ignore_index = 255;
  CHECK(make_loss(void_label)(out, voided).item<double>() == Approx(kept / 4));
  CHECK_THROWS(make_loss(LossOptions{})(out, voided));
  void_label.ignore_index = 2;  // a class the metrics count
  CHECK_THROWS_WITH(make_loss(void_label)(out, labels), Contains("ignore_index 2 is one of the output's 3 classes"));
  CHECK(lockstep::train::describe_loss(void_label) == "cross_entropy (ignore_index 2)");
  void_label.ignore_index = 255;  // soft labels have no index to ignore
  CHECK_THROWS_WITH(make_loss(void_label)(out, torch::softmax(out, 1)),
                    Contains("ignore_index (255) applies to class-index targets"));
  // 16-bit outputs are widened: the loss comes back in float32.
  CHECK(make_loss(loss_named("mse"))(out.to(torch::kBFloat16), target.to(torch::kFloat)).scalar_type() ==
        torch::kFloat);
}

TEST_CASE("loss: a target of another shape or kind is an error naming the loss and both shapes", "[train][loss]") {
  const at::Tensor out = torch::zeros({4, 1});
  // [4] against [4, 1] would broadcast to [4, 4] and train on the wrong numbers without a word.
  CHECK_THROWS_WITH(make_loss(loss_named("mse"))(out, torch::zeros({4})),
                    Contains("loss mse") && Contains("[4, 1]") && Contains("[4]"));
  CHECK_THROWS_WITH(make_loss(loss_named("bce_with_logits"))(out, torch::zeros({4, 1}, torch::kLong)),
                    Contains("loss bce_with_logits") && Contains("floating-point target"));
  CHECK_THROWS_WITH(make_loss(LossOptions{})(torch::zeros({4, 3}), torch::zeros({4, 3, 2}, torch::kLong)),
                    Contains("loss cross_entropy") && Contains("for regression"));
  CHECK_THROWS_WITH(make_loss(LossOptions{})(torch::zeros({4, 3}), torch::zeros({4, 2})),
                    Contains("class probabilities"));
  // One class: cross entropy is 0 whatever the output (an image-to-image model given the default loss).
  CHECK_THROWS_WITH(make_loss(LossOptions{})(torch::randn({2, 1, 4, 4}), torch::rand({2, 1, 4, 4})),
                    Contains("has one class") && Contains("for regression"));
  CHECK_THROWS_WITH(make_loss(LossOptions{})(torch::randn({2, 1}), torch::zeros({2}, torch::kLong)),
                    Contains("has one class"));
  CHECK_NOTHROW(make_loss(LossOptions{})(torch::randn({2, 2, 4, 4}), torch::rand({2, 2, 4, 4})));
  CHECK_THROWS_WITH(make_loss(loss_named("hinge")), Contains("unknown loss 'hinge'") && Contains("smooth_l1") &&
                                                        Contains("loss_fn"));
  LossOptions bad = loss_named("mse");
  bad.label_smoothing = 0.1;
  CHECK_THROWS_WITH(make_loss(bad), Contains("label_smoothing applies to cross_entropy only"));
  bad = LossOptions{};
  bad.label_smoothing = 1.0;
  CHECK_THROWS_WITH(make_loss(bad), Contains("label_smoothing must be in [0, 1)"));
  bad = loss_named("smooth_l1");
  bad.beta = 0;
  CHECK_THROWS_WITH(make_loss(bad), Contains("beta must be > 0"));
  CHECK(lockstep::train::describe_loss(LossOptions{}) == "cross_entropy");
}

TEST_CASE("metrics: accuracy and top-k accuracy count by hand", "[train][metrics]") {
  // Scores for 4 samples over 3 classes; the rank of the true class is 1, 2, 3 and 1.
  const at::Tensor scores = torch::tensor({{0.9, 0.05, 0.05}, {0.3, 0.6, 0.1}, {0.5, 0.3, 0.2}, {0.1, 0.2, 0.7}});
  const at::Tensor labels = torch::tensor({0, 0, 2, 2}, torch::kLong);
  CHECK(value_of("accuracy", scores, labels) == 0.5);
  CHECK(value_of("top2_accuracy", scores, labels) == 0.75);
  CHECK(value_of("top3_accuracy", scores, labels) == 1.0);
  CHECK(make_metric("top2_accuracy", 0)->keys() == std::vector<std::string>{"top2_acc"});
  CHECK(make_metric("accuracy", 0)->keys() == std::vector<std::string>{"acc"});
  CHECK(make_metric("accuracy", 0)->higher_is_better());
  // Dense prediction: [B, C, H, W] scores against [B, H, W] labels, one count per pixel.
  const at::Tensor dense = torch::zeros({1, 2, 2, 2});
  dense[0][1][0][0] = 1;  // pixel (0, 0) predicts class 1, the others class 0
  CHECK(value_of("accuracy", dense, torch::tensor({{{1, 1}, {0, 0}}}, torch::kLong)) == 0.75);
  // Ignore labels (outside [0, C)) are neither hits nor misses: 2 of 2 counted pixels right, then 1 of 3.
  CHECK(value_of("accuracy", dense, torch::tensor({{{1, 255}, {0, -100}}}, torch::kLong)) == Approx(2.0 / 2.0));
  CHECK(value_of("accuracy", dense, torch::tensor({{{0, 255}, {0, 1}}}, torch::kLong)) == Approx(1.0 / 3.0));
  CHECK(value_of("top2_accuracy", scores, torch::tensor({0, -100, 2, 255}, torch::kLong)) == 0.5);  // samples 0, 2
  CHECK_THROWS_WITH(value_of("top5_accuracy", scores, labels), Contains("3 class scores per sample, fewer than 5"));
  CHECK_THROWS_WITH(value_of("accuracy", torch::zeros({4, 1}), torch::zeros({4, 1})),
                    Contains("metric accuracy") && Contains("for regression use the metrics mse"));
}

TEST_CASE("metrics: mse, rmse and mae over every element", "[train][metrics]") {
  const at::Tensor out = torch::tensor({{1.0, 2.0}, {3.0, 5.0}});
  const at::Tensor target = torch::tensor({{1.0, 0.0}, {4.0, 1.0}});
  // errors 0, 2, -1, 4: squares 0 + 4 + 1 + 16 = 21, absolutes 7, over 4 elements
  CHECK(value_of("mse", out, target) == 21.0 / 4);
  CHECK(value_of("rmse", out, target) == Approx(std::sqrt(21.0 / 4)));
  CHECK(value_of("mae", out, target) == 7.0 / 4);
  CHECK_FALSE(make_metric("mse", 0)->higher_is_better());
  CHECK_THROWS_WITH(value_of("mae", out, target.flatten()), Contains("metric mae") && Contains("same shape"));
  CHECK(std::isnan(make_metric("mse", 0)->values({0.0, 0.0})[0]));  // no samples: NaN, not 0
}

TEST_CASE("metrics: binary_accuracy thresholds logits at 0 and targets at 0.5", "[train][metrics]") {
  const at::Tensor logits = torch::tensor({{2.0, -1.0, 0.5}, {-0.1, 3.0, -2.0}});
  const at::Tensor target = torch::tensor({{1.0, 0.0, 0.0}, {0.0, 0.9, 1.0}});
  CHECK(value_of("binary_accuracy", logits, target) == 4.0 / 6);
  // At the thresholds: a logit of 0 is negative, a target of 0.5 positive (and 0.3 negative, 0.7
  // positive, which a threshold of the target at 0 would miss): every one wrong.
  CHECK(value_of("binary_accuracy", torch::tensor({0.0, 1.0, -1.0}), torch::tensor({0.5, 0.3, 0.7})) == 0.0);
  CHECK(value_of("binary_accuracy", torch::tensor({0.0, 1.0, -1.0}), torch::tensor({0.4, 0.5, 0.0})) == 1.0);
}

TEST_CASE("metrics: macro_f1 and mean_iou from a confusion matrix counted by hand", "[train][metrics]") {
  // 4 classes; class 3 is neither a target nor a prediction, so it is not part of the means.
  // targets:     0 0 0 1 1 2 2 (-100: ignored)
  // predictions: 0 0 1 1 2 2 0 (3)
  const std::vector<int64_t> predicted = {0, 0, 1, 1, 2, 2, 0, 3};
  at::Tensor scores = torch::zeros({8, 4});
  for (int64_t i = 0; i < 8; ++i) scores[i][predicted[i]] = 1;
  const at::Tensor labels = torch::tensor({0, 0, 0, 1, 1, 2, 2, -100}, torch::kLong);
  // class 0: tp 2, fp 1, fn 1 -> F1 4/6, IoU 2/4;  class 1: tp 1, fp 1, fn 1 -> F1 2/4, IoU 1/3;
  // class 2: tp 1, fp 1, fn 1 -> F1 2/4, IoU 1/3.
  CHECK(value_of("macro_f1", scores, labels, 4) == Approx((4.0 / 6 + 0.5 + 0.5) / 3));
  CHECK(value_of("mean_iou", scores, labels, 4) == Approx((0.5 + 1.0 / 3 + 1.0 / 3) / 3));
  CHECK(make_metric("macro_f1", 4)->num_sums() == 16);
  CHECK_THROWS_WITH(make_metric("macro_f1", 0), Contains("needs the number of classes"));
  CHECK_THROWS_WITH(value_of("mean_iou", scores, labels, 5), Contains("4 class scores per sample") &&
                                                                Contains("5 classes"));
}

TEST_CASE("metrics: sums of batches give the metric of the whole set", "[train][metrics]") {
  // Note [Exact metrics]: what makes the trainer's values exact over ranks and batches.
  torch::manual_seed(3);
  const at::Tensor scores = torch::randn({30, 5});
  const at::Tensor labels = torch::randint(0, 5, {30}, torch::kLong);
  for (const std::string name : {"accuracy", "top2_accuracy", "macro_f1", "mean_iou"}) {
    auto metric = make_metric(name, 5);
    at::Tensor sums = torch::zeros({metric->num_sums()}, torch::kDouble);
    for (int64_t start : {0, 7, 19}) {  // three uneven batches
      const int64_t end = start == 0 ? 7 : start == 7 ? 19 : 30;
      sums += metric->batch_sums(scores.slice(0, start, end), labels.slice(0, start, end));
    }
    const std::vector<double> split =
        metric->values(std::vector<double>(sums.data_ptr<double>(), sums.data_ptr<double>() + sums.numel()));
    INFO(name);
    CHECK(split == values_of(name, scores, labels, 5));
  }
}

TEST_CASE("metrics: names are checked", "[train][metrics]") {
  CHECK_NOTHROW(lockstep::train::check_metric_name("top10_accuracy"));
  CHECK_THROWS_WITH(lockstep::train::check_metric_name("f1"),
                    Contains("unknown metric 'f1'") && Contains("macro_f1") && Contains("custom_metrics"));
  CHECK_THROWS_WITH(lockstep::train::check_metric_name("top1_accuracy"), Contains("top-1 is 'accuracy'"));
  CHECK_THROWS_WITH(make_metric("mean_iou", 2000), Contains("at most 1024"));
}

TEST_CASE("MetricTracker: the loss weighted by samples, the count and the metrics of every batch", "[train][metrics]") {
  using lockstep::train::MetricTracker;
  MetricTracker tracker(lockstep::train::make_metrics({"mse", "mae"}));
  CHECK(tracker.names() == std::vector<std::string>{"mse", "mae"});
  // Two batches of 2 and 1 samples; the losses given are the batches' means.
  tracker.update(torch::tensor({{1.0}, {3.0}}), torch::tensor({{0.0}, {0.0}}), torch::tensor(5.0));
  tracker.update(torch::tensor({{2.0}}), torch::tensor({{0.0}}), torch::tensor(4.0));
  auto values = tracker.compute_local("x_");
  CHECK(values.at("x_count") == 3);
  CHECK(values.at("x_loss") == Approx((5.0 * 2 + 4.0 * 1) / 3));  // per sample, not per batch
  CHECK(values.at("x_mse") == Approx((1.0 + 9.0 + 4.0) / 3));
  CHECK(values.at("x_mae") == Approx(2.0));
  CHECK(tracker.sums().numel() == tracker.num_sums());
  tracker.reset();
  CHECK(tracker.compute_local().at("count") == 0);
  // Without losses there is no loss value (not a 0 that looks like one).
  tracker.update(torch::tensor({{1.0}}), torch::tensor({{1.0}}));
  values = tracker.compute_local();
  CHECK(values.count("loss") == 0);
  CHECK(values.at("mse") == 0);
  CHECK_THROWS_WITH(tracker.update(torch::tensor({{1.0}}), torch::tensor({{1.0}}), torch::ones({2})),
                    Contains("the batch's mean, a scalar"));
  CHECK_THROWS_WITH(tracker.set_sums(torch::zeros({2})), Contains("2 sums for a tracker of 7"));
  CHECK_THROWS_WITH(MetricTracker(lockstep::train::make_metrics({"mse", "mse"})), Contains("name 'mse' twice"));

  // A loss with a weight (the samples its mean stands for): weighted by it; weight 0 adds nothing, not
  // even a NaN; the count stays the samples'.
  tracker.reset();
  tracker.update(torch::tensor({{1.0}, {3.0}}), torch::tensor({{0.0}, {0.0}}), torch::tensor(3.0),
                 torch::tensor(0.5, torch::kDouble));
  tracker.update(torch::tensor({{2.0}}), torch::tensor({{0.0}}), torch::tensor(0.1), torch::tensor(2.0));
  tracker.update(torch::tensor({{2.0}}), torch::tensor({{0.0}}), torch::tensor(NAN), torch::tensor(0.0));
  values = tracker.compute_local();
  CHECK(values.at("count") == 4);
  CHECK(values.at("loss") == Approx((3.0 * 0.5 + 0.1 * 2.0) / 2.5));
  CHECK_THROWS_WITH(tracker.update(torch::tensor({{1.0}}), torch::tensor({{1.0}}), torch::tensor(1.0), torch::ones({2})),
                    Contains("the loss's weight must be a scalar"));
}

TEST_CASE("loss: cross_entropy's weight counts the targets it does not ignore, and void-only batches weigh 0",
          "[train][loss]") {
  using lockstep::train::loss_weight;
  LossOptions void_label;
  void_label.ignore_index = 255;
  // The sample count for [B] class indices with none ignored, and for every other loss.
  CHECK(loss_weight(void_label, torch::tensor({0, 2, 1}, torch::kLong)).item<double>() == 3.0);
  CHECK(loss_weight(loss_named("mse"), torch::zeros({3, 2})).item<double>() == 3.0);
  CHECK(loss_weight(LossOptions{}, torch::zeros({4, 3})).item<double>() == 4.0);  // class probabilities
  // Dense targets: the targets counted (2 samples x 3 pixels, 4 of 6 counted: 4).
  CHECK(loss_weight(LossOptions{}, torch::zeros({7, 5, 5}, torch::kLong)).item<double>() == 175.0);
  CHECK(loss_weight(void_label, torch::tensor({{0, 255, 1}, {255, 2, 2}}, torch::kLong)).item<double>() == 4.0);
  // So an epoch's loss is the mean over its targets when their number per sample varies (images of
  // different sizes): batches of 1 x 2 targets at mean 1 and 1 x 8 at mean 2 give 18 / 10, not 1.5.
  {
    lockstep::train::MetricTracker tracker(lockstep::train::make_metrics({"accuracy"}, 3));
    const at::Tensor small = torch::zeros({1, 2}, torch::kLong), large = torch::zeros({1, 8}, torch::kLong);
    tracker.update(torch::zeros({1, 3, 2}), small, torch::tensor(1.0), loss_weight(LossOptions{}, small));
    tracker.update(torch::zeros({1, 3, 8}), large, torch::tensor(2.0), loss_weight(LossOptions{}, large));
    CHECK(tracker.compute_local().at("loss") == Approx(1.8));
  }
  CHECK(loss_weight(void_label, torch::full({2, 3}, 255, torch::kLong)).item<double>() == 0.0);
  CHECK(loss_weight(void_label, torch::tensor({0, 1})).scalar_type() == torch::kDouble);

  // A batch whose targets are all void: loss 0 and zero gradients (PyTorch's mean is NaN, in the
  // gradients too, and would reach every rank's weights).
  for (const double smoothing : {0.0, 0.1}) {
    INFO("label_smoothing " << smoothing);
    void_label.label_smoothing = smoothing;
    const at::Tensor logits = torch::randn({2, 3, 4}, torch::requires_grad());
    const at::Tensor loss = make_loss(void_label)(logits, torch::full({2, 4}, 255, torch::kLong));
    CHECK(loss.item<double>() == 0.0);
    loss.backward();
    CHECK(torch::equal(logits.grad(), torch::zeros_like(logits)));
    // With some counted targets, the mean over them, as PyTorch's.
    const at::Tensor target = torch::tensor({{0, 255, 1, 2}, {255, 255, 2, 0}}, torch::kLong);
    namespace F = torch::nn::functional;
    const at::Tensor reference = F::cross_entropy(
        logits, target, F::CrossEntropyFuncOptions().ignore_index(255).label_smoothing(smoothing));
    CHECK(make_loss(void_label)(logits, target).item<double>() == Approx(reference.item<double>()).epsilon(1e-6));
  }
}
