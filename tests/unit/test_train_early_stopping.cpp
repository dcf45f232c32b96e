// EarlyStopping on its own: the decision from a sequence of epoch metrics, modes, min_delta, errors,
// and the checkpointed state (a resumed run that had stopped stays stopped).
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/core/error.hpp"
#include "lockstep/train/early_stopping.hpp"
#include "lockstep/train/ema.hpp"
#include "lockstep/train/metrics.hpp"

using Catch::Matchers::Contains;
using lockstep::train::EarlyStopping;
using lockstep::train::EarlyStoppingOptions;
using lockstep::train::TrainerContext;

namespace {

// Feeds `values` of `monitor` as epochs 1, 2, ...; returns the 1-based epoch after which it asked to
// stop (0: never) and leaves the context of the last epoch fed in `ctx`.
int64_t feed(EarlyStopping& stopping, const std::string& monitor, const std::vector<double>& values,
             TrainerContext& ctx, int64_t first_epoch = 0) {
  for (std::size_t i = 0; i < values.size(); ++i) {
    ctx = TrainerContext{};
    ctx.epoch = first_epoch + static_cast<int64_t>(i);
    ctx.metrics = {{"train_loss", 1.0}, {monitor, values[i]}};
    stopping.on_evaluation_end(ctx);
    if (ctx.stop_requested) return ctx.epoch + 1;
  }
  return 0;
}

}  // namespace

TEST_CASE("EarlyStopping: stops after `patience` epochs without an improvement, naming the best", "[early_stopping]") {
  EarlyStoppingOptions o;
  o.patience = 3;
  EarlyStopping stopping(o);
  CHECK(stopping.mode() == "min");  // auto, for test_loss
  TrainerContext ctx;
  CHECK(feed(stopping, "test_loss", {1.0, 0.9, 0.95, 0.91, 0.92, 0.5}, ctx) == 5);
  CHECK(ctx.stop_reason == "early stopping: test_loss did not improve for 3 epochs (best 0.9 at epoch 2)");
  CHECK(ctx.metrics.at("early_stopping_wait") == 3);
  CHECK(stopping.best() == 0.9);
  CHECK(stopping.best_epoch() == 2);
  CHECK(stopping.stopped());

  // An improvement resets the count.
  EarlyStopping patient(o);
  CHECK(feed(patient, "test_loss", {1.0, 1.1, 1.2, 0.8, 0.9, 0.95}, ctx) == 0);
  CHECK(patient.epochs_without_improvement() == 2);
  CHECK(patient.best_epoch() == 4);
}

TEST_CASE("EarlyStopping: auto picks max for accuracies, min_delta counts, NaN never improves", "[early_stopping]") {
  EarlyStoppingOptions o;
  o.monitor = "test_acc";
  o.patience = 2;
  EarlyStopping acc(o);
  CHECK(acc.mode() == "max");
  TrainerContext ctx;
  CHECK(feed(acc, "test_acc", {0.5, 0.6, 0.6, 0.59}, ctx) == 4);  // equal is not better

  o.min_delta = 0.05;
  EarlyStopping delta(o);
  CHECK(feed(delta, "test_acc", {0.5, 0.54, 0.53, 0.7}, ctx) == 3);  // +0.04 and +0.03: not more than 0.05
  CHECK(ctx.stop_reason == "early stopping: test_acc did not improve by more than 0.05 for 2 epochs (best 0.5 at epoch 1)");

  EarlyStoppingOptions n;
  n.patience = 1;
  EarlyStopping nan_loss(n);
  CHECK(feed(nan_loss, "test_loss", {std::nan(""), 1.0}, ctx) == 1);
  CHECK(ctx.stop_reason == "early stopping: test_loss did not improve for 1 epoch (no finite value yet)");
  EarlyStopping inf_loss(n);
  CHECK(feed(inf_loss, "test_loss", {1.0, std::numeric_limits<double>::infinity()}, ctx) == 2);
}

TEST_CASE("EarlyStopping: an evaluation cut short is not counted, a missing metric and bad options are named",
          "[early_stopping]") {
  EarlyStoppingOptions o;
  o.patience = 1;
  EarlyStopping stopping(o);
  TrainerContext cut;
  cut.stop_requested = true;  // Note [Stop during evaluation]: no test_* metrics
  cut.evaluation_cut_short = true;
  stopping.on_evaluation_end(cut);
  CHECK(stopping.epochs_without_improvement() == 0);
  CHECK(std::isnan(stopping.best()));

  // A stop that another callback asked for after a complete evaluation (it ran first: on_evaluation_end
  // goes in reverse order) still counts the epoch, and keeps that callback's reason.
  TrainerContext asked;
  asked.epoch = 0;
  asked.stop_requested = true;
  asked.stop_reason = "a callback of the program's own";
  asked.metrics = {{"test_loss", 0.5}};
  stopping.on_evaluation_end(asked);
  CHECK(stopping.best() == 0.5);
  CHECK(stopping.best_epoch() == 1);
  CHECK(asked.stop_reason == "a callback of the program's own");

  TrainerContext no_test;
  no_test.epoch = 2;
  no_test.metrics = {{"train_loss", 0.3}, {"train_acc", 0.9}};
  CHECK_THROWS_WITH(stopping.on_evaluation_end(no_test),
                    Contains("'test_loss' is not among epoch 3's metrics (train_acc, train_loss)") &&
                        Contains("test_* metrics need an evaluation set"));

  o.patience = 0;
  CHECK_THROWS_WITH(EarlyStopping(o), Contains("patience must be >= 1"));
  o.patience = 1;
  o.mode = "lowest";
  CHECK_THROWS_WITH(EarlyStopping(o), Contains("mode must be min, max or auto, got 'lowest'"));
}

TEST_CASE("EarlyStopping: its state resumes the count, and a run that had stopped stops again at once",
          "[early_stopping]") {
  EarlyStoppingOptions o;
  o.patience = 3;
  EarlyStopping first(o);
  TrainerContext ctx;
  feed(first, "test_loss", {1.0, 0.9, 0.95}, ctx);
  EarlyStopping resumed(o);
  resumed.load_state(first.save_state());
  CHECK(resumed.best() == 0.9);
  CHECK(resumed.epochs_without_improvement() == 1);
  CHECK(feed(resumed, "test_loss", {0.96, 0.97}, ctx, 3) == 5);  // the same epoch as without the resume

  EarlyStopping again(o);
  again.load_state(resumed.save_state());
  TrainerContext begin;
  again.on_train_begin(begin);
  CHECK(begin.stop_requested);
  CHECK(begin.stop_reason == ctx.stop_reason);

  // A fresh state (no epoch yet) round-trips too; another metric's state is refused.
  EarlyStopping fresh(o);
  EarlyStopping loaded(o);
  loaded.load_state(fresh.save_state());
  CHECK(std::isnan(loaded.best()));
  EarlyStoppingOptions other = o;
  other.monitor = "test_acc";
  EarlyStopping acc(other);
  CHECK_THROWS_WITH(acc.load_state(first.save_state()), Contains("the checkpoint monitored test_loss (min)"));
  CHECK_THROWS_WITH(acc.load_state("garbage"), Contains("is not one this callback wrote"));

  // A metric key with a space round-trips; a state written before monitors were quoted still loads.
  EarlyStoppingOptions spaced = o;
  spaced.monitor = "test_top 5";
  spaced.mode = "max";
  EarlyStopping top(spaced);
  feed(top, "test_top 5", {0.5, 0.75}, ctx);
  EarlyStopping top_resumed(spaced);
  REQUIRE_NOTHROW(top_resumed.load_state(top.save_state()));
  CHECK(top_resumed.best() == 0.75);
  CHECK(top_resumed.best_epoch() == 2);
  EarlyStopping older(o);
  older.load_state("test_loss min 0.5 3 1");
  CHECK(older.best() == 0.5);
  CHECK(older.epochs_without_improvement() == 1);
}

TEST_CASE("EarlyStopping with restore_best_weights refuses an ExponentialMovingAverage added after it",
          "[early_stopping]") {
  EarlyStoppingOptions o;
  o.restore_best_weights = true;
  auto stopping = std::make_shared<EarlyStopping>(o);
  auto ema = std::make_shared<lockstep::train::ExponentialMovingAverage>();
  TrainerContext ctx;
  const std::vector<std::shared_ptr<lockstep::train::Callback>> wrong{stopping, ema}, right{ema, stopping};
  ctx.callbacks = &wrong;
  CHECK_THROWS_WITH(stopping->on_setup(ctx), Contains("with restore_best_weights, add ExponentialMovingAverage "
                                                      "before it") &&
                                                 Contains("the average put in at the end would replace them"));
  ctx.callbacks = &right;
  CHECK_NOTHROW(stopping->on_setup(ctx));
  // Without restore_best_weights the order does not matter.
  auto plain = std::make_shared<EarlyStopping>();
  const std::vector<std::shared_ptr<lockstep::train::Callback>> plain_first{plain, ema};
  ctx.callbacks = &plain_first;
  CHECK_NOTHROW(plain->on_setup(ctx));
}

TEST_CASE("EarlyStopping: restore_best_weights puts the best epoch's weights back when the run is over",
          "[early_stopping]") {
  torch::manual_seed(3);
  torch::nn::Linear model(3, 2);
  EarlyStoppingOptions o;
  o.patience = 2;
  o.restore_best_weights = true;
  EarlyStopping stopping(o);
  // Epoch e's weights are all e; test_loss is best in epoch 2.
  const std::vector<double> losses{1.0, 0.5, 0.7, 0.8};
  TrainerContext ctx;
  for (std::size_t e = 0; e < losses.size() && !ctx.stop_requested; ++e) {
    {
      torch::NoGradGuard no_grad;
      for (auto& p : model->parameters()) p.fill_(static_cast<double>(e + 1));
    }
    ctx.model = model.get();
    ctx.epoch = static_cast<int64_t>(e);
    ctx.metrics = {{"test_loss", losses[e]}};
    stopping.on_evaluation_end(ctx);
  }
  REQUIRE(ctx.stop_requested);
  CHECK(stopping.best_epoch() == 2);
  // The copy is checkpointed: a resumed callback restores the same weights.
  EarlyStopping resumed(o);
  resumed.load_state(stopping.save_state());
  resumed.load_tensors(stopping.save_tensors());
  CHECK(resumed.save_tensors().size() == 2);  // weight and bias

  // A signal's stop is not the end of the run: the weights stay.
  TrainerContext signal;
  signal.model = model.get();
  signal.stop_requested = true;
  EarlyStopping interrupted(o);
  interrupted.load_tensors(stopping.save_tensors());
  interrupted.on_train_end(signal);
  CHECK(torch::all(model->weight == 4).item<bool>());

  resumed.on_train_end(ctx);
  CHECK(torch::all(model->weight == 2).item<bool>());
  CHECK(torch::all(model->bias == 2).item<bool>());
  {
    torch::NoGradGuard no_grad;
    model->weight.fill_(9);
  }
  stopping.on_train_end(ctx);
  CHECK(torch::all(model->weight == 2).item<bool>());
}

TEST_CASE("EarlyStopping: auto takes the direction of the trainer metric it monitors", "[early_stopping]") {
  // Neither name ends in "acc": the names alone would say min for both.
  const std::vector<lockstep::train::MetricPtr> metrics = {lockstep::train::make_metric("macro_f1", 3),
                                                           lockstep::train::make_metric("mse", 0)};
  TrainerContext setup;
  setup.trainer_metrics = &metrics;
  EarlyStoppingOptions o;
  o.monitor = "test_macro_f1";
  o.patience = 1;
  EarlyStopping f1(o);
  CHECK(f1.mode() == "min");
  f1.on_setup(setup);
  CHECK(f1.mode() == "max");
  TrainerContext ctx;
  CHECK(feed(f1, "test_macro_f1", {0.5, 0.6, 0.55}, ctx) == 3);

  o.monitor = "train_mse";
  EarlyStopping mse(o);
  mse.on_setup(setup);
  CHECK(mse.mode() == "min");
  o.mode = "max";  // an explicit mode stays
  o.monitor = "test_mse";
  EarlyStopping explicit_mode(o);
  explicit_mode.on_setup(setup);
  CHECK(explicit_mode.mode() == "max");
}
