// GradScaler on its own (world of one): scaling, unscaling, backoff, growth, checkpointed state.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <limits>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/train/grad_scaler.hpp"
#include "support/solo_communicator.hpp"

using Catch::Matchers::Contains;
using namespace lockstep;

using lockstep::testing::SoloCommunicator;

TEST_CASE("GradScaler scales the loss and unscales the gradients", "[grad_scaler]") {
  train::GradScalerOptions o;
  o.init_scale = 8.0;
  train::GradScaler scaler(o);
  SoloCommunicator solo;
  auto w = torch::tensor({1.0f, 2.0f}, torch::requires_grad());
  scaler.scale((w * w).sum()).backward();
  CHECK(torch::allclose(w.grad(), torch::tensor({16.0f, 32.0f})));  // 8 x 2w
  CHECK_FALSE(scaler.unscale({w}, solo));
  CHECK(torch::allclose(w.grad(), torch::tensor({2.0f, 4.0f})));
  CHECK(solo.allreduces == 1);  // the flag is agreed on even in a world of one
  // A tensor listed twice (a tied weight in Module::parameters()) is unscaled once.
  w.mutable_grad().mul_(8.0);
  CHECK_FALSE(scaler.unscale({w, w}, solo));
  CHECK(torch::allclose(w.grad(), torch::tensor({2.0f, 4.0f})));
  // A parameter without a gradient is skipped, not an error.
  auto unused = torch::zeros({3}, torch::requires_grad());
  CHECK_FALSE(scaler.unscale({unused}, solo));
}

TEST_CASE("GradScaler backs off on overflow and grows after growth_interval good steps", "[grad_scaler]") {
  train::GradScalerOptions o;
  o.init_scale = 65536.0;
  o.growth_interval = 3;
  train::GradScaler scaler(o);
  SoloCommunicator solo;
  auto w = torch::zeros({4}, torch::requires_grad());
  w.mutable_grad() = torch::tensor({1.0f, std::numeric_limits<float>::infinity(), 0.0f, 0.0f});
  const bool skip = scaler.unscale({w}, solo);
  CHECK(skip);
  scaler.update(skip);
  CHECK(scaler.scale_value() == 32768.0);
  CHECK(scaler.skipped_steps() == 1);
  for (int i = 0; i < 2; ++i) scaler.update(false);
  CHECK(scaler.scale_value() == 32768.0);
  CHECK(scaler.growth_tracker() == 2);
  scaler.update(false);
  CHECK(scaler.scale_value() == 65536.0);
  CHECK(scaler.growth_tracker() == 0);
  // An overflow in the middle of a good run resets the count.
  scaler.update(false);
  scaler.update(true);
  CHECK(scaler.growth_tracker() == 0);
  CHECK(scaler.scale_value() == 32768.0);
}

TEST_CASE("GradScaler's state survives a checkpoint round trip", "[grad_scaler]") {
  train::GradScalerOptions o;
  o.init_scale = 3.0;
  o.growth_interval = 10;
  train::GradScaler a(o);
  a.update(true);
  a.update(false);
  a.update(false);
  train::GradScaler b;
  b.load_state(a.save_state());
  CHECK(b.scale_value() == a.scale_value());
  CHECK(b.growth_tracker() == 2);
  CHECK(b.skipped_steps() == 1);
  CHECK(a.state_key() == "grad_scaler");
  CHECK_THROWS_WITH(b.load_state("garbage"), Contains("cannot read the checkpointed state"));
  CHECK_THROWS_WITH(train::GradScaler(train::GradScalerOptions{0.0}), Contains("init_scale must be positive"));
}
