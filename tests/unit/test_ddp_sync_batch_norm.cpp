// SyncBatchNorm without a communicator (or at world size 1) is torch::nn::BatchNorm2d, bitwise: the
// same outputs, gradients, running statistics and state names, for every option combination. The
// synchronised path is tested against a single process in tests/dist/test_sync_batch_norm.cpp.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <sstream>

#include "lockstep/core/error.hpp"
#include "lockstep/ddp/sync_batch_norm.hpp"
#include "lockstep/models/resnet.hpp"

using Catch::Matchers::Contains;
using lockstep::ddp::SyncBatchNorm;

namespace {

bool bitwise(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.defined() || !b.defined()) return a.defined() == b.defined();
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && torch::equal(a, b);
}

}  // namespace

TEST_CASE("SyncBatchNorm unattached is BatchNorm2d bitwise: outputs, gradients, buffers", "[syncbn]") {
  struct Case {
    c10::optional<double> momentum;
    bool affine;
    bool track;
  };
  for (const Case c : {Case{0.1, true, true}, Case{c10::nullopt, true, true}, Case{0.3, false, true},
                       Case{0.1, true, false}}) {
    INFO("momentum " << c.momentum.value_or(-1) << ", affine " << c.affine << ", track " << c.track);
    const auto options = torch::nn::BatchNormOptions(5).momentum(c.momentum).affine(c.affine).track_running_stats(c.track);
    torch::nn::BatchNorm2d reference(options);
    SyncBatchNorm sync(options);
    CHECK_FALSE(sync->synchronised());
    if (c.affine) {
      torch::NoGradGuard no_grad;
      reference->weight.uniform_(0.5, 1.5);
      reference->bias.uniform_(-1, 1);
      sync->weight.copy_(reference->weight);
      sync->bias.copy_(reference->bias);
    }
    torch::manual_seed(3);
    for (int step = 0; step < 3; ++step) {
      const torch::Tensor x = torch::randn({4, 5, 3, 2}) * 2 + 1;
      const torch::Tensor g = torch::randn({4, 5, 3, 2});
      const torch::Tensor xa = x.clone().requires_grad_(true);
      const torch::Tensor xb = x.clone().requires_grad_(true);
      const torch::Tensor ya = reference->forward(xa);
      const torch::Tensor yb = sync->forward(xb);
      CHECK(bitwise(ya, yb));
      (ya * g).sum().backward();
      (yb * g).sum().backward();
      CHECK(bitwise(xa.grad(), xb.grad()));
      if (c.affine) {
        CHECK(bitwise(reference->weight.grad(), sync->weight.grad()));
        CHECK(bitwise(reference->bias.grad(), sync->bias.grad()));
      }
      CHECK(bitwise(reference->running_mean, sync->running_mean));
      CHECK(bitwise(reference->running_var, sync->running_var));
      CHECK(bitwise(reference->num_batches_tracked, sync->num_batches_tracked));
    }
    reference->eval();
    sync->eval();
    const torch::Tensor x = torch::randn({2, 5, 4, 4});
    CHECK(bitwise(reference->forward(x), sync->forward(x)));
  }
}

TEST_CASE("SyncBatchNorm: BatchNorm2d's state names, so checkpoints interchange", "[syncbn]") {
  torch::nn::BatchNorm2d reference(3);
  SyncBatchNorm sync(3);
  std::vector<std::string> a;
  std::vector<std::string> b;
  for (const auto& item : reference->named_parameters()) a.push_back(item.key());
  for (const auto& item : reference->named_buffers()) a.push_back(item.key());
  for (const auto& item : sync->named_parameters()) b.push_back(item.key());
  for (const auto& item : sync->named_buffers()) b.push_back(item.key());
  CHECK(a == b);
}

TEST_CASE("SyncBatchNorm: input shape checked, clone detached, printed with its options", "[syncbn]") {
  SyncBatchNorm sync(torch::nn::BatchNormOptions(4).momentum(0.2));
  CHECK_THROWS_WITH(sync->forward(torch::randn({4})), Contains("expected input [N, 4, *]") && Contains("[4]"));
  CHECK_THROWS_WITH(sync->forward(torch::randn({2, 3, 5})), Contains("expected input [N, 4, *]") && Contains("[2, 3, 5]"));
  CHECK(sync->forward(torch::randn({6, 4})).sizes() == torch::IntArrayRef({6, 4}));  // [N, C] works too
  auto copy = std::dynamic_pointer_cast<lockstep::ddp::SyncBatchNormImpl>(sync->clone());
  REQUIRE(copy != nullptr);
  CHECK(torch::equal(copy->running_mean, sync->running_mean));
  CHECK(copy->running_mean.data_ptr() != sync->running_mean.data_ptr());
  CHECK_FALSE(copy->synchronised());
  std::ostringstream printed;
  printed << *sync;
  CHECK_THAT(printed.str(), Contains("SyncBatchNorm(4, eps=1e-05, momentum=0.2") && Contains("synchronised=false"));
}

TEST_CASE("SyncBatchNorm: ResNet18 builds every batch norm as one, BatchNorm2d's initialisation", "[syncbn]") {
  lockstep::models::ResNet18Options o;
  o.width = 4;
  o.zero_init_residual = true;
  lockstep::models::ResNet18 model(o);
  int layers = 0;
  for (const auto& item : model->named_modules()) {
    if (item.value()->as<torch::nn::BatchNorm2d>() != nullptr) FAIL("plain BatchNorm2d at " << item.key());
    if (auto* bn = item.value()->as<SyncBatchNorm>()) {
      ++layers;
      CHECK(torch::equal(bn->bias, torch::zeros_like(bn->bias)));
      const bool last_of_block = item.key().size() > 4 && item.key().substr(item.key().size() - 4) == ".bn2";
      CHECK(torch::equal(bn->weight, last_of_block ? torch::zeros_like(bn->weight) : torch::ones_like(bn->weight)));
    }
  }
  CHECK(layers == 20);  // stem + 8 blocks x 2 + 3 downsample shortcuts
}
