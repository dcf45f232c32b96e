// The trainer's epoch totals in checkpoints (Note [Epoch totals in checkpoints], an internal piece:
// src/train/epoch_totals.hpp): the state round-trips, a checkpoint with other metrics keeps the loss
// and counts only, and a checkpoint written before metrics were pluggable still resumes.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "lockstep/train/metrics.hpp"
#include "support/solo_communicator.hpp"
#include "train/epoch_totals.hpp"

using lockstep::train::EpochTotals;
using lockstep::train::EpochTotalsState;
using lockstep::train::make_metrics;

namespace {

std::vector<double> tracked(const EpochTotals& totals) {
  const at::Tensor sums = totals.tracker.sums().to(torch::kCPU).contiguous();
  return std::vector<double>(sums.data_ptr<double>(), sums.data_ptr<double>() + sums.numel());
}

// Epoch totals with the accuracy metric and their checkpoint state, set up on a one-rank
// communicator at the start of `epoch`.
struct SavedTotals {
  lockstep::testing::SoloCommunicator solo;
  lockstep::train::TrainerContext ctx;
  EpochTotals totals{make_metrics({"accuracy"})};
  EpochTotalsState state{&totals};
  explicit SavedTotals(int64_t epoch) {
    ctx.communicator = &solo;
    state.on_setup(ctx);
    totals.reset(epoch);
  }
};

}  // namespace

TEST_CASE("epoch totals: a checkpoint's state resumes the epoch's sums on rank 0", "[train]") {
  SavedTotals run(1);
  run.totals.sums[lockstep::train::kSteps] = 3;
  run.totals.tracker.update(torch::tensor({{2.0, 1.0}, {0.0, 1.0}}), torch::tensor({0, 0}, torch::kLong),
                            torch::tensor(0.5));
  const std::string state = run.state.save_state();

  EpochTotals resumed(make_metrics({"accuracy"}));
  EpochTotalsState loader(&resumed);
  loader.load_state(state);
  resumed.reset(1);
  CHECK(loader.restore(1, /*rank=*/0));
  CHECK(tracked(resumed) == std::vector<double>{1.0, 2.0, 2.0, 1.0, 2.0});  // loss x 2, 2, 2, 1 correct of 2
  CHECK(resumed.sums[lockstep::train::kSteps] == 3);

  // Another epoch's state is not this epoch's; a rank other than 0 starts from zero.
  EpochTotals other(make_metrics({"accuracy"}));
  EpochTotalsState other_loader(&other);
  other_loader.load_state(state);
  other.reset(2);
  CHECK_FALSE(other_loader.restore(2, 0));
  other_loader.load_state(state);
  other.reset(1);
  CHECK(other_loader.restore(1, /*rank=*/1));
  CHECK(tracked(other) == std::vector<double>(5, 0.0));

  // Other metrics: the loss and the counts go on, the metrics start at zero.
  EpochTotals changed(make_metrics({"accuracy", "mse"}));
  EpochTotalsState changed_loader(&changed);
  changed_loader.load_state(state);
  changed.reset(1);
  CHECK(changed_loader.restore(1, 0));
  CHECK(tracked(changed) == std::vector<double>{1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0});
}

TEST_CASE("epoch totals: a checkpoint from before pluggable metrics keeps its loss and counts", "[train]") {
  // The old layout: loss sum, correct, count, forward, backward, comm, exposed, steps, grad norm, clipped.
  const std::string old_state =
      R"({"epoch": 0, "seconds": 1.5, "sums": [6.0, 3.0, 4.0, 0.1, 0.2, 0.3, 0.4, 2.0, 0.0, 0.0]})";
  EpochTotals totals(make_metrics({"accuracy"}));
  EpochTotalsState loader(&totals);
  loader.load_state(old_state);
  totals.reset(0);
  CHECK(loader.restore(0, 0));
  CHECK(tracked(totals) == std::vector<double>{6.0, 4.0, 4.0, 0.0, 0.0});
  CHECK(totals.sums == std::vector<double>{0.1, 0.2, 0.3, 0.4, 2.0, 0.0, 0.0});
  CHECK(totals.seconds_before == 1.5);
  CHECK_THROWS_WITH(loader.load_state(R"({"epoch": 0, "seconds": 0, "sums": [1.0, 2.0]})"),
                    Catch::Contains("expected 10 sums, found 2"));
}

TEST_CASE("epoch totals: non-finite sums (an fp16 step that overflowed) survive the checkpoint", "[train]") {
  // Note [Non-finite sums]: JSON has no NaN or inf; written as null they made the checkpoint unloadable.
  SavedTotals run(0);
  run.totals.sums[lockstep::train::kGradNorm] = std::numeric_limits<double>::infinity();
  run.totals.sums[lockstep::train::kComm] = -std::numeric_limits<double>::infinity();
  run.totals.sums[lockstep::train::kSteps] = 5;
  run.totals.tracker.update(torch::tensor({{2.0, 1.0}, {0.0, 1.0}}), torch::tensor({0, 0}, torch::kLong),
                            torch::tensor(std::numeric_limits<double>::quiet_NaN()));
  const std::string state = run.state.save_state();
  CHECK(state.find("null") == std::string::npos);

  EpochTotals resumed(make_metrics({"accuracy"}));
  EpochTotalsState loader(&resumed);
  REQUIRE_NOTHROW(loader.load_state(state));
  resumed.reset(0);
  REQUIRE(loader.restore(0, 0));
  const std::vector<double> sums = tracked(resumed);
  CHECK(std::isnan(sums[0]));  // the loss sum
  CHECK(std::vector<double>(sums.begin() + 1, sums.end()) == std::vector<double>{2.0, 2.0, 1.0, 2.0});
  CHECK(resumed.sums[lockstep::train::kGradNorm] == std::numeric_limits<double>::infinity());
  CHECK(resumed.sums[lockstep::train::kComm] == -std::numeric_limits<double>::infinity());
  CHECK(resumed.sums[lockstep::train::kSteps] == 5);

  // A checkpoint written before this, with null for the non-finite sums, loads (as NaN).
  EpochTotals old(make_metrics({"accuracy"}));
  EpochTotalsState old_loader(&old);
  REQUIRE_NOTHROW(old_loader.load_state(
      R"({"epoch": 0, "seconds": 2.0, "metrics": ["accuracy"], "sums": [0.1, 0.2, 0.3, 0.4, 5.0, null, 0.0],
          "tracked": [null, 2.0, 2.0, 1.0, 2.0]})"));
  old.reset(0);
  REQUIRE(old_loader.restore(0, 0));
  CHECK(std::isnan(tracked(old)[0]));
  CHECK(std::isnan(old.sums[lockstep::train::kGradNorm]));
  CHECK_THROWS_WITH(loader.load_state(R"({"epoch": 0, "seconds": "soon", "sums": []})"),
                    Catch::Contains("trainer_epoch_totals state is not valid") && Catch::Contains("\"soon\""));
}

TEST_CASE("epoch totals: the training time stops when the epoch's steps end", "[train]") {
  // A stop that cuts the evaluation short writes the checkpoint after it: the evaluation's time must
  // not be saved, and resumed, as training time (images_per_s would come out low).
  SavedTotals run(0);
  EpochTotals& totals = run.totals;
  totals.seconds_before = 5.0;
  totals.freeze_seconds();
  const double frozen = totals.seconds();
  CHECK(frozen >= 5.0);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // the evaluation
  CHECK(totals.seconds() == frozen);
  EpochTotals resumed(make_metrics({"accuracy"}));
  EpochTotalsState loader(&resumed);
  loader.load_state(run.state.save_state());
  resumed.reset(0);
  REQUIRE(loader.restore(0, 0));
  CHECK(resumed.seconds_before == frozen);
  CHECK(resumed.seconds() < frozen + 1.0);  // running again from the resume
  totals.reset(1);  // the next epoch's clock starts afresh
  CHECK(totals.seconds() < 1.0);
}
