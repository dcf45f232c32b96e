// Mixed precision at 2 and 3 ranks on the CPU: bf16 autocast trains, and the fp16 loss scaler decides
// to skip a step identically on every rank (Note [Identical skip decision]).
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cmath>

#include "core/torch_compat.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/data/synthetic_dataset.hpp"
#include "lockstep/train/grad_scaler.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using Catch::Matchers::Contains;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::SmallConvNet;
using lockstep::train::DistributedTrainer;
using lockstep::train::GradScaler;
using lockstep::train::TrainerOptions;

std::shared_ptr<lockstep::data::SyntheticDataset> images(int64_t size) {
  return lockstep::testing::synthetic_images(size, 8, 5);
}

TrainerOptions options(const std::string& precision, int64_t epochs) {
  TrainerOptions o = lockstep::testing::quiet_trainer(epochs, /*seed=*/0);
  o.batch_size = 8;
  o.eval_batch_size = 16;
  o.precision = precision;
  return o;
}

}  // namespace

TEST_CASE("bf16 autocast trains on the CPU: the loss falls and the ranks stay identical", "[precision]") {
  torch::manual_seed(11);
  SmallConvNet model;
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  DistributedTrainer trainer(model, optimizer, comm_ptr(), options("bf16", 4));
  auto first = trainer.evaluate(images(64));
  // The forward really runs in bfloat16 under the trainer's autocast.
  bool saw_bf16 = false;
  struct Probe : lockstep::train::Callback {
    bool* seen;
    explicit Probe(bool* s) : seen(s) {}
    void on_after_backward(lockstep::train::TrainerContext& ctx) override {
      *seen = *seen || ctx.output.scalar_type() == torch::kBFloat16;
      CHECK(ctx.loss.scalar_type() == torch::kFloat);  // cross entropy runs in float32
    }
  };
  trainer.add_callback(std::make_shared<Probe>(&saw_bf16));
  auto metrics = trainer.fit(images(64 * comm().size()), images(64));
  CHECK(saw_bf16);
  CHECK(metrics["test_loss"] < first["test_loss"] * 0.8);
  CHECK(lockstep::testing::identical_across_ranks(*model));
  // Parameters stay float32: autocast casts on the fly.
  for (const auto& p : model->parameters()) CHECK(p.scalar_type() == torch::kFloat);
}

TEST_CASE("fp16 on the CPU is refused up front by a LibTorch without float16 CPU kernels, and trains with one",
          "[precision]") {
  SmallConvNet model;
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05));
  if (!lockstep::compat::kCpuAutocastHalf) {
    CHECK_THROWS_WITH(DistributedTrainer(model, optimizer, comm_ptr(), options("fp16", 1)),
                      Contains("fp16 on the CPU needs LibTorch >= 2.4") && Contains("bf16"));
    return;
  }
  DistributedTrainer trainer(model, optimizer, comm_ptr(), options("fp16", 1));
  const auto metrics = trainer.fit(images(64), images(32));
  CHECK(std::isfinite(metrics.at("train_loss")));
  CHECK(lockstep::testing::identical_across_ranks(*model));
}

TEST_CASE("the loss scaler skips a step on every rank when one rank's gradient overflows", "[precision]") {
  const int rank = comm().rank();
  const int last = comm().size() - 1;
  lockstep::train::GradScalerOptions o;
  o.init_scale = 1024.0;
  o.growth_interval = 2;
  GradScaler scaler(o);
  auto w = torch::ones({5}, torch::requires_grad());
  auto scaled_backward = [&](double value) {
    w.mutable_grad() = at::Tensor();
    scaler.scale((w * value).sum()).backward();
  };

  // A good step: gradients come back unscaled, nobody skips.
  scaled_backward(3.0);
  CHECK_FALSE(scaler.unscale({w}, comm()));
  CHECK(torch::allclose(w.grad(), torch::full({5}, 3.0)));
  scaler.update(false);
  CHECK(scaler.scale_value() == 1024.0);
  CHECK(scaler.growth_tracker() == 1);

  // Only the last rank's gradient holds inf: every rank must skip and halve the scale.
  scaled_backward(1.0);
  if (rank == last) w.mutable_grad()[2] = std::numeric_limits<float>::infinity();
  const bool skip = scaler.unscale({w}, comm());
  CHECK(skip);
  scaler.update(skip);
  CHECK(scaler.scale_value() == 512.0);
  CHECK(scaler.growth_tracker() == 0);
  CHECK(scaler.skipped_steps() == 1);

  // nan counts too.
  scaled_backward(1.0);
  if (rank == 0) w.mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
  CHECK(scaler.unscale({w}, comm()));
  scaler.update(true);
  CHECK(scaler.scale_value() == 256.0);

  // growth_interval (2) good steps in a row double it.
  for (int i = 0; i < 2; ++i) {
    scaled_backward(1.0);
    const bool overflow = scaler.unscale({w}, comm());
    CHECK_FALSE(overflow);
    scaler.update(overflow);
  }
  CHECK(scaler.scale_value() == 512.0);
  CHECK(scaler.growth_tracker() == 0);
}
