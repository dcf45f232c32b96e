// ExponentialMovingAverage against the closed form computed from the weights after every step, the
// evaluation of the average (and training unchanged by it), bitwise resume, and equality over ranks.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/compress/quantization.hpp"
#include "lockstep/train/callback.hpp"
#include "lockstep/train/ema.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using lockstep::testing::bitwise_equal;
using Catch::Matchers::Contains;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::SmallConvNet;
using lockstep::train::DistributedTrainer;
using lockstep::train::EmaOptions;
using lockstep::train::ExponentialMovingAverage;
using lockstep::train::TrainerContext;
using lockstep::train::TrainerOptions;

// The model's parameters and buffers after every optimizer step.
struct WeightRecorder : lockstep::train::Callback {
  void on_after_optimizer_step(TrainerContext& ctx) override { steps.push_back(lockstep::testing::state_of(*ctx.model)); }
  std::vector<std::vector<at::Tensor>> steps;
};

struct Run {
  std::vector<at::Tensor> final_state;
  std::vector<std::vector<at::Tensor>> steps;
  std::map<std::string, double> metrics;
  double evaluated_after = 0;  // test_loss of trainer.evaluate() after fit
  bool identical = false;      // the final parameters bitwise equal on every rank
  int64_t first_step = -1;     // global_step before the run's first step (-1: it took none)
};

Run train(EmaOptions o, const std::string& dir = "", int64_t stop_after = 0, const std::string& resume = "never") {
  torch::manual_seed(41);
  SmallConvNet model(/*batch_norm=*/true);
  auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  TrainerOptions t = lockstep::testing::quiet_trainer(2, 6);
  if (!dir.empty()) t = lockstep::testing::resumable(t, dir, stop_after, resume);
  DistributedTrainer trainer(model, opt, comm_ptr(), t);
  auto recorder = std::make_shared<WeightRecorder>();
  trainer.add_callback(recorder);
  trainer.add_callback(std::make_shared<ExponentialMovingAverage>(o));
  auto first = std::make_shared<lockstep::testing::FirstStep>();
  trainer.add_callback(first);
  const auto test_set = lockstep::testing::synthetic_images(10, 8, 12);
  Run run;
  run.metrics = trainer.fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 11), test_set);
  run.final_state = lockstep::testing::state_of(*model);
  run.steps = recorder->steps;
  run.evaluated_after = trainer.evaluate(test_set).at("test_loss");
  run.identical = lockstep::testing::identical_across_ranks(*model);
  run.first_step = first->step;
  return run;
}

// SmallConvNet with activation points, SGD, the average (when `ema` is given) and then QAT.
std::unique_ptr<DistributedTrainer> qat_trainer(SmallConvNet& model, const EmaOptions* ema,
                                                lockstep::compress::QuantizationOptions q) {
  auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
  auto trainer = std::make_unique<DistributedTrainer>(model, opt, comm_ptr(), lockstep::testing::quiet_trainer(2, 6));
  if (ema != nullptr) trainer->add_callback(std::make_shared<ExponentialMovingAverage>(*ema));
  q.print_table = false;
  trainer->add_callback(std::make_shared<lockstep::compress::QuantizationAwareTraining>(q));
  return trainer;
}

}  // namespace

TEST_CASE("EMA: the average is the closed form over the weights after every step (or every 2nd), with and "
          "without warm-up",
          "[train]") {
  for (const bool warmup : {false, true}) {
    for (const int64_t every : {1, 2}) {
      INFO("warmup " << warmup << ", every_steps " << every);
      EmaOptions o;
      o.decay = 0.8;
      o.warmup = warmup;
      o.every_steps = every;
      const Run run = train(o);
      REQUIRE(run.steps.size() == 6);  // 2 epochs x 3 steps
      // Independently: start from the initial weights (recorded as the state before step 1 is not
      // available, rebuild them: same seed, same model), then fold in the weights after every
      // `every`-th step (global steps 2, 4, 6 for 2), the warm-up counting the folds.
      torch::manual_seed(41);
      SmallConvNet initial(/*batch_norm=*/true);
      std::vector<at::Tensor> expected = lockstep::testing::state_of(*initial);
      // DataParallel broadcasts rank 0's initialisation: every rank built the same one from the seed.
      int64_t folds = 0;
      for (size_t t = 0; t < run.steps.size(); ++t) {
        if ((static_cast<int64_t>(t) + 1) % every != 0) continue;
        const double d = warmup ? std::min(0.8, (1.0 + folds) / (10.0 + folds)) : 0.8;
        ++folds;
        for (size_t i = 0; i < expected.size(); ++i) {
          if (at::isFloatingType(expected[i].scalar_type())) {
            expected[i] = expected[i] * d + run.steps[t][i] * (1 - d);
          } else {
            expected[i] = run.steps[t][i].clone();
          }
        }
      }
      // apply_at_end: the model holds the average.
      REQUIRE(run.final_state.size() == expected.size());
      for (size_t i = 0; i < expected.size(); ++i) {
        INFO("tensor " << i);
        CHECK(torch::allclose(run.final_state[i].to(torch::kDouble), expected[i].to(torch::kDouble), 1e-6, 1e-6));
      }
      CHECK(run.metrics.at("ema_updates") == 6 / every);
      // The last epoch was evaluated with the average, which is what the model now holds.
      CHECK(run.metrics.at("test_loss") == run.evaluated_after);
      CHECK(run.identical);  // the average is the same on every rank, with no communication
    }
  }
}

TEST_CASE("EMA: evaluating the average leaves training untouched", "[train]") {
  EmaOptions with_eval;
  with_eval.decay = 0.5;
  with_eval.apply_at_end = false;
  EmaOptions without_eval = with_eval;
  without_eval.evaluate = false;
  const Run a = train(with_eval);
  const Run b = train(without_eval);
  CHECK(bitwise_equal(a.final_state, b.final_state));  // raw weights: the swaps were undone
  CHECK(a.metrics.at("test_loss") != b.metrics.at("test_loss"));  // but what was evaluated differs
  CHECK(b.metrics.at("test_loss") == b.evaluated_after);          // without: the raw weights
}

TEST_CASE("EMA: a stopped and resumed run continues the average bitwise", "[train]") {
  EmaOptions o;
  o.decay = 0.7;
  const Run full = train(o, lockstep::testing::shared_temp_dir("ema_full"), 0, "never");
  for (int64_t stop : {2, 4}) {
    INFO("stopped after step " << stop);
    const std::string dir = lockstep::testing::shared_temp_dir("ema_stop" + std::to_string(stop));
    train(o, dir, stop, "auto");
    const Run resumed = train(o, dir, 0, "auto");
    CHECK(resumed.first_step == stop);  // from the stop's checkpoint, not from the start
    CHECK(bitwise_equal(resumed.final_state, full.final_state));
  }
  // Stopped after the last step, before its epoch's evaluation: the resumed run takes no step and
  // still reports the decay of the last update.
  const std::string dir = lockstep::testing::shared_temp_dir("ema_stop_last");
  train(o, dir, 6, "auto");
  const Run resumed = train(o, dir, 0, "auto");
  CHECK(resumed.first_step == -1);
  CHECK(bitwise_equal(resumed.final_state, full.final_state));
  CHECK(resumed.metrics.at("ema_decay") == full.metrics.at("ema_decay"));
  CHECK(resumed.metrics.at("ema_updates") == full.metrics.at("ema_updates"));
}

TEST_CASE("EMA with quantization-aware training: evaluation and the final model are the average's int8 values, "
          "training is untouched",
          "[train]") {
  // Note [Nested evaluation events]: the average is swapped in, QAT quantizes it, QAT restores the
  // average, the average's callback restores the raw weights.
  auto run = [](bool evaluate) {
    torch::manual_seed(43);
    SmallConvNet model(/*batch_norm=*/false, /*quantize_activations=*/true);
    EmaOptions e;
    e.decay = 0.6;
    e.evaluate = evaluate;
    const auto trainer = qat_trainer(model, &e, {});
    const auto test_set = lockstep::testing::synthetic_images(10, 8, 12);
    Run out;
    out.metrics = trainer->fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 11), test_set);
    out.evaluated_after = trainer->evaluate(test_set).at("test_loss");
    out.final_state = lockstep::testing::state_of(*model);
    out.identical = lockstep::testing::identical_across_ranks(*model);
    return out;
  };
  const Run with_eval = run(true);
  const Run without_eval = run(false);
  // Training saw the raw weights in both runs: the same losses, and the same final model (the
  // average's int8 values, left by QAT at the end on top of the average).
  CHECK(with_eval.metrics.at("train_loss") == without_eval.metrics.at("train_loss"));
  CHECK(bitwise_equal(with_eval.final_state, without_eval.final_state));
  // The last evaluation was of the model as it now is: the average, at its int8 values.
  CHECK(with_eval.metrics.at("test_loss") == with_eval.evaluated_after);
  CHECK(without_eval.metrics.at("test_loss") != without_eval.evaluated_after);
  CHECK(with_eval.identical);
}

TEST_CASE("EMA with quantization-aware training copies the activation ranges instead of shrinking them",
          "[train]") {
  // Note [Buffers that are state]: QAT begins after the average does, so the ranges were zero for the
  // average's first updates; averaged, they ended a fraction of the observed ones, and the exported
  // int8 model clipped what the evaluated one did not.
  auto ranges = [](bool ema) {
    torch::manual_seed(47);
    SmallConvNet model(/*batch_norm=*/false, /*quantize_activations=*/true);
    EmaOptions e;
    e.decay = 0.9;
    e.warmup = false;
    lockstep::compress::QuantizationOptions q;
    q.begin_step = 2;
    qat_trainer(model, ema ? &e : nullptr, q)
        ->fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 11),
              lockstep::testing::synthetic_images(10, 8, 12));
    std::vector<at::Tensor> out;
    for (const auto& module : model->modules(/*include_self=*/false)) {
      if (const auto* point = module->as<lockstep::compress::ActivationFakeQuant>()) {
        out.push_back(point->min_val.clone());
        out.push_back(point->max_val.clone());
      }
    }
    return out;
  };
  const std::vector<at::Tensor> with_ema = ranges(true);
  const std::vector<at::Tensor> without = ranges(false);
  REQUIRE(with_ema.size() == without.size());
  REQUIRE_FALSE(with_ema.empty());
  for (size_t i = 0; i < with_ema.size(); ++i) {
    INFO("range tensor " << i);
    CHECK(torch::equal(with_ema[i], without[i]));  // training is the same: so are the observed ranges
  }
}

TEST_CASE("EMA: options are validated", "[train]") {
  EmaOptions o;
  o.decay = 1.0;
  CHECK_THROWS_WITH(ExponentialMovingAverage(o), Contains("decay must be in [0, 1), got 1"));
  o.decay = 0.9;
  o.every_steps = 0;
  CHECK_THROWS_WITH(ExponentialMovingAverage(o), Contains("every_steps must be >= 1, got 0"));
}
