// Ranks that disagree (a stale config file on one node, a truncated data file, a different command
// line) must get one clear error on every rank naming the difference, not a hang or wrong numbers.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <string>
#include <utility>
#include <vector>

#include "lockstep/comm/agree.hpp"
#include "lockstep/config/config.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using Catch::Matchers::Contains;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::communicator_healthy;
using lockstep::testing::error_of;

// "ranks 0, 2" for every rank but `except`.
std::string others(int except) {
  std::vector<int> ranks;
  for (int r = 0; r < comm().size(); ++r) {
    if (r != except) ranks.push_back(r);
  }
  return lockstep::comm::rank_list(ranks);
}

}  // namespace

TEST_CASE("check_same_values: agreement passes; a difference is one error on every rank, naming it", "[runtime]") {
  const int rank = comm().rank();
  using Entries = std::vector<std::pair<std::string, std::string>>;
  CHECK(error_of([&] { lockstep::comm::check_same_values(comm(), {{"lr", "0.1"}, {"epochs", "2"}}, "test"); })
            .empty());

  // Rank 1 has another lr and epochs, and the last rank lacks a key.
  Entries mine = {{"lr", rank == 1 ? "0.05" : "0.1"}, {"epochs", rank == 1 ? "3" : "2"}};
  if (rank != comm().size() - 1) mine.emplace_back("seed", "7");
  const std::string error = error_of([&] { lockstep::comm::check_same_values(comm(), mine, "test", "Fix it."); });
  INFO(error);
  CHECK_THAT(error, Contains("test: the ranks disagree on lr: 0.1 on " + others(1) + "; 0.05 on rank 1"));
  CHECK_THAT(error, Contains("(and 2 more differ)"));
  CHECK_THAT(error, Contains("Fix it."));
  CHECK(communicator_healthy());

  // Values with tabs and newlines are compared exactly.
  Entries odd = {{"key", rank == 0 ? "a\tb" : "a\nb"}};
  CHECK_THAT(error_of([&] { lockstep::comm::check_same_values(comm(), odd, "odd"); }),
             Contains("odd: the ranks disagree on key"));
}

TEST_CASE("A configuration that differs across ranks is an error naming the key", "[runtime]") {
  const int rank = comm().rank();
  const auto same = lockstep::config::parse_config("optimizer: {lr: 0.1}\n");
  CHECK(error_of([&] { lockstep::config::check_same_on_all_ranks(same, comm()); }).empty());

  const std::string lr = rank == comm().size() - 1 ? "0.05" : "0.1";
  const auto differs = lockstep::config::parse_config("optimizer: {lr: " + lr + "}\n", "<test>", {"trainer.epochs=4"});
  const std::string error = error_of([&] { lockstep::config::check_same_on_all_ranks(differs, comm()); });
  INFO(error);
  CHECK_THAT(error, Contains("config: the ranks disagree on optimizer.lr: 0.1 on " + others(comm().size() - 1) +
                             "; 0.05 on rank " + std::to_string(comm().size() - 1)));
  CHECK_THAT(error, Contains("--print-config"));
  CHECK(communicator_healthy());
}

TEST_CASE("fit() refuses ranks whose data sets or options differ, before any step", "[runtime]") {
  const int rank = comm().rank();
  const int last = comm().size() - 1;
  auto run = [&](int64_t train_size, lockstep::train::TrainerOptions o) {
    torch::manual_seed(3);
    lockstep::testing::SmallConvNet model;
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), o);
    return error_of([&] { trainer.fit(lockstep::testing::synthetic_images(train_size, 8, 7), nullptr); });
  };
  const auto o = lockstep::testing::quiet_trainer(1, 5);
  // One rank's copy of the data is truncated.
  std::string error = run(rank == last ? 44 : 48, o);
  INFO(error);
  CHECK_THAT(error, Contains("DistributedTrainer::fit: the ranks disagree on the training set size: 48 on " +
                             others(last) + "; 44 on rank " + std::to_string(last)));
  CHECK(communicator_healthy());
  // One rank accumulates gradients, the others do not.
  auto accumulating = o;
  if (rank == 0) accumulating.accumulation_steps = 2;
  error = run(48, accumulating);
  CHECK_THAT(error, Contains("the ranks disagree on accumulation_steps: 2 on rank 0; 1 on " + others(0)));
  CHECK(communicator_healthy());
  CHECK(run(48, o).empty());
}
