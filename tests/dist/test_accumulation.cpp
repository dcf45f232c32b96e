// The trainer's gradient accumulation and gradient clipping. Accumulating k micro-batches of b must
// train exactly as steps of one k x b batch (the same samples, the same mean), including an epoch's
// short last step; clipping must leave every step's update of norm lr x max_norm (a closed form for
// plain SGD), on every rank alike.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "lockstep/train/callback.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/counting_communicator.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using Catch::Matchers::Contains;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::SmallConvNet;
using lockstep::train::DistributedTrainer;
using lockstep::train::TrainerContext;
using lockstep::train::TrainerOptions;

// Counts the events and records what the trainer says of each step.
struct StepRecorder : lockstep::train::Callback {
  void on_batch_begin(TrainerContext& ctx) override { ++batch_begins; }
  void on_after_backward(TrainerContext& ctx) override {
    ++after_backwards;
    samples.push_back(ctx.step_samples);
    // The step's gradient norm before clipping (the trainer clips after this event), the long way.
    double squared = 0;
    for (const at::Tensor& p : ctx.model->parameters()) {
      if (p.grad().defined()) squared += p.grad().to(at::kDouble).pow(2).sum().item<double>();
    }
    norms.push_back(std::sqrt(squared));
    epochs.push_back(ctx.epoch);
  }
  void on_after_optimizer_step(TrainerContext& ctx) override {
    steps.push_back(ctx.global_step);
    losses.push_back(ctx.loss.item<double>());
  }
  int batch_begins = 0;
  int after_backwards = 0;
  std::vector<int64_t> samples;
  std::vector<double> norms;    // per step, before clipping
  std::vector<int64_t> epochs;  // per step
  std::vector<int64_t> steps;
  std::vector<double> losses;
};

struct Run {
  std::vector<at::Tensor> state;
  std::shared_ptr<StepRecorder> recorder;
  std::map<std::string, double> metrics;
  int collectives = 0;  // issued by the trainer, DataParallel included, from construction to the end
};

// SmallConvNet without batch norm (whose statistics would depend on the micro-batch size), SGD with
// momentum and weight decay, 2 epochs over `samples_per_rank` x world synthetic images.
Run train(size_t batch_size, int64_t accumulation, int64_t samples_per_rank, double clip = 0.0) {
  torch::manual_seed(17);
  SmallConvNet model(/*batch_norm=*/false);
  auto opt = std::make_shared<torch::optim::SGD>(
      model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(1e-3));
  TrainerOptions o = lockstep::testing::quiet_trainer(2, 9);
  o.batch_size = batch_size;
  o.accumulation_steps = accumulation;
  o.clip_grad_norm = clip;
  auto counting = std::make_shared<lockstep::testing::CountingCommunicator>(comm_ptr());
  DistributedTrainer trainer(model, opt, counting, o);
  Run run;
  run.recorder = std::make_shared<StepRecorder>();
  trainer.add_callback(run.recorder);
  run.metrics = trainer.fit(lockstep::testing::synthetic_images(samples_per_rank * comm().size(), 8, 4), nullptr);
  run.state = lockstep::testing::state_of(*model);
  run.collectives = counting->calls;
  return run;
}

bool close_states(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, double tol) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!torch::allclose(a[i], b[i], tol, tol)) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("trainer: accumulating 3 micro-batches of 2 trains as batches of 6, short last step included",
          "[train]") {
  // 14 samples per rank and epoch: micro-batches 2,2,2 | 2,2,2 | 2 against batches 6 | 6 | 2.
  // 15: 2,2,2 | 2,2,2 | 2,1 against 6 | 6 | 3, where the short micro-batch's samples must not weigh more.
  for (const int64_t per_rank : {14, 15}) {
    INFO(per_rank << " samples per rank");
    const Run accumulated = train(/*batch_size=*/2, /*accumulation=*/3, per_rank);
    const Run whole = train(/*batch_size=*/6, /*accumulation=*/1, per_rank);
    CHECK(close_states(accumulated.state, whole.state, 1e-5));
    CHECK(accumulated.recorder->steps == whole.recorder->steps);  // 3 steps per epoch, global_step 1..6
    CHECK(accumulated.recorder->steps.size() == 6);
    CHECK(accumulated.recorder->batch_begins == 6);
    CHECK(accumulated.recorder->after_backwards == 6);
    const int64_t last = per_rank - 12;
    CHECK(accumulated.recorder->samples == std::vector<int64_t>{6, 6, last, 6, 6, last});
    for (std::size_t i = 0; i < whole.recorder->losses.size(); ++i) {
      INFO("step " << i);
      CHECK(accumulated.recorder->losses[i] == Approx(whole.recorder->losses[i]).epsilon(1e-5));
    }
    CHECK(accumulated.metrics.at("train_loss") == Approx(whole.metrics.at("train_loss")).epsilon(1e-5));
    CHECK(accumulated.metrics.at("train_count") == whole.metrics.at("train_count"));
    // Only each step's last backward communicates (no_sync before it): the same collectives as batches of 6.
    CHECK(accumulated.collectives == whole.collectives);
  }
}

TEST_CASE("trainer: a run with accumulation stopped and resumed is bitwise the uninterrupted one", "[train]") {
  int64_t first_step = -1;  // of the last run (-1: it took no step)
  auto run = [&first_step](const std::string& dir, int64_t stop_after, const std::string& resume) {
    torch::manual_seed(29);
    SmallConvNet model(/*batch_norm=*/true);
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    TrainerOptions o = lockstep::testing::resumable(lockstep::testing::quiet_trainer(2, 4), dir, stop_after, resume);
    o.batch_size = 2;
    o.accumulation_steps = 3;
    DistributedTrainer trainer(model, opt, comm_ptr(), o);
    auto first = std::make_shared<lockstep::testing::FirstStep>();
    trainer.add_callback(first);
    trainer.fit(lockstep::testing::synthetic_images(14 * comm().size(), 8, 6), nullptr);  // 3 steps per epoch
    first_step = first->step;
    return lockstep::testing::state_of(*model);
  };
  const auto full = run(lockstep::testing::shared_temp_dir("accumulate_full"), 0, "never");
  for (int64_t stop : {2, 3, 4}) {  // inside the first epoch, at its end, inside the second
    INFO("stopped after step " << stop);
    const std::string dir = lockstep::testing::shared_temp_dir("accumulate_stop" + std::to_string(stop));
    run(dir, stop, "auto");
    const auto resumed = run(dir, 0, "auto");
    CHECK(first_step == stop);  // from the stop's checkpoint, not from the start
    bool equal = resumed.size() == full.size();
    for (std::size_t i = 0; equal && i < full.size(); ++i) equal = torch::equal(full[i], resumed[i]);
    CHECK(equal);
  }
}

TEST_CASE("trainer: clip_grad_norm bounds every update to lr x max_norm, alike on every rank", "[train]") {
  // Plain SGD, one step, a max norm far below the gradient's: the update is -lr * g * c / |g|, whose
  // norm is lr * c exactly.
  torch::manual_seed(23);
  SmallConvNet model(/*batch_norm=*/false);
  const std::vector<at::Tensor> before = lockstep::testing::state_of(*model);
  constexpr double kLr = 0.5;
  constexpr double kMaxNorm = 1e-3;
  auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(kLr));
  TrainerOptions o = lockstep::testing::quiet_trainer(1, 2);
  o.clip_grad_norm = kMaxNorm;
  o.stop_after_steps = 1;
  DistributedTrainer trainer(model, opt, comm_ptr(), o);
  trainer.fit(lockstep::testing::synthetic_images(8 * comm().size(), 8, 5), nullptr);
  const std::vector<at::Tensor> after = lockstep::testing::state_of(*model);
  double squared = 0;
  for (std::size_t i = 0; i < before.size(); ++i) squared += (after[i] - before[i]).pow(2).sum().item<double>();
  CHECK(std::sqrt(squared) == Approx(kLr * kMaxNorm).epsilon(1e-4));
  CHECK(lockstep::testing::identical_across_ranks(*model));

  // Over a whole run the metric is the mean norm before clipping over the (last) epoch's steps, and a
  // large max norm changes nothing.
  const Run clipped = train(2, 2, 8, /*clip=*/1e6);
  const Run plain = train(2, 2, 8);
  CHECK(clipped.metrics.count("grad_norm") == 1);
  double last_epoch_sum = 0;
  int last_epoch_steps = 0;
  for (std::size_t i = 0; i < clipped.recorder->norms.size(); ++i) {
    if (clipped.recorder->epochs[i] != 1) continue;
    last_epoch_sum += clipped.recorder->norms[i];
    ++last_epoch_steps;
  }
  CHECK(last_epoch_steps == 2);  // 8 samples per rank, micro-batches of 2, 2 per step
  CHECK(clipped.metrics.at("grad_norm") > 0);
  CHECK(clipped.metrics.at("grad_norm") == Approx(last_epoch_sum / last_epoch_steps).epsilon(1e-5));
  CHECK(plain.metrics.count("grad_norm") == 0);
  CHECK(close_states(clipped.state, plain.state, 0));
}

TEST_CASE("trainer: clipping with accumulation clips the step's whole gradient, as batches of 6 would", "[train]") {
  // A max norm that binds at every step (a third of the smallest unclipped norm): 3 micro-batches of 2
  // must clip the mean over the step's samples exactly as a batch of 6 does, not each micro-batch's
  // share nor with the threshold scaled by the micro-batches.
  const Run unclipped = train(/*batch_size=*/6, /*accumulation=*/1, /*samples_per_rank=*/14);
  const double clip = *std::min_element(unclipped.recorder->norms.begin(), unclipped.recorder->norms.end()) / 3;
  const Run accumulated = train(2, 3, 14, clip);
  const Run whole = train(6, 1, 14, clip);
  for (double norm : whole.recorder->norms) CHECK(norm > clip * 1.5);
  CHECK(accumulated.recorder->norms.size() == whole.recorder->norms.size());
  for (std::size_t i = 0; i < whole.recorder->norms.size(); ++i) {
    INFO("step " << i);
    CHECK(accumulated.recorder->norms[i] == Approx(whole.recorder->norms[i]).epsilon(1e-5));
  }
  CHECK(accumulated.metrics.at("grad_norm") == Approx(whole.metrics.at("grad_norm")).epsilon(1e-5));
  // How far training moved the weights: clipping shrank it, and both runs alike.
  torch::manual_seed(17);  // train()'s initial model
  const std::vector<at::Tensor> initial = lockstep::testing::state_of(*SmallConvNet(/*batch_norm=*/false));
  auto moved = [&initial](const std::vector<at::Tensor>& state) {
    double squared = 0;
    for (std::size_t i = 0; i < state.size(); ++i) squared += (state[i] - initial[i]).pow(2).sum().item<double>();
    return std::sqrt(squared);
  };
  CHECK(moved(whole.state) < moved(unclipped.state) * 0.8);
  CHECK(moved(accumulated.state) == Approx(moved(whole.state)).epsilon(1e-4));
  CHECK(close_states(accumulated.state, whole.state, 1e-5));
}

TEST_CASE("trainer: accumulation_steps and clip_grad_norm are validated", "[train]") {
  SmallConvNet model(false);
  auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
  TrainerOptions o = lockstep::testing::quiet_trainer(1, 0);
  o.accumulation_steps = 0;
  CHECK_THROWS_WITH(DistributedTrainer(model, opt, comm_ptr(), o), Contains("accumulation_steps must be >= 1, got 0"));
  o.accumulation_steps = 1;
  o.clip_grad_norm = -1;
  CHECK_THROWS_WITH(DistributedTrainer(model, opt, comm_ptr(), o), Contains("clip_grad_norm must be >= 0"));
}
