// PowerSGD in the trainer's checkpoints, at 2 and 3 ranks: a run stopped and resumed ends bitwise
// where the uninterrupted run ends, parameters and every rank's own residuals included, whether the
// trainer found the hook's state itself or the user added its callback; resuming with other PowerSGD
// options or at another world size is a clear error.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <memory>
#include <string>
#include <vector>

#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/train/checkpoint.hpp"
#include "lockstep/train/powersgd_state_callback.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"
#include "support/solo_communicator.hpp"

namespace {

using lockstep::testing::ranks_equal_to_rank0;
using lockstep::testing::bitwise_equal;

namespace ddp = lockstep::ddp;
using Catch::Matchers::Contains;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::SmallConvNet;
using lockstep::train::DistributedTrainer;
using lockstep::train::PowerSGDStateCallback;
using lockstep::train::TrainerOptions;

enum class Wiring { kPowerSGDHook, kOwnHookAndCallback };

struct Run {
  std::vector<at::Tensor> model;
  std::vector<at::Tensor> residuals;  // this rank's, for each parameter that has one
  ddp::PowerSGDStats stats;
  int state_callbacks = 0;  // PowerSGDStateCallbacks among the trainer's callbacks
  int64_t first_step = -1;  // global_step before the run's first step (-1: it took none)
};

// SmallConvNet (batch norm) for 2 epochs of 3 steps, SGD with momentum, a checkpoint every step.
// At rank 1 conv.weight (8 x 9) and fc.weight (4 x 512) are compressed from the third step on.
Run train(const std::string& dir, int64_t stop_after, const std::string& resume, int64_t rank = 1,
          Wiring wiring = Wiring::kPowerSGDHook, lockstep::comm::CommunicatorPtr communicator = comm_ptr()) {
  torch::manual_seed(41);
  SmallConvNet model(/*batch_norm=*/true);
  auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  TrainerOptions t = lockstep::testing::resumable(lockstep::testing::quiet_trainer(2, 5), dir, stop_after, resume);
  ddp::PowerSGDOptions o;
  o.matrix_approximation_rank = rank;
  o.start_iteration = 2;
  auto state = std::make_shared<ddp::PowerSGDState>(o);
  if (wiring == Wiring::kPowerSGDHook) {
    t.ddp.comm_hook = ddp::powersgd_hook(state);
  } else {
    t.ddp.comm_hook = [state](lockstep::comm::Communicator& c, const ddp::GradBucket& b) { return state->reduce(c, b); };
  }
  DistributedTrainer trainer(model, opt, communicator, t);
  if (wiring == Wiring::kOwnHookAndCallback) trainer.add_callback(std::make_shared<PowerSGDStateCallback>(state));
  auto first = std::make_shared<lockstep::testing::FirstStep>();
  trainer.add_callback(first);
  trainer.fit(lockstep::testing::synthetic_images(12 * communicator->size(), 8, 11), nullptr);
  Run run;
  run.model = lockstep::testing::state_of(*model);
  for (const auto& p : model->named_parameters()) {
    const at::Tensor residual = state->error(p.key());
    if (residual.defined()) run.residuals.push_back(residual);
  }
  run.stats = state->stats();
  run.first_step = first->step;
  for (const auto& cb : trainer.callbacks()) run.state_callbacks += dynamic_cast<PowerSGDStateCallback*>(cb.get()) != nullptr;
  return run;
}

// Every rank's serialised PowerSGD state, as the checkpoint at `path` holds it.
std::vector<std::string> powersgd_states_in(const std::string& path) {
  torch::serialize::InputArchive archive, part;
  archive.load_from(path);
  archive.read("callback_tensors_powersgd", part);
  c10::IValue count;
  part.read("count", count);
  std::vector<std::string> states;
  for (int64_t i = 0; i < count.toInt(); ++i) {
    at::Tensor bytes;
    part.read("t" + std::to_string(i), bytes);
    const auto* begin = reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>());
    states.emplace_back(begin, begin + bytes.numel());
  }
  return states;
}

}  // namespace

TEST_CASE("PowerSGD: a trainer run stopped and resumed is bitwise the uninterrupted one, residuals included",
          "[train][powersgd]") {
  const Run full = train(lockstep::testing::shared_temp_dir("psgd_full"), 0, "never");
  REQUIRE(full.residuals.size() == 2);
  CHECK(full.state_callbacks == 1);  // added by the trainer
  CHECK(full.stats.compressed_matrices == 2 * 4);
  // Each rank's residual is its own: a resume that handed every rank rank 0's would show.
  CHECK(ranks_equal_to_rank0(full.residuals[0]) == 1);

  // After 1 step only the iteration count matters (compression starts at the third); after 4 the
  // residuals and warm-start Qs do too (mid-epoch 1).
  for (int64_t stop : {1, 4}) {
    INFO("stopped after step " << stop);
    const std::string dir = lockstep::testing::shared_temp_dir("psgd_stop" + std::to_string(stop));
    const Run stopped = train(dir, stop, "auto");
    CHECK_FALSE(bitwise_equal(stopped.model, full.model));
    const Run resumed = train(dir, 0, "auto");
    CHECK(resumed.first_step == stop);  // from the stop's checkpoint, not from the start
    CHECK(bitwise_equal(resumed.model, full.model));
    CHECK(bitwise_equal(resumed.residuals, full.residuals));
    // Byte and matrix counts do not depend on how the buckets were cut (a new DataParallel's first
    // step has other buckets than the rebuilt ones); the bucket counts would.
    CHECK(resumed.stats.compressed_matrices == full.stats.compressed_matrices);
    CHECK(resumed.stats.compressed_bytes == full.stats.compressed_bytes);
    CHECK(resumed.stats.gradient_bytes == full.stats.gradient_bytes);
    CHECK(resumed.stats.plain_bytes == full.stats.plain_bytes);
  }

  // A hook of one's own around the state, with its callback added by hand (and none added twice).
  const std::string dir = lockstep::testing::shared_temp_dir("psgd_by_hand");
  train(dir, 4, "auto", 1, Wiring::kOwnHookAndCallback);
  const Run resumed = train(dir, 0, "auto", 1, Wiring::kOwnHookAndCallback);
  CHECK(resumed.state_callbacks == 1);
  CHECK(resumed.first_step == 4);
  CHECK(bitwise_equal(resumed.model, full.model));
  CHECK(bitwise_equal(resumed.residuals, full.residuals));
}

TEST_CASE("PowerSGD: resuming with another matrix_approximation_rank or at another world size is an error",
          "[train][powersgd]") {
  const int world = comm().size();
  const std::string dir = lockstep::testing::shared_temp_dir("psgd_mismatch");
  train(dir, 4, "auto");
  CHECK_THROWS_WITH(train(dir, 0, "auto", /*rank=*/2),
                    Contains("matrix_approximation_rank 1 but this run has 2") && Contains("resume with the options"));

  const auto files = lockstep::train::list_checkpoints(dir + "/checkpoints");
  REQUIRE(!files.empty());
  const std::vector<std::string> states = powersgd_states_in(files.back());
  CHECK(static_cast<int>(states.size()) == world);  // every rank's residuals, in rank 0's file
  // Each process alone, as a world of one: the Checkpointer refuses first (sampler positions are per
  // rank), and PowerSGD's own check says why its state cannot be split either.
  auto alone = std::make_shared<lockstep::testing::SoloCommunicator>();
  CHECK_THROWS_WITH(train(dir, 0, files.back(), 1, Wiring::kPowerSGDHook, alone),
                    Contains("written by " + std::to_string(world) + " ranks but this job has 1"));
  ddp::PowerSGDState state;
  CHECK_THROWS_WITH(state.restore_state(states, *alone),
                    Contains("residuals of " + std::to_string(world) + " ranks but this job has 1"));
}
