// train::ForeachSGD, ForeachAdam, ForeachAdamW: bitwise LibTorch's SGD, Adam and AdamW on the CPU (where
// the foreach kernels loop over the tensors with the same per-element arithmetic) for every option,
// with parameters that have no gradient or skip steps, several groups, and state that moves between
// the two through the base class's serialisation.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <memory>
#include <sstream>
#include <vector>

#include "lockstep/core/error.hpp"
#include "lockstep/train/foreach_optim.hpp"

using Catch::Matchers::Contains;

namespace {

// Parameters of several shapes; the third never gets a gradient.
std::vector<torch::Tensor> make_params(int64_t seed) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> params;
  for (std::vector<int64_t> shape : {std::vector<int64_t>{7, 3}, {5}, {4, 4}, {2, 3, 3}, {1}}) {
    params.push_back(torch::randn(shape, torch::kFloat).requires_grad_(true));
  }
  return params;
}

// Gives every parameter but the third a gradient drawn for `step` (the same for both optimizers).
void set_grads(std::vector<torch::Tensor>& params, int step) {
  torch::manual_seed(1000 + step);
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (i == 2) continue;
    params[i].mutable_grad() = torch::randn_like(params[i]);
  }
}

bool bitwise_equal(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i], b[i])) return false;
  }
  return true;
}

// Saves `from`'s state as a checkpoint would and loads it into `into`.
void copy_state(const torch::optim::Optimizer& from, torch::optim::Optimizer& into) {
  std::stringstream buffer;
  torch::serialize::OutputArchive out;
  from.save(out);
  out.save_to(buffer);
  torch::serialize::InputArchive in;
  in.load_from(buffer);
  into.load(in);
}

std::vector<torch::Tensor> detached(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> out;
  for (const auto& p : params) out.push_back(p.detach().clone());
  return out;
}

}  // namespace

TEST_CASE("ForeachSGD steps bitwise like torch::optim::SGD for every option", "[train][optim]") {
  struct Case {
    double momentum, dampening, weight_decay;
    bool nesterov;
  };
  const Case cases[] = {{0.0, 0.0, 0.0, false}, {0.0, 0.0, 1e-2, false}, {0.9, 0.0, 0.0, false},
                        {0.9, 0.1, 5e-4, false}, {0.9, 0.0, 1e-4, true}};
  for (const Case& c : cases) {
    CAPTURE(c.momentum, c.dampening, c.weight_decay, c.nesterov);
    auto options = torch::optim::SGDOptions(0.05).momentum(c.momentum).dampening(c.dampening)
                       .weight_decay(c.weight_decay).nesterov(c.nesterov);
    auto ours = make_params(1), theirs = make_params(1);
    const auto untouched = ours[2].detach().clone();
    lockstep::train::ForeachSGD foreach_sgd(ours, options);
    torch::optim::SGD sgd(theirs, options);
    for (int step = 0; step < 4; ++step) {
      set_grads(ours, step);
      set_grads(theirs, step);
      foreach_sgd.step();
      sgd.step();
      REQUIRE(bitwise_equal(detached(ours), detached(theirs)));
    }
    CHECK(torch::equal(ours[2].detach(), untouched));  // no gradient, no step (weight decay neither)
    CHECK(!torch::equal(ours[0].detach(), make_params(1)[0].detach()));  // and the others moved
  }
}

TEST_CASE("ForeachSGD: groups keep their own options, and state round-trips through SGD's serialisation",
          "[train][optim]") {
  auto ours = make_params(2), theirs = make_params(2);
  auto groups = [](std::vector<torch::Tensor>& p) {
    std::vector<torch::optim::OptimizerParamGroup> g;
    g.emplace_back(std::vector<torch::Tensor>{p[0], p[1], p[2]});
    g.emplace_back(std::vector<torch::Tensor>{p[3], p[4]},
                   std::make_unique<torch::optim::SGDOptions>(torch::optim::SGDOptions(0.2).momentum(0.5).nesterov(true)));
    return g;
  };
  const auto defaults = torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(1e-3);
  lockstep::train::ForeachSGD foreach_sgd(groups(ours), defaults);
  torch::optim::SGD sgd(groups(theirs), defaults);
  for (int step = 0; step < 3; ++step) {
    set_grads(ours, step);
    set_grads(theirs, step);
    foreach_sgd.step();
    sgd.step();
  }
  REQUIRE(bitwise_equal(detached(ours), detached(theirs)));

  // ForeachSGD's momentum buffers are SGD's: saved by one, loaded by the other, the runs stay bitwise equal.
  auto resumed_params = detached(ours);
  for (auto& p : resumed_params) p.requires_grad_(true);
  torch::optim::SGD resumed(groups(resumed_params), defaults);
  copy_state(foreach_sgd, resumed);
  for (int step = 3; step < 6; ++step) {
    set_grads(ours, step);
    set_grads(resumed_params, step);
    foreach_sgd.step();
    resumed.step();
  }
  CHECK(bitwise_equal(detached(ours), detached(resumed_params)));
}

TEST_CASE("ForeachSGD: a closure's loss is returned, and sparse gradients are refused by name", "[train][optim]") {
  auto w = torch::ones({3}, torch::kFloat).requires_grad_(true);
  lockstep::train::ForeachSGD sgd({w}, torch::optim::SGDOptions(0.5));
  const torch::Tensor loss = sgd.step([&] {
    sgd.zero_grad();
    auto l = (w * w).sum();
    l.backward();
    return l;
  });
  CHECK(loss.item<float>() == Approx(3.0));
  CHECK(torch::allclose(w.detach(), torch::zeros({3})));  // w - 0.5 * 2w

  auto e = torch::zeros({4, 2}, torch::kFloat).requires_grad_(true);
  lockstep::train::ForeachSGD sparse({e}, torch::optim::SGDOptions(0.1));
  e.mutable_grad() = torch::eye(4, 2).to_sparse();
  CHECK_THROWS_WITH(sparse.step(), Contains("ForeachSGD") && Contains("sparse"));
}

namespace {

// Gradients for `step`; parameter 1 gets one only on even steps, so Adam's per-parameter step counts
// diverge (the foreach update runs once per distinct count).
void set_sparse_in_time_grads(std::vector<torch::Tensor>& params, int step) {
  set_grads(params, step);
  if (step % 2 == 1) params[1].mutable_grad() = torch::Tensor();
}

template <class Ours, class Theirs, class Options>
void check_adam_like(const Options& options, int steps) {
  auto ours = make_params(3), theirs = make_params(3);
  Ours foreach_opt(ours, options);
  Theirs reference(theirs, options);
  for (int step = 0; step < steps; ++step) {
    set_sparse_in_time_grads(ours, step);
    set_sparse_in_time_grads(theirs, step);
    foreach_opt.step();
    reference.step();
    REQUIRE(bitwise_equal(detached(ours), detached(theirs)));
  }
  CHECK(!torch::equal(ours[0].detach(), make_params(3)[0].detach()));

  // Its state is the reference's: saved by one, loaded by the other, the runs stay bitwise equal.
  auto resumed_params = detached(ours);
  for (auto& p : resumed_params) p.requires_grad_(true);
  Theirs resumed(resumed_params, options);
  copy_state(foreach_opt, resumed);
  for (int step = steps; step < steps + 3; ++step) {
    set_sparse_in_time_grads(ours, step);
    set_sparse_in_time_grads(resumed_params, step);
    foreach_opt.step();
    resumed.step();
  }
  CHECK(bitwise_equal(detached(ours), detached(resumed_params)));
}

}  // namespace

TEST_CASE("ForeachAdam steps bitwise like torch::optim::Adam, with and without weight decay and amsgrad",
          "[train][optim]") {
  for (const bool amsgrad : {false, true}) {
    for (const double weight_decay : {0.0, 1e-2}) {
      CAPTURE(amsgrad, weight_decay);
      const auto options = torch::optim::AdamOptions(1e-2).betas({0.8, 0.99}).eps(1e-6)
                               .weight_decay(weight_decay).amsgrad(amsgrad);
      check_adam_like<lockstep::train::ForeachAdam, torch::optim::Adam>(options, 5);
    }
  }
}

TEST_CASE("ForeachAdamW steps bitwise like torch::optim::AdamW (decoupled weight decay)", "[train][optim]") {
  for (const bool amsgrad : {false, true}) {
    for (const double weight_decay : {0.0, 0.1}) {
      CAPTURE(amsgrad, weight_decay);
      const auto options = torch::optim::AdamWOptions(1e-2).weight_decay(weight_decay).amsgrad(amsgrad);
      check_adam_like<lockstep::train::ForeachAdamW, torch::optim::AdamW>(options, 5);
    }
  }
}
