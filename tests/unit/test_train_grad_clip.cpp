// train::clip_grad_norm against LibTorch's torch::nn::utils::clip_grad_norm_: the same scaled
// gradients and the same total norm, for several norm types, whether it clips or not; the norm comes
// back as a tensor (never read on the host); bad arguments are refused.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "lockstep/train/grad_clip.hpp"

using Catch::Matchers::Contains;
using lockstep::train::clip_grad_norm;

namespace {

// Parameters of several shapes with random gradients (seeded), and one without a gradient.
std::vector<at::Tensor> parameters_with_grads(int seed) {
  torch::manual_seed(seed);
  std::vector<at::Tensor> params;
  for (const auto& shape : std::vector<std::vector<int64_t>>{{7}, {3, 5}, {2, 3, 4}, {1}, {16, 2}}) {
    at::Tensor p = torch::randn(shape, torch::requires_grad());
    p.mutable_grad() = torch::randn(shape) * 3;
    params.push_back(p);
  }
  params.push_back(torch::zeros({4}, torch::requires_grad()));  // no gradient: skipped
  return params;
}

std::vector<at::Tensor> copies(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& p : params) {
    at::Tensor q = p.detach().clone().requires_grad_(true);
    if (p.grad().defined()) q.mutable_grad() = p.grad().clone();
    out.push_back(q);
  }
  return out;
}

}  // namespace

TEST_CASE("clip_grad_norm scales as LibTorch's clip_grad_norm_ and returns the norm as a tensor", "[train][clip]") {
  const double inf = std::numeric_limits<double>::infinity();
  for (const double norm_type : {2.0, 1.0, 3.5, inf}) {
    for (const double max_norm : {0.5, 1e6}) {  // clips / does not clip
      INFO("norm_type " << norm_type << ", max_norm " << max_norm);
      const std::vector<at::Tensor> ours = parameters_with_grads(5);
      const std::vector<at::Tensor> theirs = copies(ours);
      const std::vector<at::Tensor> original = copies(ours);
      const at::Tensor total = clip_grad_norm(ours, max_norm, norm_type);
      const double expected = torch::nn::utils::clip_grad_norm_(theirs, max_norm, norm_type);
      CHECK(total.dim() == 0);
      CHECK(total.scalar_type() == at::kFloat);
      CHECK(total.item<double>() == Approx(expected).epsilon(1e-6));
      CHECK(expected > 1.0);  // the gradients are large enough for max_norm 0.5 to clip
      for (std::size_t i = 0; i < ours.size(); ++i) {
        INFO("parameter " << i);
        REQUIRE(ours[i].grad().defined() == theirs[i].grad().defined());
        if (!ours[i].grad().defined()) continue;
        CHECK(torch::allclose(ours[i].grad(), theirs[i].grad(), 1e-6, 1e-7));
        if (max_norm > expected) CHECK(torch::equal(ours[i].grad(), original[i].grad()));  // factor exactly 1
      }
      if (max_norm < expected) {
        // Clipped to max_norm (up to the 1e-6 in the denominator).
        std::vector<at::Tensor> grads;
        for (const at::Tensor& p : ours) {
          if (p.grad().defined()) grads.push_back(p.grad().flatten());
        }
        CHECK(at::linalg_vector_norm(at::cat(grads), norm_type).item<double>() == Approx(max_norm).epsilon(1e-5));
      }
    }
  }
}

TEST_CASE("clip_grad_norm: mixed dtypes, no gradients, non-finite gradients", "[train][clip]") {
  SECTION("float32 and float64 gradients make one norm, in float32") {
    at::Tensor a = torch::zeros({2}, torch::requires_grad());
    at::Tensor b = torch::zeros({1}, torch::dtype(torch::kDouble).requires_grad(true));
    a.mutable_grad() = torch::tensor({3.0f, 0.0f});
    b.mutable_grad() = torch::tensor({4.0}, torch::kDouble);
    const at::Tensor total = clip_grad_norm({a, b}, 1.0);
    CHECK(total.scalar_type() == at::kFloat);
    CHECK(total.item<double>() == Approx(5.0));
    CHECK(a.grad()[0].item<double>() == Approx(0.6).epsilon(1e-5));
    CHECK(b.grad().scalar_type() == at::kDouble);
    CHECK(b.grad()[0].item<double>() == Approx(0.8).epsilon(1e-5));
  }
  SECTION("no parameter has a gradient: 0, nothing touched") {
    at::Tensor a = torch::zeros({2}, torch::requires_grad());
    CHECK(clip_grad_norm({a}, 1.0).item<double>() == 0.0);
    CHECK(clip_grad_norm({}, 1.0).item<double>() == 0.0);
    CHECK_FALSE(a.grad().defined());
  }
  SECTION("an inf or nan gradient gives a non-finite norm") {
    for (const float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
      at::Tensor a = torch::zeros({3}, torch::requires_grad());
      a.mutable_grad() = torch::tensor({1.0f, bad, 2.0f});
      CHECK_FALSE(std::isfinite(clip_grad_norm({a}, 1.0).item<double>()));
    }
  }
}

TEST_CASE("clip_grad_norm counts and scales a tensor listed twice (a tied weight) once", "[train][clip]") {
  at::Tensor tied = torch::zeros({2}, torch::requires_grad());
  tied.mutable_grad() = torch::tensor({3.0f, 4.0f});
  const at::Tensor norm = clip_grad_norm({tied, tied}, 1.0);  // Module::parameters() of a tied model
  CHECK(norm.item<float>() == Approx(5.0));  // not 5 sqrt(2)
  CHECK(torch::allclose(tied.grad(), torch::tensor({0.6f, 0.8f}), 1e-5, 1e-6));  // scaled once, not twice
}

TEST_CASE("clip_grad_norm refuses bad arguments with the argument's name", "[train][clip]") {
  const std::vector<at::Tensor> params = parameters_with_grads(1);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (const double max_norm : {0.0, -1.0, inf, nan}) {
    INFO("max_norm " << max_norm);
    CHECK_THROWS_WITH(clip_grad_norm(params, max_norm), Contains("max_norm must be positive and finite"));
  }
  for (const double norm_type : {0.0, -2.0, nan}) {
    INFO("norm_type " << norm_type);
    CHECK_THROWS_WITH(clip_grad_norm(params, 1.0, norm_type), Contains("norm_type must be positive"));
  }
  at::Tensor sparse = torch::zeros({3}, torch::requires_grad());
  sparse.mutable_grad() = torch::zeros({3}).to_sparse();
  CHECK_THROWS_WITH(clip_grad_norm({sparse}, 1.0), Contains("sparse gradients"));
}
