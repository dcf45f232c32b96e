// Stopping a run cleanly (Note [Stop on signal]) at 2 and 3 ranks: a signal that reaches one rank, a
// time limit, request_stop(). Every rank must stop after the same step, the checkpoint must resume
// bitwise, and handlers must be the program's again after fit(). Every rank walks the same path.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "lockstep/core/stop_signals.hpp"
#include "lockstep/train/early_stopping.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using lockstep::testing::same_on_every_rank;
using lockstep::testing::bitwise_equal;

namespace fs = std::filesystem;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::train::Callback;
using lockstep::train::DistributedTrainer;
using lockstep::train::TrainerContext;
using lockstep::train::TrainerOptions;

// Runs `action` on `rank` at the end of optimizer step `step` (1-based), and records the last step seen.
struct AtStep : Callback {
  AtStep(int rank, int64_t step, std::function<void(TrainerContext&)> action)
      : rank(rank), step(step), action(std::move(action)) {}
  void on_after_optimizer_step(TrainerContext& ctx) override {
    last_step = ctx.global_step;
    if (ctx.world.rank == rank && ctx.global_step == step) action(ctx);
  }
  void on_train_end(TrainerContext& ctx) override {
    saw_stop = ctx.stop_requested;
    reason = ctx.stop_reason;
  }
  int rank;
  int64_t step;
  std::function<void(TrainerContext&)> action;
  int64_t last_step = 0;
  bool saw_stop = false;
  std::string reason;
};

// Records which epochs were evaluated and ended, and raises SIGUSR1 on `rank` at the evaluation or the
// end of epoch `epoch`.
struct EpochEvents : Callback {
  enum class Raise { kNever, kAtEvaluation, kAtEpochEnd };
  EpochEvents(Raise when, int rank, int64_t epoch) : when(when), rank(rank), epoch(epoch) {}
  void on_evaluation_begin(TrainerContext& ctx) override {
    evaluated.push_back(ctx.epoch);
    if (when == Raise::kAtEvaluation && ctx.world.rank == rank && ctx.epoch == epoch) raise(SIGUSR1);
  }
  void on_evaluation_batch_end(TrainerContext& ctx) override {
    batches_in_order = batches_in_order && ctx.eval_batch == ++batch_events - batches_before;
    eval_batches = ctx.eval_batches;
  }
  void on_evaluation_end(TrainerContext& ctx) override {
    batches_before = batch_events;
    evaluation_complete.push_back(ctx.metrics.count("test_acc") == 1 && !ctx.stop_requested);
  }
  void on_epoch_end(TrainerContext& ctx) override {
    ended.push_back(ctx.epoch);
    steps_at_end.push_back(ctx.batch_in_epoch);
    if (when == Raise::kAtEpochEnd && ctx.world.rank == rank && ctx.epoch == epoch) raise(SIGUSR1);
  }
  void on_train_end(TrainerContext& ctx) override { epoch_finished = ctx.epoch_finished; }
  Raise when;
  int rank;
  int64_t epoch;
  std::vector<int64_t> evaluated, ended, steps_at_end;  // steps_at_end: ctx.batch_in_epoch at on_epoch_end
  std::vector<bool> evaluation_complete;  // per evaluation: with metrics, and not cut short
  int64_t batch_events = 0, batches_before = 0, eval_batches = 0;  // on_evaluation_batch_end
  bool batches_in_order = true;  // eval_batch counted 1, 2, ... in each evaluation
  bool epoch_finished = false;
};

struct Run {
  std::vector<torch::Tensor> state;
  int64_t last_step = 0;
  std::string stop_reason;  // the trainer's
  std::string ctx_reason;   // what on_train_end saw
  int caught_signal = 0;
  int64_t first_step = -1;  // global_step before the run's first step (-1: it took none)
};

// SmallConvNet for 2 epochs of 10 steps at every world size (80 samples per rank, batches of 4).
// Different initialisations per rank: only a checkpoint or rank 0's broadcast decides.
// An evaluation set that counts the samples the loader reads from it.
struct CountingDataset : lockstep::data::Dataset {
  explicit CountingDataset(lockstep::data::DatasetPtr inner) : inner(std::move(inner)) {}
  size_t size() const override { return inner->size(); }
  lockstep::data::DatasetInfo info() const override { return inner->info(); }
  lockstep::data::Example get_batch(const std::vector<int64_t>& indices) const override {
    loaded += static_cast<int64_t>(indices.size());
    return inner->get_batch(indices);
  }
  std::string description() const override { return inner->description(); }
  lockstep::data::DatasetPtr inner;
  mutable std::atomic<int64_t> loaded{0};
};

Run run(TrainerOptions o, std::shared_ptr<AtStep> at, std::shared_ptr<EpochEvents> events = nullptr,
        lockstep::data::DatasetPtr eval_set = lockstep::testing::synthetic_images(9, 8, 12)) {
  torch::manual_seed(40 + comm().rank());
  lockstep::testing::SmallConvNet model(/*batch_norm=*/true);
  DistributedTrainer trainer(model, std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9)),
                             comm_ptr(), o);
  if (at) trainer.add_callback(at);
  if (events) trainer.add_callback(events);
  auto first = std::make_shared<lockstep::testing::FirstStep>();
  trainer.add_callback(first);
  trainer.fit(lockstep::testing::synthetic_images(40 * comm().size(), 8, 11), eval_set);
  Run result;
  result.state = lockstep::testing::state_of(*model);
  result.last_step = at ? at->last_step : 0;
  result.stop_reason = trainer.stop_reason();
  result.ctx_reason = at ? at->reason : "";
  result.caught_signal = trainer.caught_signal();
  result.first_step = first->step;
  return result;
}

void (*handler_of(int signal))(int) {
  struct sigaction current {};
  sigaction(signal, nullptr, &current);
  return current.sa_handler;
}

}  // namespace

TEST_CASE("stop: SIGUSR1 on the last rank stops every rank after the same step; the checkpoint resumes bitwise",
          "[stop]") {
  const int last = comm().size() - 1;
  const TrainerOptions base = lockstep::testing::quiet_trainer(2, 5);
  const Run full = run(base, nullptr);

  const std::string dir = lockstep::testing::shared_temp_dir("stop_signal");
  TrainerOptions o = lockstep::testing::resumable(base, dir, 0, "auto");
  o.checkpoint.every_steps = 0;  // the stop's own checkpoint is the only one mid-epoch
  o.progress = true;
  o.log_every = 0;
  REQUIRE(handler_of(SIGUSR1) == SIG_DFL);
  auto signal_at_3 = std::make_shared<AtStep>(last, 3, [](TrainerContext&) { raise(SIGUSR1); });
  const Run stopped = run(o, signal_at_3);
  // Posted after step 3, read two posts later on every rank (StopVote's lag): after step 5.
  CHECK(stopped.last_step == 5);
  CHECK(same_on_every_rank(torch::full({1}, stopped.last_step, torch::kLong)));
  CHECK(stopped.stop_reason == "SIGUSR1 on rank " + std::to_string(last));
  CHECK(stopped.ctx_reason == stopped.stop_reason);
  CHECK(stopped.caught_signal == SIGUSR1);
  CHECK(handler_of(SIGUSR1) == SIG_DFL);  // the program's again
  const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
  CHECK(listed.size() == 1);
  CHECK((!listed.empty() && fs::path(listed.back()).filename() == lockstep::train::checkpoint_file_name(5)));
  CHECK_FALSE(bitwise_equal(full.state, stopped.state));

  const Run resumed = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}));
  CHECK(resumed.stop_reason.empty());
  CHECK(resumed.caught_signal == 0);
  CHECK(resumed.first_step == stopped.last_step);  // from the stop's checkpoint, not from the start
  CHECK(resumed.last_step == 20);
  CHECK(bitwise_equal(full.state, resumed.state));
}

TEST_CASE("stop: request_stop() on one rank and stop_after_seconds stop every rank alike", "[stop]") {
  TrainerOptions o = lockstep::testing::quiet_trainer(2, 5);
  {
    torch::manual_seed(5);
    lockstep::testing::SmallConvNet model;
    DistributedTrainer trainer(model, std::make_shared<torch::optim::SGD>(model->parameters(), 0.05), comm_ptr(), o);
    auto ask = std::make_shared<AtStep>(0, 9, [&](TrainerContext&) { trainer.request_stop(); });
    trainer.add_callback(ask);
    trainer.fit(lockstep::testing::synthetic_images(40 * comm().size(), 8, 11), nullptr);
    CHECK(ask->last_step == 10);  // the first epoch (10 steps) ended first: its end is agreed on at once
    CHECK(same_on_every_rank(torch::full({1}, ask->last_step, torch::kLong)));
    CHECK(trainer.stop_reason() == "request_stop() on rank 0");
    CHECK(trainer.caught_signal() == 0);
    // A request is for one fit(): the next one runs to its end.
    ask->rank = -1;
    trainer.fit(lockstep::testing::synthetic_images(40 * comm().size(), 8, 11), nullptr);
    CHECK(ask->last_step == 20);
    CHECK(trainer.stop_reason().empty());
  }

  o.stop_after_seconds = 1e-9;  // passed by the first step's end on every rank
  const Run timed = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}));
  CHECK(timed.last_step == 3);
  const std::string all = comm().size() == 2 ? "ranks 0, 1" : "ranks 0, 1, 2";
  CHECK(timed.stop_reason == "stop_after_seconds (1e-09 s) on " + all);
}

// Note [Stop at epoch ends]: the votes in flight are read at the end of an epoch's steps and again
// after its end, so a signal in an epoch's last steps, its (short) evaluation or its checkpoint stops
// there.
TEST_CASE("stop: a signal during a short evaluation or an epoch's end stops every rank after that epoch; the "
          "resume starts the next",
          "[stop]") {
  const int last = comm().size() - 1;
  const TrainerOptions base = lockstep::testing::quiet_trainer(2, 5);
  const Run full = run(base, nullptr);
  // One evaluation batch per rank: fewer than the vote's lag, so the evaluation ends before the vote
  // is read (Note [Stop during evaluation]).
  for (const auto when : {EpochEvents::Raise::kAtEvaluation, EpochEvents::Raise::kAtEpochEnd}) {
    INFO("raised at " << (when == EpochEvents::Raise::kAtEvaluation ? "the evaluation" : "the epoch's end"));
    const std::string dir = lockstep::testing::shared_temp_dir("stop_after_epoch_end");
    TrainerOptions o = lockstep::testing::resumable(base, dir, 0, "auto");
    o.checkpoint.every_steps = 0;
    o.checkpoint.every_epoch = false;  // only the stop's own checkpoint (at_end): it must hold epoch 2's start
    auto events = std::make_shared<EpochEvents>(when, last, 0);
    const Run stopped = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}), events);
    CHECK(stopped.last_step == 10);  // epoch 1's 10 steps, not 2 steps into epoch 2
    CHECK(events->evaluated == std::vector<int64_t>{0});
    CHECK(events->ended == std::vector<int64_t>{0});
    CHECK(events->epoch_finished);
    CHECK(stopped.stop_reason == "SIGUSR1 on rank " + std::to_string(last));
    const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
    CHECK((listed.size() == 1 && fs::path(listed.back()).filename() == lockstep::train::checkpoint_file_name(10)));

    // Epoch 1 is done: the resumed run neither evaluates nor ends it again.
    auto again = std::make_shared<EpochEvents>(EpochEvents::Raise::kNever, -1, 0);
    const Run resumed = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}), again);
    CHECK(again->evaluated == std::vector<int64_t>{1});
    CHECK(again->ended == std::vector<int64_t>{1});
    CHECK(resumed.first_step == stopped.last_step);
    CHECK(resumed.last_step == 20);
    CHECK(resumed.stop_reason.empty());
    CHECK(bitwise_equal(full.state, resumed.state));
  }
}

// Note [Stop during evaluation]
TEST_CASE("stop: a signal during a long evaluation cuts it short on every rank; the resumed run evaluates again",
          "[stop]") {
  const int last = comm().size() - 1;
  TrainerOptions base = lockstep::testing::quiet_trainer(2, 5);
  base.eval_batch_size = 4;
  const int64_t eval_size = 600;  // 300 or 200 samples per rank: 75 or 50 batches
  const int64_t per_rank = eval_size / comm().size();
  const Run full = run(base, nullptr, nullptr, lockstep::testing::synthetic_images(eval_size, 8, 12));

  const std::string dir = lockstep::testing::shared_temp_dir("stop_in_long_evaluation");
  TrainerOptions o = lockstep::testing::resumable(base, dir, 0, "auto");
  o.checkpoint.every_steps = 0;
  auto events = std::make_shared<EpochEvents>(EpochEvents::Raise::kAtEvaluation, last, 0);
  auto eval_set = std::make_shared<CountingDataset>(lockstep::testing::synthetic_images(eval_size, 8, 12));
  const Run stopped = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}), events, eval_set);
  CHECK(stopped.last_step == 10);
  CHECK(stopped.stop_reason == "SIGUSR1 on rank " + std::to_string(last));
  CHECK(events->evaluated == std::vector<int64_t>{0});
  CHECK(events->evaluation_complete == std::vector<bool>{false});  // on_evaluation_end ran, without metrics
  CHECK(events->ended.empty());                                    // the epoch is unfinished
  CHECK_FALSE(events->epoch_finished);
  // Posted before batch 1, read before batch 3 on every rank; the loader reads a few batches ahead.
  INFO("samples read on this rank: " << eval_set->loaded.load() << " of " << per_rank);
  CHECK(eval_set->loaded.load() <= 4 * 8);
  CHECK(same_on_every_rank(torch::full({1}, stopped.last_step, torch::kLong)));

  auto again = std::make_shared<EpochEvents>(EpochEvents::Raise::kNever, -1, 0);
  auto whole = std::make_shared<CountingDataset>(lockstep::testing::synthetic_images(eval_size, 8, 12));
  const Run resumed = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}), again, whole);
  CHECK(again->evaluated == std::vector<int64_t>{0, 1});
  CHECK(again->evaluation_complete == std::vector<bool>{true, true});
  CHECK(again->ended == std::vector<int64_t>{0, 1});
  CHECK(whole->loaded.load() == 2 * per_rank);  // both evaluations whole
  CHECK(again->eval_batches == per_rank / 4);    // batches of 4, the same count on every rank
  CHECK(again->batch_events == 2 * per_rank / 4);
  CHECK(again->batches_in_order);
  CHECK(resumed.first_step == stopped.last_step);
  CHECK(resumed.last_step == 20);
  CHECK(bitwise_equal(full.state, resumed.state));
}

TEST_CASE("stop: a signal in an epoch's last step stops before its evaluation; the resumed run evaluates it",
          "[stop]") {
  const int last = comm().size() - 1;
  const TrainerOptions base = lockstep::testing::quiet_trainer(2, 5);
  const Run full = run(base, nullptr);
  for (const int64_t step : {10, 20}) {  // the first epoch's last step, and training's
    const std::string dir = lockstep::testing::shared_temp_dir("stop_in_last_step_" + std::to_string(step));
    TrainerOptions o = lockstep::testing::resumable(base, dir, 0, "auto");
    o.checkpoint.every_steps = 0;
    auto events = std::make_shared<EpochEvents>(EpochEvents::Raise::kNever, -1, 0);
    auto signal = std::make_shared<AtStep>(last, step, [](TrainerContext&) { raise(SIGUSR1); });
    const Run stopped = run(o, signal, events);
    CHECK(stopped.last_step == step);
    CHECK(stopped.stop_reason == "SIGUSR1 on rank " + std::to_string(last));
    CHECK(events->evaluated.size() == static_cast<std::size_t>(step / 10 - 1));  // not the stopped epoch
    CHECK_FALSE(events->epoch_finished);

    auto again = std::make_shared<EpochEvents>(EpochEvents::Raise::kNever, -1, 0);
    const Run resumed = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}), again);
    // The resumed run evaluates and ends the stopped epoch (after its remaining steps: none at step 20).
    const std::vector<int64_t> rest = step == 10 ? std::vector<int64_t>{0, 1} : std::vector<int64_t>{1};
    CHECK(again->evaluated == rest);
    CHECK(again->ended == rest);
    CHECK(resumed.first_step == (step == 10 ? stopped.last_step : -1));
    CHECK(resumed.last_step == (step == 10 ? 20 : 0));
    CHECK(bitwise_equal(full.state, resumed.state));
    CHECK(again->steps_at_end.front() == 10);
  }
  // A short last step (40 samples a rank in batches of 3: 13 steps of 3, then 1 of 1): the resumed run
  // counts the stopped epoch's steps as 14, not 13.
  const std::string dir = lockstep::testing::shared_temp_dir("stop_in_short_last_step");
  TrainerOptions o = lockstep::testing::resumable(base, dir, 0, "auto");
  o.checkpoint.every_steps = 0;
  o.batch_size = 3;
  const Run stopped = run(o, std::make_shared<AtStep>(last, 14, [](TrainerContext&) { raise(SIGUSR1); }));
  CHECK(stopped.last_step == 14);
  auto again = std::make_shared<EpochEvents>(EpochEvents::Raise::kNever, -1, 0);
  const Run resumed = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}), again);
  CHECK(resumed.first_step == stopped.last_step);  // a fresh run would count 14 and 14 too
  CHECK(again->steps_at_end == std::vector<int64_t>{14, 14});
}

TEST_CASE("stop: a signal after the last vote (the last epoch's end) is still reported; training is complete",
          "[stop]") {
  TrainerOptions o = lockstep::testing::quiet_trainer(2, 5);
  const Run full = run(o, nullptr);
  auto events = std::make_shared<EpochEvents>(EpochEvents::Raise::kAtEpochEnd, comm().size() - 1, 1);
  const Run late = run(o, std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {}), events);
  CHECK(late.last_step == 20);
  CHECK(events->ended == std::vector<int64_t>{0, 1});
  CHECK(late.stop_reason.empty());
  CHECK(late.caught_signal == SIGUSR1);
  CHECK(bitwise_equal(full.state, late.state));
  CHECK(handler_of(SIGUSR1) == SIG_DFL);
}

TEST_CASE("stop: a signal the program handles itself is left to it; an empty list takes none", "[stop]") {
  static std::atomic<int> own_calls{0};
  struct sigaction own {};
  own.sa_handler = [](int) { own_calls.fetch_add(1); };
  sigemptyset(&own.sa_mask);
  struct sigaction before {};
  REQUIRE(sigaction(SIGUSR1, &own, &before) == 0);
  TrainerOptions o = lockstep::testing::quiet_trainer(1, 5);
  const Run owned = run(o, std::make_shared<AtStep>(0, 2, [](TrainerContext&) { raise(SIGUSR1); }));
  CHECK(owned.last_step == 10);
  CHECK(owned.caught_signal == 0);
  CHECK(own_calls == (comm().rank() == 0 ? 1 : 0));
  CHECK(handler_of(SIGUSR1) == own.sa_handler);
  sigaction(SIGUSR1, &before, nullptr);

  bool taken_during_fit = false;
  auto look = [&](TrainerContext&) { taken_during_fit = handler_of(SIGUSR1) != SIG_DFL; };
  run(o, std::make_shared<AtStep>(comm().rank(), 1, look));
  CHECK(taken_during_fit);  // the default list has SIGUSR1
  o.stop_signals.clear();
  run(o, std::make_shared<AtStep>(comm().rank(), 1, look));
  CHECK_FALSE(taken_during_fit);

  o.stop_signals = {"SIGUSR1", "SIGKILL"};
  CHECK_THROWS_WITH(run(o, nullptr), Catch::Contains("TrainerOptions::stop_signals: 'SIGKILL' is not a signal"));
  CHECK(lockstep::testing::communicator_healthy());
}

TEST_CASE("stop: EarlyStopping ends every rank after the same epoch; a resumed run stays stopped", "[stop]") {
  // Learning rate 0 and no batch norm: test_loss is the same every epoch, so it stops improving after
  // epoch 1 and, with patience 2, training ends after epoch 3 of 6.
  const std::string dir = lockstep::testing::shared_temp_dir("early_stopping");
  TrainerOptions o = lockstep::testing::resumable(lockstep::testing::quiet_trainer(6, 5), dir, 0, "auto");
  o.checkpoint.every_steps = 0;
  lockstep::train::EarlyStoppingOptions es;
  es.patience = 2;
  auto fit_once = [&](std::shared_ptr<AtStep> at) {
    torch::manual_seed(7);
    lockstep::testing::SmallConvNet model(/*batch_norm=*/false);
    DistributedTrainer trainer(model, std::make_shared<torch::optim::SGD>(model->parameters(), 0.0), comm_ptr(), o);
    auto stopping = std::make_shared<lockstep::train::EarlyStopping>(es);
    trainer.add_callback(stopping);
    trainer.add_callback(at);
    trainer.fit(lockstep::testing::synthetic_images(40 * comm().size(), 8, 11),
                lockstep::testing::synthetic_images(30, 8, 12));
    return std::make_pair(trainer.stop_reason(), stopping);
  };
  auto first = std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {});
  const auto [reason, stopping] = fit_once(first);
  CHECK(first->last_step == 30);
  CHECK(same_on_every_rank(torch::full({1}, first->last_step, torch::kLong)));
  CHECK_THAT(reason, Catch::StartsWith("early stopping: test_loss did not improve for 2 epochs (best ") &&
                         Catch::EndsWith(" at epoch 1)"));
  CHECK(stopping->stopped());
  const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
  CHECK((!listed.empty() && fs::path(listed.back()).filename() == lockstep::train::checkpoint_file_name(30)));

  auto second = std::make_shared<AtStep>(-1, 0, [](TrainerContext&) {});
  const auto [again, resumed] = fit_once(second);
  CHECK(second->last_step == 0);  // no step: the restored state says stop
  CHECK(again == reason);
  CHECK(resumed->best_epoch() == 1);
}

TEST_CASE("stop: EarlyStopping with restore_best_weights leaves every rank the best epoch's model", "[stop]") {
  // Records, per epoch, the monitored metric and the weights EarlyStopping sees (it runs after this in
  // on_evaluation_end: the events run in reverse there, and nothing changes the model in between).
  struct Recorder : Callback {
    void on_evaluation_end(TrainerContext& ctx) override {
      losses.push_back(ctx.metrics.at("test_loss"));
      states.push_back(lockstep::testing::state_of(*ctx.model));
    }
    std::vector<double> losses;
    std::vector<std::vector<torch::Tensor>> states;
  };
  // From the third epoch on each step pushes the weights far off, alike on every rank: the best epoch
  // is one of the first two, so early stopping must fire and restore an earlier model than the last.
  struct Spoil : Callback {
    void on_after_optimizer_step(TrainerContext& ctx) override {
      if (ctx.epoch < 2) return;
      torch::NoGradGuard no_grad;
      for (auto& p : ctx.model->parameters()) p.add_(1.0);
    }
  };
  TrainerOptions o = lockstep::testing::quiet_trainer(8, 5);
  lockstep::train::EarlyStoppingOptions es;
  es.patience = 2;
  es.restore_best_weights = true;
  torch::manual_seed(11);
  lockstep::testing::SmallConvNet model(/*batch_norm=*/true);
  DistributedTrainer trainer(model, std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.2).momentum(0.9)),
                             comm_ptr(), o);
  auto recorder = std::make_shared<Recorder>();
  trainer.add_callback(recorder);
  trainer.add_callback(std::make_shared<Spoil>());
  trainer.add_callback(std::make_shared<lockstep::train::EarlyStopping>(es));
  trainer.fit(lockstep::testing::synthetic_images(40 * comm().size(), 8, 11), lockstep::testing::synthetic_images(30, 8, 12));
  REQUIRE_FALSE(recorder->losses.empty());
  const auto best = std::min_element(recorder->losses.begin(), recorder->losses.end()) - recorder->losses.begin();
  INFO("test_loss per epoch: " << Catch::Detail::stringify(recorder->losses) << ", stop: " << trainer.stop_reason());
  REQUIRE(best < 2);
  REQUIRE(static_cast<std::size_t>(best) + 3 == recorder->states.size());  // patience 2, then the stop
  CHECK_THAT(trainer.stop_reason(), Catch::StartsWith("early stopping"));
  CHECK(bitwise_equal(lockstep::testing::state_of(*model), recorder->states[static_cast<std::size_t>(best)]));
  CHECK_FALSE(bitwise_equal(lockstep::testing::state_of(*model), recorder->states.back()));
  CHECK(lockstep::testing::identical_across_ranks(*model));
}

namespace {

// Sets ctx.stop_requested (with `reason`) on `ranks` at one event, as a NaN guard that reads its own
// rank's loss would (Note [A callback's stop]); records what every rank went through.
struct AskStop : Callback {
  enum class At { kTrainBegin, kStep3, kLastEvaluationBatch, kFirstEpochEnd, kLastEpochEnd };
  AskStop(At at, std::vector<int> ranks, std::string reason) : at(at), ranks(std::move(ranks)), reason(std::move(reason)) {}
  bool asking(const TrainerContext& ctx) const {
    return std::find(ranks.begin(), ranks.end(), ctx.world.rank) != ranks.end();
  }
  void ask(TrainerContext& ctx) {
    if (!asking(ctx)) return;
    ctx.stop_requested = true;
    ctx.stop_reason = reason;
  }
  void on_train_begin(TrainerContext& ctx) override {
    if (at == At::kTrainBegin) ask(ctx);
  }
  void on_step_end(TrainerContext& ctx) override {
    last_step = ctx.global_step;
    if (at == At::kStep3 && ctx.global_step == 3) ask(ctx);
  }
  void on_evaluation_batch_end(TrainerContext& ctx) override {
    if (at == At::kLastEvaluationBatch && ctx.epoch == 0 && ctx.eval_batch == ctx.eval_batches) ask(ctx);
    // A request_stop() on the asking rank just before its last epoch's end: after the last epoch only
    // a callback's request counts, and this rank's request must not hide it.
    if (at == At::kLastEpochEnd && trainer != nullptr && asking(ctx) && ctx.epoch + 1 == ctx.options->epochs) {
      trainer->request_stop();
    }
  }
  void on_evaluation_end(TrainerContext& ctx) override {
    evaluation_complete.push_back(ctx.metrics.count("test_acc") == 1 && !ctx.evaluation_cut_short);
  }
  void on_epoch_end(TrainerContext& ctx) override {
    ended.push_back(ctx.epoch);
    if (at == At::kFirstEpochEnd && ctx.epoch == 0) ask(ctx);
    if (at == At::kLastEpochEnd && ctx.epoch + 1 == ctx.options->epochs) ask(ctx);
  }
  void on_train_end(TrainerContext& ctx) override {
    saw_stop = ctx.stop_requested;
    seen_reason = ctx.stop_reason;
  }
  At at;
  std::vector<int> ranks;
  std::string reason;
  int64_t last_step = 0;
  std::vector<bool> evaluation_complete;
  std::vector<int64_t> ended;
  bool saw_stop = false;
  std::string seen_reason;
  DistributedTrainer* trainer = nullptr;
};

}  // namespace

TEST_CASE("stop: a callback's stop on one rank stops every rank after the same step, wherever it is set",
          "[stop]") {
  const int last = comm().size() - 1;
  const std::string on_last = " on rank " + std::to_string(last);
  // 2 epochs of 10 steps; 9 evaluation samples in batches of 8: each rank's evaluation is 1 batch.
  const TrainerOptions o = lockstep::testing::quiet_trainer(2, 5);
  // `request_first`: request_stop() on every rank before fit() (such a request holds for the next fit()).
  auto fit_with = [&](std::shared_ptr<AskStop> ask, bool request_first = false) {
    torch::manual_seed(40 + comm().rank());
    lockstep::testing::SmallConvNet model(/*batch_norm=*/true);
    DistributedTrainer trainer(model, std::make_shared<torch::optim::SGD>(model->parameters(), 0.05), comm_ptr(), o);
    trainer.add_callback(ask);
    ask->trainer = &trainer;
    if (request_first) trainer.request_stop();
    trainer.fit(lockstep::testing::synthetic_images(40 * comm().size(), 8, 11),
                lockstep::testing::synthetic_images(9, 8, 12));
    CHECK(same_on_every_rank(torch::full({1}, ask->last_step, torch::kLong)));
    CHECK(lockstep::testing::identical_across_ranks(*model));
    CHECK(ask->saw_stop);
    CHECK(ask->seen_reason == trainer.stop_reason());
    return trainer.stop_reason();
  };

  SECTION("in a step: every rank stops after the vote's lag, two steps later") {
    auto ask = std::make_shared<AskStop>(AskStop::At::kStep3, std::vector<int>{last}, "loss is nan");
    CHECK(fit_with(ask) == "loss is nan" + on_last);
    CHECK(ask->last_step == 5);
    CHECK(ask->ended.empty());
  }
  SECTION("in a step, on every rank for one reason: that reason as it is") {
    std::vector<int> all(static_cast<std::size_t>(comm().size()));
    std::iota(all.begin(), all.end(), 0);
    auto ask = std::make_shared<AskStop>(AskStop::At::kStep3, all, "enough");
    CHECK(fit_with(ask) == "enough");
    CHECK(ask->last_step == 5);
  }
  SECTION("in the last evaluation batch: the evaluation completes on every rank, the run stops after the epoch") {
    auto ask = std::make_shared<AskStop>(AskStop::At::kLastEvaluationBatch, std::vector<int>{0}, "");
    CHECK(fit_with(ask) == "a callback on rank 0");  // no reason given
    CHECK(ask->last_step == 10);
    CHECK(ask->evaluation_complete == std::vector<bool>{true});
    CHECK(ask->ended == std::vector<int64_t>{0});
  }
  SECTION("at an epoch's end: every rank stops after that epoch") {
    auto ask = std::make_shared<AskStop>(AskStop::At::kFirstEpochEnd, std::vector<int>{last}, "target reached");
    CHECK(fit_with(ask) == "target reached" + on_last);
    CHECK(ask->last_step == 10);
    CHECK(ask->ended == std::vector<int64_t>{0});
  }
  SECTION("in on_train_begin: no rank takes a step") {
    auto ask = std::make_shared<AskStop>(AskStop::At::kTrainBegin, std::vector<int>{last}, "nothing to do");
    CHECK(fit_with(ask) == "nothing to do" + on_last);
    CHECK(ask->last_step == 0);
    CHECK(ask->ended.empty());
  }
  SECTION("in on_train_begin, with a request_stop() pending on every rank: still no step") {
    auto ask = std::make_shared<AskStop>(AskStop::At::kTrainBegin, std::vector<int>{last}, "nothing to do");
    CHECK(fit_with(ask, /*request_first=*/true) == "nothing to do" + on_last);
    CHECK(ask->last_step == 0);
  }
  SECTION("at the last epoch's end, behind this rank's request_stop(): every rank sees the callback's stop") {
    auto ask = std::make_shared<AskStop>(AskStop::At::kLastEpochEnd, std::vector<int>{last}, "done early");
    CHECK(fit_with(ask) == "done early" + on_last);
    CHECK(ask->last_step == 20);
    CHECK(ask->ended == std::vector<int64_t>{0, 1});
  }
  CHECK(lockstep::testing::communicator_healthy());
}
