// DistributedTrainer beyond classification at 2 and 3 ranks: built-in and custom losses and metrics,
// each value checked against a one-process oracle over the whole data set (Note [Exact metrics]), and
// ranks that disagree on them. Every rank walks the same path (CHECK, not REQUIRE).
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/data/dataset.hpp"
#include "lockstep/data/synthetic_dataset.hpp"
#include "lockstep/train/metric_tracker.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"

namespace {

using Catch::Contains;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::train::DistributedTrainer;
using lockstep::train::TrainerOptions;

// Regression samples: x in R^4 and y in R^2, smooth functions of the index (float32, like real data).
class RegressionSet : public lockstep::data::Dataset {
 public:
  RegressionSet(int64_t size, double offset) : size_(size), offset_(offset) {}
  size_t size() const override { return static_cast<size_t>(size_); }
  lockstep::data::DatasetInfo info() const override {
    lockstep::data::DatasetInfo i;
    i.channels = 1;
    i.height = 1;
    i.width = 4;
    return i;  // num_classes 0: not a classification set
  }
  lockstep::data::Example get_batch(const std::vector<int64_t>& indices) const override {
    check_indices(indices);
    const auto b = static_cast<int64_t>(indices.size());
    at::Tensor x = torch::empty({b, 4});
    at::Tensor y = torch::empty({b, 2});
    for (int64_t r = 0; r < b; ++r) {
      const double i = static_cast<double>(indices[r]);
      for (int64_t j = 0; j < 4; ++j) x[r][j] = std::sin(0.7 * i + static_cast<double>(j));
      for (int64_t k = 0; k < 2; ++k) y[r][k] = std::cos(1.3 * i + static_cast<double>(k)) + offset_;
    }
    return {x, y};
  }
  std::string description() const override { return "regression test set"; }
  lockstep::data::Example all() const {
    std::vector<int64_t> every(static_cast<size_t>(size_));
    for (int64_t i = 0; i < size_; ++i) every[static_cast<size_t>(i)] = i;
    return get_batch(every);
  }

 private:
  int64_t size_;
  double offset_;
};

// y = W x + b with fixed weights; lr 0 keeps them, so every output is known in advance.
struct FixedRegressorImpl : torch::nn::Module {
  FixedRegressorImpl() : fc(register_module("fc", torch::nn::Linear(4, 2))) {
    torch::NoGradGuard no_grad;
    fc->weight.copy_(torch::tensor({{0.5, -0.25, 0.0, 1.0}, {0.1, 0.2, 0.3, 0.4}}));
    fc->bias.copy_(torch::tensor({0.1, -0.2}));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  torch::nn::Linear fc;
};
TORCH_MODULE(FixedRegressor);

TrainerOptions quiet(size_t batch_size) {
  TrainerOptions o;
  o.epochs = 1;
  o.batch_size = batch_size;
  o.eval_batch_size = 3;
  o.progress = false;
  o.checkpoints = false;
  o.prefetch = 1;
  o.device = "cpu";
  return o;
}

std::shared_ptr<torch::optim::SGD> frozen(torch::nn::Module& model) {
  return std::make_shared<torch::optim::SGD>(model.parameters(), torch::optim::SGDOptions(0.0));
}

// The mean of the model's outputs: a metric of the program's own, as a user would write one.
class MeanOutput final : public lockstep::train::Metric {
 public:
  std::string name() const override { return "mean_output"; }
  std::vector<std::string> keys() const override { return {"mean_output"}; }
  int64_t num_sums() const override { return 2; }
  at::Tensor batch_sums(const at::Tensor& output, const at::Tensor& target) const override {
    return torch::stack({output.sum().to(torch::kDouble),
                         torch::full({}, static_cast<double>(output.numel()), output.options().dtype(torch::kDouble))});
  }
  std::vector<double> values(const std::vector<double>& sums) const override { return {sums[0] / sums[1]}; }
  bool higher_is_better() const override { return false; }
};

}  // namespace

TEST_CASE("trainer: regression with built-in loss and metrics is exact over ranks", "[train]") {
  const int world = comm().size();
  const auto train_set = std::make_shared<RegressionSet>(10 * world, 0.0);  // no padding: 10 per rank
  const auto test_set = std::make_shared<RegressionSet>(11, 0.5);           // uneven shards, padding masked
  FixedRegressor model;
  TrainerOptions o = quiet(4);  // batches of 4, 4, 2 per rank
  o.loss.name = "mse";
  o.metrics = {"mse", "rmse", "mae"};
  DistributedTrainer trainer(model, frozen(*model), comm_ptr(), o);
  const auto metrics = trainer.fit(train_set, test_set);

  // The oracle: one process, the whole set in one batch.
  auto oracle = [&](const RegressionSet& set) {
    torch::NoGradGuard no_grad;
    const auto all = set.all();
    const at::Tensor error = model->forward(all.data).to(torch::kDouble) - all.target.to(torch::kDouble);
    return std::make_pair(error.square().mean().item<double>(), error.abs().mean().item<double>());
  };
  const auto [train_mse, train_mae] = oracle(*train_set);
  const auto [test_mse, test_mae] = oracle(*test_set);
  // Float32 outputs from batches of another size may differ in the last bit: 1e-6, not bitwise.
  CHECK(metrics.at("train_count") == 10 * world);
  CHECK(metrics.at("train_mse") == Approx(train_mse).epsilon(1e-6));
  CHECK(metrics.at("train_mae") == Approx(train_mae).epsilon(1e-6));
  CHECK(metrics.at("train_rmse") == Approx(std::sqrt(train_mse)).epsilon(1e-6));
  CHECK(metrics.at("train_loss") == Approx(train_mse).epsilon(1e-6));  // the mse loss, per sample
  CHECK(metrics.at("test_count") == 11);
  CHECK(metrics.at("test_mse") == Approx(test_mse).epsilon(1e-6));
  CHECK(metrics.at("test_mae") == Approx(test_mae).epsilon(1e-6));
  CHECK(metrics.at("test_loss") == Approx(test_mse).epsilon(1e-6));
  CHECK(metrics.count("train_acc") == 0);
  CHECK(metrics.count("test_acc") == 0);
  // The evaluation on its own gives the same.
  const auto evaluated = trainer.evaluate(test_set);
  CHECK(evaluated.at("test_mse") == metrics.at("test_mse"));
  // On its own, with a set of another size on the last rank: an error on every rank, not a mix.
  const auto other = comm().rank() == world - 1 ? std::make_shared<RegressionSet>(12, 0.25) : test_set;
  CHECK_THROWS_WITH(trainer.evaluate(other), Catch::Contains("DistributedTrainer::evaluate: the ranks disagree on the "
                                                             "evaluation set size: 11 on ") &&
                                                 Catch::Contains("12 on rank " + std::to_string(world - 1)));
}

TEST_CASE("trainer: a training set that does not divide by the world size is padded, and drop_last_batch drops "
          "each rank's short batch",
          "[train]") {
  // 10 samples: 5 per rank at 2 ranks, 4 at 3 (two of them repeats, trained on as PyTorch's
  // DistributedSampler does); batches of 3 leave a short one on every rank.
  const int world = comm().size();
  const int64_t per_rank = (10 + world - 1) / world;
  for (const bool drop : {false, true}) {
    INFO("drop_last_batch " << drop);
    FixedRegressor model;
    TrainerOptions o = quiet(3);
    o.loss.name = "mse";
    o.metrics = {"mse"};
    o.drop_last_batch = drop;
    DistributedTrainer trainer(model, frozen(*model), comm_ptr(), o);
    const auto metrics = trainer.fit(std::make_shared<RegressionSet>(10, 0.0), nullptr);
    const int64_t steps = drop ? per_rank / 3 : (per_rank + 2) / 3;
    CHECK(metrics.at("step") == static_cast<double>(steps));
    // The padding is trained on but not counted (Note [Exact metrics]): rank r's i-th sample is the
    // epoch's r + i * world, a repeat from 10 on.
    const int64_t kept = drop ? per_rank / 3 * 3 : per_rank;
    int64_t counted = 0;
    for (int64_t r = 0; r < world; ++r) {
      for (int64_t i = 0; i < kept; ++i) counted += r + i * world < 10;
    }
    CHECK(metrics.at("train_count") == static_cast<double>(counted));
    if (!drop) CHECK(counted == 10);
  }
}

TEST_CASE("trainer: a loss function and a metric of the program's own", "[train]") {
  const int world = comm().size();
  const auto train_set = std::make_shared<RegressionSet>(6 * world, 0.0);
  const auto test_set = std::make_shared<RegressionSet>(7, 0.25);
  FixedRegressor model;
  TrainerOptions o = quiet(4);
  o.loss.name = "l1";  // replaced by loss_fn
  o.loss_fn = [](const at::Tensor& output, const at::Tensor& target) { return (output - target).abs().pow(3).mean(); };
  o.metrics = {};
  o.custom_metrics = {std::make_shared<MeanOutput>()};
  DistributedTrainer trainer(model, frozen(*model), comm_ptr(), o);
  const auto metrics = trainer.fit(train_set, test_set);
  auto oracle = [&](const RegressionSet& set) {
    torch::NoGradGuard no_grad;
    const auto all = set.all();
    const at::Tensor output = model->forward(all.data).to(torch::kDouble);
    const at::Tensor cubed = (output - all.target.to(torch::kDouble)).abs().pow(3).mean();
    return std::make_pair(cubed.item<double>(), output.mean().item<double>());
  };
  const auto [train_loss, train_mean] = oracle(*train_set);
  const auto [test_loss, test_mean] = oracle(*test_set);
  CHECK(metrics.at("train_loss") == Approx(train_loss).epsilon(1e-6));
  CHECK(metrics.at("test_loss") == Approx(test_loss).epsilon(1e-6));
  CHECK(metrics.at("train_mean_output") == Approx(train_mean).epsilon(1e-6));
  CHECK(metrics.at("test_mean_output") == Approx(test_mean).epsilon(1e-6));

  CHECK(lockstep::testing::communicator_healthy());
}

TEST_CASE("trainer: a loss that is not a scalar, or a metric that does not fit the task, is named", "[train]") {
  const auto train_set = std::make_shared<RegressionSet>(6 * comm().size(), 0.0);
  {
    // Per-sample losses are named, not silently summed or broadcast.
    TrainerOptions o = quiet(4);
    o.loss_fn = [](const at::Tensor& output, const at::Tensor& target) { return (output - target).square().mean(1); };
    o.metrics = {};
    FixedRegressor model;
    DistributedTrainer trainer(model, frozen(*model), comm_ptr(), o);
    CHECK_THAT(lockstep::testing::error_of([&] { trainer.fit(train_set, nullptr); }),
               Contains("the loss must be a floating-point scalar") && Contains("[4]") && Contains("loss_fn"));
  }
  {
    // The default classification metric on a regression set says what to use instead.
    TrainerOptions o = quiet(4);
    o.loss.name = "mse";
    FixedRegressor model;
    DistributedTrainer trainer(model, frozen(*model), comm_ptr(), o);
    CHECK_THAT(lockstep::testing::error_of([&] { trainer.fit(train_set, nullptr); }),
               Contains("metric accuracy") && Contains("for regression use the metrics mse"));
  }
  CHECK(lockstep::testing::communicator_healthy());
}

constexpr int64_t kClasses = 4;

TEST_CASE("trainer: macro_f1 and top-2 accuracy of a fixed classifier match their closed forms", "[train]") {
  lockstep::data::SyntheticOptions so;
  so.channels = 1;
  so.height = 2;
  so.width = 2;
  so.num_classes = kClasses;
  so.size = 12 * comm().size();
  so.seed = 11;
  auto train_set = std::make_shared<lockstep::data::SyntheticDataset>(so);
  so.size = 13;
  so.seed = 12;
  auto test_set = std::make_shared<lockstep::data::SyntheticDataset>(so);
  // Logits (1, 0.5, 0, 0) for every sample: the prediction is class 0, the top two are {0, 1}.
  struct Fixed : torch::nn::Module {
    torch::nn::Linear fc{register_module("fc", torch::nn::Linear(4, kClasses))};
    Fixed() {
      torch::NoGradGuard no_grad;
      fc->weight.zero_();
      fc->bias.copy_(torch::tensor({1.0, 0.5, 0.0, 0.0}));
    }
  };
  auto model = std::make_shared<Fixed>();
  TrainerOptions o = quiet(5);
  o.metrics = {"accuracy", "top2_accuracy", "macro_f1", "mean_iou"};
  DistributedTrainer trainer(model, [model](const at::Tensor& x) { return model->fc(x.flatten(1)); },
                             frozen(*model), comm_ptr(), o);
  const auto metrics = trainer.fit(train_set, test_set);
  for (const auto* set : {train_set.get(), test_set.get()}) {
    const std::string prefix = set == train_set.get() ? "train_" : "test_";
    const auto n = static_cast<double>(set->size());
    std::vector<double> per_class(kClasses, 0.0);
    for (int64_t i = 0; i < static_cast<int64_t>(set->size()); ++i) per_class[set->label(i)] += 1;
    // Every prediction is class 0: class 0 has n0 hits and n - n0 false positives; every other class
    // that occurs has hits 0 (F1 and IoU 0). Class 0 takes part in the means as a prediction anyway.
    int64_t present = 1;
    for (int64_t c = 1; c < kClasses; ++c) present += per_class[c] > 0 ? 1 : 0;
    const double n0 = per_class[0];
    INFO(prefix);
    CHECK(metrics.at(prefix + "acc") == Approx(n0 / n).epsilon(1e-12));
    CHECK(metrics.at(prefix + "top2_acc") == Approx((n0 + per_class[1]) / n).epsilon(1e-12));
    CHECK(metrics.at(prefix + "macro_f1") == Approx(2 * n0 / (n0 + n) / present).epsilon(1e-12));
    CHECK(metrics.at(prefix + "mean_iou") == Approx(n0 / n / present).epsilon(1e-12));
  }
}

namespace {

// Dense targets: 4 "pixels" per sample, some void (255), and every fifth sample void throughout.
constexpr int64_t kPixels = 4, kVoid = 255;
int64_t pixel_label(int64_t i, int64_t j) {
  if (i % 5 == 4 || (i + j) % 3 == 0) return kVoid;
  return (i * 7 + j) % kClasses;
}
class DenseSet : public lockstep::data::Dataset {
 public:
  explicit DenseSet(int64_t size) : size_(size) {}
  size_t size() const override { return static_cast<size_t>(size_); }
  lockstep::data::DatasetInfo info() const override { return {1, 1, kPixels, kClasses, {}}; }
  std::string description() const override { return "dense test set"; }
  lockstep::data::Example get_batch(const std::vector<int64_t>& indices) const override {
    check_indices(indices);
    const auto b = static_cast<int64_t>(indices.size());
    at::Tensor target = torch::empty({b, kPixels}, torch::kLong);
    for (int64_t r = 0; r < b; ++r) {
      for (int64_t j = 0; j < kPixels; ++j) target[r][j] = pixel_label(indices[r], j);
    }
    return {torch::zeros({b, 1, 1, kPixels}), target};
  }

 private:
  int64_t size_;
};

}  // namespace

TEST_CASE("trainer: cross_entropy with ignore_index: the epoch's loss is the mean over every counted target",
          "[train]") {
  // Samples count unequal numbers of targets, and a batch of void targets only has no mean: the loss
  // used to be weighted by samples (test_loss off the mean over targets) and such a batch made it NaN.
  const int64_t size = 11;  // padded at 2 and 3 ranks: the repeats are not counted either
  struct Fixed : torch::nn::Module {
    at::Tensor logits = register_parameter("logits", torch::tensor({1.0, 0.5, 0.0, 0.0}));
  };
  auto model = std::make_shared<Fixed>();
  TrainerOptions o = quiet(2);
  o.eval_batch_size = 1;  // sample 4's batch holds void targets only
  o.loss.ignore_index = kVoid;
  o.metrics = {"accuracy"};
  DistributedTrainer trainer(
      model,
      [model](const at::Tensor& x) {
        return model->logits.view({1, kClasses, 1}).expand({x.size(0), kClasses, kPixels}) + 0 * x.sum();
      },
      frozen(*model), comm_ptr(), o);
  const auto metrics = trainer.fit(std::make_shared<DenseSet>(size), std::make_shared<DenseSet>(size));
  const std::vector<double> logits{1.0, 0.5, 0.0, 0.0};
  double lse = 0;
  for (double l : logits) lse += std::exp(l);
  lse = std::log(lse);
  double loss = 0, counted = 0, zeros = 0;
  for (int64_t i = 0; i < size; ++i) {
    for (int64_t j = 0; j < kPixels; ++j) {
      const int64_t label = pixel_label(i, j);
      if (label == kVoid) continue;
      loss += lse - logits[label];
      counted += 1;
      zeros += label == 0;
    }
  }
  for (const std::string prefix : {"train_", "test_"}) {
    INFO(prefix);
    CHECK(metrics.at(prefix + "count") == size);
    CHECK(metrics.at(prefix + "loss") == Approx(loss / counted).epsilon(1e-6));
    CHECK(metrics.at(prefix + "acc") == Approx(zeros / counted).epsilon(1e-12));
  }
  for (const auto& p : model->parameters()) CHECK(torch::isfinite(p).all().item<bool>());
}

TEST_CASE("trainer: ranks with another loss or other metrics get one error naming them", "[train]") {
  const int rank = comm().rank();
  const auto train_set = std::make_shared<RegressionSet>(4 * comm().size(), 0.0);
  TrainerOptions o = quiet(4);
  o.loss.name = "mse";
  o.metrics = rank == comm().size() - 1 ? std::vector<std::string>{"mse", "mae"} : std::vector<std::string>{"mse"};
  {
    FixedRegressor model;
    DistributedTrainer trainer(model, frozen(*model), comm_ptr(), o);
    CHECK_THAT(lockstep::testing::error_of([&] { trainer.fit(train_set, nullptr); }),
               Contains("the metrics") && Contains("mse, mae"));
  }
  o.metrics = {"mse"};
  o.loss.name = rank == 0 ? "mse" : "smooth_l1";
  {
    FixedRegressor model;
    DistributedTrainer trainer(model, frozen(*model), comm_ptr(), o);
    CHECK_THAT(lockstep::testing::error_of([&] { trainer.fit(train_set, nullptr); }),
               Contains("the loss") && Contains("smooth_l1 (beta 1)"));
  }
  CHECK(lockstep::testing::communicator_healthy());
}

TEST_CASE("MetricTracker in a loop of one's own: uneven shards give the values over their union", "[train]") {
  // Rank r holds 5 + 3r samples in batches of 4: averaging per-rank values would weight them wrongly.
  const int world = comm().size();
  auto shard = [](int r) {
    torch::manual_seed(40 + r);
    const int64_t n = 5 + 3 * r;
    at::Tensor scores = torch::randn({n, 3});
    at::Tensor labels = torch::randint(0, 3, {n}, torch::kLong);
    return std::make_pair(scores, labels);
  };
  lockstep::train::MetricTracker tracker(lockstep::train::make_metrics({"accuracy", "macro_f1"}, 3));
  const auto [scores, labels] = shard(comm().rank());
  for (int64_t start = 0; start < scores.size(0); start += 4) {
    const int64_t b = std::min<int64_t>(4, scores.size(0) - start);
    const at::Tensor out = scores.narrow(0, start, b), target = labels.narrow(0, start, b);
    tracker.update(out, target, torch::nn::functional::cross_entropy(out, target));
  }
  const auto values = tracker.compute(comm());

  // The oracle: every shard at once, in one process.
  std::vector<at::Tensor> all_scores, all_labels;
  for (int r = 0; r < world; ++r) {
    auto [s, l] = shard(r);
    all_scores.push_back(s);
    all_labels.push_back(l);
  }
  const at::Tensor s = torch::cat(all_scores), l = torch::cat(all_labels);
  const double n = static_cast<double>(s.size(0));
  const at::Tensor predicted = s.argmax(1);
  double f1 = 0;
  int present = 0;
  for (int64_t c = 0; c < 3; ++c) {
    const double tp = (predicted.eq(c) & l.eq(c)).sum().item<double>();
    const double fp = (predicted.eq(c) & l.ne(c)).sum().item<double>();
    const double fn = (predicted.ne(c) & l.eq(c)).sum().item<double>();
    if (tp + fp + fn == 0) continue;
    f1 += 2 * tp / (2 * tp + fp + fn);
    ++present;
  }
  CHECK(values.at("count") == n);
  CHECK(values.at("acc") == Approx(predicted.eq(l).sum().item<double>() / n).epsilon(1e-12));
  CHECK(values.at("macro_f1") == Approx(f1 / present).epsilon(1e-12));
  CHECK(values.at("loss") == Approx(torch::nn::functional::cross_entropy(s, l).item<double>()).epsilon(1e-5));
}
