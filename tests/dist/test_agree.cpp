// Ranks that disagree (a stale config file on one node, a truncated data file, a different command
// line) must get one clear error on every rank naming the difference, not a hang or wrong numbers.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "lockstep/comm/agree.hpp"
#include "lockstep/comm/mpi_communicator.hpp"
#include "lockstep/compress/pruning.hpp"
#include "lockstep/config/config.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/ddp/comm_hooks.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/train/early_stopping.hpp"
#include "lockstep/train/metrics.hpp"
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

TEST_CASE("run_on_every_rank: a failure on some ranks is an error on every rank, naming the first", "[runtime]") {
  const int rank = comm().rank();
  const int last = comm().size() - 1;
  bool ran = false;
  CHECK(error_of([&] { lockstep::comm::run_on_every_rank(comm(), [&] { ran = true; }, "work"); }).empty());
  CHECK(ran);
  // Rank 0 and the last rank fail, the last with an exception that is not a std::exception: each
  // raises its own; the others name rank 0's.
  std::string error;
  try {
    lockstep::comm::run_on_every_rank(
        comm(),
        [&] {
          if (rank == 0) LOCKSTEP_FAIL("disk full on rank 0's node");
          if (rank == last) throw 42;
        },
        "work");
  } catch (const std::exception& e) {
    error = e.what();
  } catch (int code) {
    error = "int " + std::to_string(code);  // rethrown as it was
  }
  INFO(error);
  if (rank == 0) {
    CHECK_THAT(error, Contains("disk full on rank 0's node") && !Contains("(on rank"));
  } else if (rank == last) {
    CHECK(error == "int 42");
  } else {
    CHECK_THAT(error, Contains("work: disk full on rank 0's node (on rank 0; this is rank " + std::to_string(rank) + ")"));
  }
  CHECK(communicator_healthy());
}

TEST_CASE("run_on_root: work that outlasts the timeout is an error naming it on the waiting ranks", "[runtime]") {
  // A communicator of its own, with a short timeout; rank 0's work (a checkpoint onto a slow disk)
  // takes longer than that.
  lockstep::comm::MpiCommunicatorOptions options;
  options.timeout = std::chrono::milliseconds(300);
  auto slow = std::make_unique<lockstep::comm::MpiCommunicator>(options);
  const int rank = slow->rank();
  bool ran = false;
  const std::string error = error_of([&] {
    lockstep::comm::run_on_root(
        *slow, 0,
        [&] {
          std::this_thread::sleep_for(std::chrono::milliseconds(1500));
          ran = true;
        },
        "checkpoint step_00000007.pt");
  });
  INFO(error);
  if (rank == 0) {
    CHECK(ran);
    CHECK(error.empty());  // the others' broadcast was posted: root's completes
  } else {
    CHECK_FALSE(ran);
    CHECK_THAT(error, Contains("checkpoint step_00000007.pt: rank 0 did not finish its part within 300 ms") &&
                          Contains("LOCKSTEP_TIMEOUT_S") && Contains("broadcast #"));
  }
  // Every rank's broadcast has completed once root has issued its own: after this barrier the
  // communicator has nothing in flight, and closes without the abort a stuck collective gets.
  comm().barrier()->wait();
  slow.reset();
  CHECK(communicator_healthy());
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

  // A GPU index is each rank's own (--set trainer.device=cuda:$LOCAL_RANK): only its kind must agree.
  const auto own_gpu = lockstep::config::parse_config(
      "", "<test>", {rank == 0 ? "trainer.device=cuda" : "trainer.device=cuda:" + std::to_string(rank)});
  CHECK(error_of([&] { lockstep::config::check_same_on_all_ranks(own_gpu, comm()); }).empty());
  const auto cpu_here = lockstep::config::parse_config("", "<test>", {rank == 0 ? "trainer.device=cpu" : "trainer.device=cuda:1"});
  CHECK_THAT(error_of([&] { lockstep::config::check_same_on_all_ranks(cpu_here, comm()); }),
             Contains("the ranks disagree on trainer.device: cpu on rank 0; cuda on "));
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
  // One node's copy of the data has an extra class: the metrics' sums (macro F1's per-class counts)
  // would be all-reduced with other lengths.
  {
    lockstep::data::SyntheticOptions so;
    so.channels = 1;
    so.height = so.width = 8;
    so.num_classes = rank == last ? 5 : 4;
    so.size = 48;
    so.seed = 7;
    torch::manual_seed(3);
    lockstep::testing::SmallConvNet model;
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    auto classes = o;
    classes.metrics = {"accuracy", "macro_f1"};
    lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), classes);
    const std::string classes_error =
        error_of([&] { trainer.fit(std::make_shared<lockstep::data::SyntheticDataset>(so), nullptr); });
    CHECK_THAT(classes_error, Contains("the ranks disagree on the number of classes: 4 on " + others(last) +
                                       "; 5 on rank " + std::to_string(last)));
    CHECK(communicator_healthy());
  }
  // A callback's options differ: a pruning schedule (its mask all-gathers at other steps) and
  // EarlyStopping's patience (one rank would stop alone).
  auto with_callback = [&](lockstep::train::CallbackPtr callback) {
    torch::manual_seed(3);
    lockstep::testing::SmallConvNet model;
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), o);
    trainer.add_callback(std::move(callback));
    return error_of([&] { trainer.fit(lockstep::testing::synthetic_images(48, 8, 7), nullptr); });
  };
  lockstep::compress::PruningOptions prune;
  prune.begin_step = rank == last ? 2 : 0;
  prune.end_step = 3;  // within the 4 steps of 3 ranks (6 of 2)
  prune.frequency = 2;
  const std::string pruning_error = with_callback(std::make_shared<lockstep::compress::MagnitudePruning>(prune));
  INFO(pruning_error);
  CHECK_THAT(pruning_error, Contains("the ranks disagree on the options of callback #0 "
                                     "(lockstep::compress::MagnitudePruning): "));
  CHECK_THAT(pruning_error, Contains("\"begin_step\":2"));
  CHECK(communicator_healthy());
  lockstep::train::EarlyStoppingOptions patient;
  patient.monitor = "train_loss";
  patient.patience = rank == 0 ? 1 : 3;
  CHECK_THAT(with_callback(std::make_shared<lockstep::train::EarlyStopping>(patient)),
             Contains("the options of callback #0 (lockstep::train::EarlyStopping): ") &&
                 Contains("\"patience\":1") && Contains("\"patience\":3"));
  CHECK(communicator_healthy());
  prune.begin_step = 0;
  CHECK(with_callback(std::make_shared<lockstep::compress::MagnitudePruning>(prune)).empty());
  // One rank's optimizer is another kind.
  {
    torch::manual_seed(3);
    lockstep::testing::SmallConvNet model;
    std::shared_ptr<torch::optim::Optimizer> opt;
    if (rank == last) {
      opt = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.1));
    } else {
      opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    }
    lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), o);
    CHECK_THAT(error_of([&] { trainer.fit(lockstep::testing::synthetic_images(48, 8, 7), nullptr); }),
               Contains("the ranks disagree on the optimizer: torch::optim::SGD on " + others(last) +
                        "; torch::optim::Adam on rank " + std::to_string(last)));
    CHECK(communicator_healthy());
  }
  // One rank accumulates gradients, the others do not.
  auto accumulating = o;
  if (rank == 0) accumulating.accumulation_steps = 2;
  error = run(48, accumulating);
  CHECK_THAT(error, Contains("the ranks disagree on accumulation_steps: 2 on rank 0; 1 on " + others(0)));
  CHECK(communicator_healthy());
  // One rank's learning rate (or its schedule) differs: no collective would notice, the models would drift.
  auto faster = o;
  if (rank == last) faster.lr.base_lr = 1e-7;
  error = run(48, faster);
  CHECK_THAT(error, Contains("the ranks disagree on lr (after the optimizer's own, at construction): 0.10000000000000001 on " +
                             others(last) + "; 9.9999999999999995e-08 on rank " + std::to_string(last)));
  CHECK(communicator_healthy());
  auto warm = o;
  if (rank == 0) warm.lr.warmup_steps = 3;
  CHECK_THAT(run(48, warm), Contains("the ranks disagree on lr.warmup_steps: 3 on rank 0; 0 on " + others(0)));
  // One rank writes a checkpoint at the end (a collective), the others do not.
  auto saving = o;
  saving.output_dir = lockstep::testing::shared_temp_dir("agree_at_end");
  if (rank == 0) saving.checkpoint.at_end = false;
  CHECK_THAT(run(48, saving), Contains("the ranks disagree on checkpoint.at_end: 0 on rank 0; 1 on " + others(0)));
  CHECK(communicator_healthy());
  // Progress (and so metrics.jsonl, whose errors rank 0 shares with a collective) on one rank only.
  auto chatty = saving;
  chatty.checkpoint.at_end = true;
  chatty.progress = rank == 0;
  CHECK_THAT(run(48, chatty), Contains("the ranks disagree on progress: 1 on rank 0; 0 on " + others(0)));
  CHECK(communicator_healthy());
  // Checkpoints kept on one rank alone (checkpoint.directory without output_dir: a Checkpointer, whose
  // setup is collective), and weights to start from on one rank alone (read, compared and broadcast).
  const std::string directory = lockstep::testing::shared_temp_dir("agree_directory");  // collective
  auto kept = o;
  kept.checkpoints = true;
  if (rank == last) kept.checkpoint.directory = directory;
  CHECK_THAT(run(48, kept), Contains("the ranks disagree on checkpoint.directory (set or not): not set on " +
                                     others(last) + "; set on rank " + std::to_string(last) + " (and 1 more differ)"));
  CHECK(communicator_healthy());
  auto starting = o;
  if (rank == 0) starting.init_from = "/nonexistent/dense.pt";
  CHECK_THAT(run(48, starting),
             Contains("the ranks disagree on init_from (set or not): set on rank 0; not set on " + others(0)));
  CHECK(communicator_healthy());
  CHECK(run(48, o).empty());
}

TEST_CASE("A callback whose checkpoint state fails on one rank fails every rank at once (Note [Callback state])",
          "[runtime]") {
  // Formerly the failing rank unwound while the others went on to wait for rank 0's file, then timed
  // out with a message about rank 0's disk (or, with rank 0 failing, waited in its broadcast).
  struct FailsToSave : lockstep::train::Callback {
    explicit FailsToSave(bool fail) : fail(fail) {}
    bool fail;
    std::string state_key() const override { return "fails_to_save"; }
    std::string save_state() const override {
      if (fail) LOCKSTEP_FAIL("the counter's state is not serialisable here");
      return "ok";
    }
  };
  const int rank = comm().rank();
  for (const int failing : {comm().size() - 1, 0}) {
    INFO("failing rank " << failing);
    torch::manual_seed(3);
    lockstep::testing::SmallConvNet model;
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    const std::string dir = lockstep::testing::shared_temp_dir("fails_to_save_" + std::to_string(failing));
    lockstep::train::DistributedTrainer trainer(
        model, opt, comm_ptr(), lockstep::testing::resumable(lockstep::testing::quiet_trainer(1, 5), dir, 0, "never"));
    trainer.add_callback(std::make_shared<FailsToSave>(rank == failing));
    const auto start = std::chrono::steady_clock::now();
    const std::string error = error_of([&] { trainer.fit(lockstep::testing::synthetic_images(16, 8, 7), nullptr); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    INFO(error);
    CHECK_THAT(error, Contains("the callback with state_key 'fails_to_save' could not give its state: the "
                               "counter's state is not serialisable here"));
    if (rank != failing) {
      CHECK_THAT(error, Contains("Checkpointer: could not take the callbacks' state for the checkpoint of step 1") &&
                            Contains("(on rank " + std::to_string(failing) + "; this is rank " +
                                     std::to_string(rank) + ")"));
    }
    CHECK(seconds < 30.0);  // at once, not after a collective's timeout
    CHECK(communicator_healthy());
  }
}

TEST_CASE("fit() and evaluate() refuse an empty evaluation set before any step", "[runtime]") {
  torch::manual_seed(3);
  lockstep::testing::SmallConvNet model;
  auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
  lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), lockstep::testing::quiet_trainer(1, 5));
  // A data set of the program's own that came out empty (a filter that kept nothing).
  struct Empty : lockstep::data::Dataset {
    lockstep::data::DatasetPtr base = lockstep::testing::synthetic_images(16, 8, 7);
    size_t size() const override { return 0; }
    lockstep::data::DatasetInfo info() const override { return base->info(); }
    lockstep::data::Example get_batch(const std::vector<int64_t>& indices) const override {
      return base->get_batch(indices);
    }
    std::string description() const override { return "filtered test images"; }
  };
  auto empty = std::make_shared<Empty>();
  const torch::Tensor before = model->parameters()[0].detach().clone();
  const std::string error = error_of([&] { trainer.fit(lockstep::testing::synthetic_images(48, 8, 7), empty); });
  INFO(error);
  CHECK_THAT(error, Contains("DistributedTrainer: the evaluation set (filtered test images) is empty"));
  CHECK(torch::equal(before, model->parameters()[0].detach()));  // refused before the first epoch's steps
  CHECK(communicator_healthy());
  CHECK_THAT(error_of([&] { trainer.evaluate(empty); }),
             Contains("the evaluation set (filtered test images) is empty"));
  CHECK(communicator_healthy());
}

TEST_CASE("DataParallel refuses ranks whose bucket options differ, at construction", "[runtime]") {
  const int last = comm().size() - 1;
  torch::manual_seed(4);
  lockstep::testing::SmallConvNet model;
  lockstep::ddp::DataParallelOptions options;
  if (comm().rank() == last) options.bucket_cap_mb = 0.001;
  const std::string error = error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), options); });
  INFO(error);
  CHECK_THAT(error, Contains("DataParallel: the ranks disagree on bucket caps: 25 MB, first bucket 1 MB on " +
                             others(last) + "; 0.001 MB, first bucket 1 MB on rank " + std::to_string(last)));
  CHECK(communicator_healthy());
  // A cap that is invalid on one rank alone is that disagreement on every rank, not one rank's error
  // while the others wait.
  lockstep::ddp::DataParallelOptions invalid;
  if (comm().rank() == last) invalid.bucket_cap_mb = -1;
  CHECK_THAT(error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), invalid); }),
             Contains("DataParallel: the ranks disagree on bucket caps: "));
  CHECK(communicator_healthy());
  lockstep::ddp::DataParallelOptions hooked;
  if (comm().rank() == 0) hooked.comm_hook = lockstep::ddp::fp16_compress_hook();
  CHECK_THAT(error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), hooked); }),
             Contains("DataParallel: the ranks disagree on comm_hook: "));
  CHECK(communicator_healthy());
  // Hooks of one C++ type with other settings: the 16-bit wire dtype (an fp16 and a bf16 bucket
  // summed bit for bit) and PowerSGD's options (P and Q of other shapes).
  lockstep::ddp::DataParallelOptions wire;
  wire.comm_hook = comm().rank() == 0 ? lockstep::ddp::fp16_compress_hook() : lockstep::ddp::bf16_compress_hook();
  CHECK_THAT(error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), wire); }),
             Contains("DataParallel: the ranks disagree on comm_hook: fp16_compress_hook on rank 0; bf16_compress_hook on " +
                      others(0)));
  CHECK(communicator_healthy());
  lockstep::ddp::DataParallelOptions powersgd;
  lockstep::ddp::PowerSGDOptions ps;
  if (comm().rank() == last) ps.matrix_approximation_rank = 2;
  powersgd.comm_hook = lockstep::ddp::powersgd_hook(ps);
  const std::string ps_error = error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), powersgd); });
  INFO(ps_error);
  CHECK_THAT(ps_error, Contains("DataParallel: the ranks disagree on comm_hook: powersgd_hook (matrix_approximation_rank 1, "
                                "start_iteration 10, min_compression_rate 2, use_error_feedback 1, warm_start 1, "
                                "orthogonalization_epsilon 0, seed 0) on " + others(last)));
  CHECK_THAT(ps_error, Contains("powersgd_hook (matrix_approximation_rank 2, start_iteration 10, "));
  CHECK(communicator_healthy());
  ps.matrix_approximation_rank = 1;
  ps.seed = comm().rank() == 0 ? 7 : 0;
  powersgd.comm_hook = lockstep::ddp::powersgd_hook(ps);
  CHECK_THAT(error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), powersgd); }),
             Contains("orthogonalization_epsilon 0, seed 7) on rank 0; "));
  CHECK(communicator_healthy());
  // A hook of the program's own: one lambda type whatever it captured, so its settings are compared
  // as the program states them.
  lockstep::ddp::DataParallelOptions custom;
  const double keep = comm().rank() == last ? 0.1 : 0.01;
  custom.comm_hook = [keep](lockstep::comm::Communicator& c, const lockstep::ddp::GradBucket& bucket) {
    return c.allreduce(bucket.buffer.mul_(keep));  // stands for a top-k hook sending keep * numel values
  };
  custom.comm_hook_settings = "top-k fraction " + std::to_string(keep);
  const std::string custom_error = error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), custom); });
  INFO(custom_error);
  CHECK_THAT(custom_error, Contains("DataParallel: the ranks disagree on comm_hook_settings: top-k fraction 0.010000 on " +
                                    others(last) + "; top-k fraction 0.100000 on rank " + std::to_string(last)));
  CHECK(communicator_healthy());
  custom.comm_hook_settings = "top-k fraction 0.01";
  CHECK(error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), custom); }).empty());
  // The same settings everywhere pass.
  powersgd.comm_hook = lockstep::ddp::powersgd_hook(lockstep::ddp::PowerSGDOptions{});
  CHECK(error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), powersgd); }).empty());
  wire.comm_hook = lockstep::ddp::bf16_compress_hook();
  CHECK(error_of([&] { lockstep::ddp::DataParallel dp(model.ptr(), comm_ptr(), wire); }).empty());
}

// Note [Ranks agree]: a check that fails on one rank alone before fit()'s agreement (the constructor's
// device and precision checks, metrics that cannot be built) must fail every rank there, not leave the
// others in DataParallel's or the agreement's collectives.
TEST_CASE("A rank whose trainer cannot be built, or whose metrics cannot, fails every rank", "[runtime]") {
  const int rank = comm().rank();
  const int last = comm().size() - 1;
  const auto o = lockstep::testing::quiet_trainer(1, 5);
  {
    auto odd = o;
    if (rank == last) odd.precision = "fp8";
    torch::manual_seed(3);
    lockstep::testing::SmallConvNet model;
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    const std::string error = error_of([&] { lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), odd); });
    INFO(error);
    CHECK_THAT(error, Contains("TrainerOptions::precision must be fp32, bf16 or fp16, found 'fp8'"));
    if (rank != last) {
      CHECK_THAT(error, Contains("DistributedTrainer: ") &&
                            Contains("(on rank " + std::to_string(last) + "; this is rank " + std::to_string(rank) + ")"));
    }
    CHECK(communicator_healthy());
  }
  {
    auto twice = o;
    twice.metrics = {"accuracy"};
    if (rank == last) twice.custom_metrics = {lockstep::train::make_metric("accuracy", 0)};
    torch::manual_seed(3);
    lockstep::testing::SmallConvNet model;
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), twice);
    const std::string error =
        error_of([&] { trainer.fit(lockstep::testing::synthetic_images(48, 8, 7), nullptr); });
    INFO(error);
    CHECK_THAT(error, Contains("the ranks disagree on the metrics: accuracy on " + others(last) +
                               "; cannot be built (the metrics name 'accuracy' twice") &&
                          Contains("on rank " + std::to_string(last)));
    CHECK(communicator_healthy());
  }
}
