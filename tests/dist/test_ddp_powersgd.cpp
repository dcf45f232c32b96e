// PowerSGD across ranks. Every rank can compute every rank's gradients (seeded by rank and step), so
// each expected value is computed here, in float64, from those: the exact average, or the closed
// form of error feedback. The hook is called on buckets built by hand, except in the training test.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "lockstep/comm/agree.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "support/dist.hpp"
#include "support/grad_buckets.hpp"
#include "support/solo_communicator.hpp"

namespace {

using lockstep::testing::same_on_every_rank;

namespace ddp = lockstep::ddp;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::gradient_of;
using lockstep::testing::identical_across_ranks;
using lockstep::testing::make_bucket;

using Gradients = std::vector<torch::Tensor>;

ddp::PowerSGDOptions options_with(std::int64_t rank, std::uint64_t start_iteration = 0) {
  ddp::PowerSGDOptions o;
  o.matrix_approximation_rank = rank;
  o.start_iteration = start_iteration;
  return o;
}

// The average over ranks of make(r), in float64.
template <typename Make>
Gradients exact_average(Make make) {
  Gradients mean;
  const int n = comm().size();
  for (int r = 0; r < n; ++r) {
    const Gradients g = make(r);
    for (std::size_t k = 0; k < g.size(); ++k) {
      const torch::Tensor share = g[k].to(torch::kFloat64) / n;
      if (r == 0)
        mean.push_back(share);
      else
        mean[k] += share;
    }
  }
  return mean;
}

// The average over ranks of this rank's tensor (the tests' own all-reduce, in float64).
torch::Tensor average_over_ranks(const torch::Tensor& t) {
  torch::Tensor sum = t.to(torch::kFloat64).contiguous();
  comm().allreduce(sum)->wait();
  return sum / comm().size();
}

// Rank r's full-rank gradients at `step`: a conv-shaped matrix, a bias, and a matrix too small to compress.
Gradients random_gradients(int r, int step) {
  torch::manual_seed(1000 + 31 * step + r);
  return {torch::randn({16, 5, 2, 2}) * (1 + r), torch::randn({16}), torch::randn({3, 3})};
}
const std::vector<std::string> kNames = {"conv.weight", "conv.bias", "tiny.weight"};

}  // namespace

TEST_CASE("PowerSGD is exact when all ranks' matrices share one r-dimensional column space", "[ddp][powersgd]") {
  const int rank = comm().rank();
  for (std::int64_t r : {1, 2}) {
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      INFO("rank " << r << ", " << dtype << ", " << comm().size() << " ranks");
      // Common left factors; each rank its own right factors and bias. Integers and quarters, so that
      // bf16 holds them exactly and only the result is rounded.
      auto make = [&](int w) {
        torch::manual_seed(77);
        const torch::Tensor u1 = torch::randint(-4, 5, {24, r}, torch::kFloat),
                            u2 = torch::randint(-4, 5, {16, r}, torch::kFloat);
        torch::manual_seed(500 + w);
        const torch::Tensor b1 = torch::randint(-3, 4, {r, 12}, torch::kFloat) / 4.0,
                            b2 = torch::randint(-3, 4, {r, 40}, torch::kFloat) / 4.0;
        return Gradients{u1.mm(b1).view({24, 3, 2, 2}).to(dtype), u2.mm(b2).to(dtype),
                         (torch::randint(-8, 9, {24}, torch::kFloat) / 4.0).to(dtype)};
      };
      auto bucket = make_bucket(make(rank), {"a", "b", "bias"});
      ddp::powersgd_hook(options_with(r))(comm(), bucket)->wait();
      const Gradients exact = exact_average(make);
      const double u = dtype == torch::kFloat ? 1e-6 : std::ldexp(1.0, -8);
      for (std::size_t k = 0; k < exact.size(); ++k) {
        INFO("gradient " << k);
        const torch::Tensor error = (gradient_of(bucket, k).to(torch::kFloat64) - exact[k]).abs();
        CHECK((error <= 1.01 * u * exact[k].abs() + 2e-5 * exact[k].abs().max()).all().item<bool>());
      }
      CHECK(same_on_every_rank(bucket.buffer));
    }
  }
}

TEST_CASE("PowerSGD draws the same Q on every rank: the same gradient everywhere gives one rank's result",
          "[ddp][powersgd]") {
  // With every rank's matrix G and the same Q, the summed P is n G Q, which orthogonalises to one
  // rank's P: the result is what one rank alone computes. A Q that differed by rank would sum G (Q_0 +
  // Q_1 + ...) and project onto another direction, identically on every rank.
  torch::manual_seed(19);
  const torch::Tensor g = torch::randn({16, 5, 2, 2});  // the same on every rank: full rank, lossy at r = 1
  auto bucket = make_bucket({g.clone()}, {"conv.weight"});
  ddp::powersgd_hook(options_with(1))(comm(), bucket)->wait();
  auto alone = make_bucket({g.clone()}, {"conv.weight"});
  lockstep::testing::SoloCommunicator solo;
  ddp::powersgd_hook(options_with(1))(solo, alone)->wait();
  const torch::Tensor mine = gradient_of(bucket, 0), theirs = gradient_of(alone, 0);
  CHECK((mine - g).abs().max().item<double>() > 0.1);  // compressed, not passed through
  CHECK(torch::allclose(mine, theirs, 1e-4, 1e-5));
  CHECK(same_on_every_rank(bucket.buffer));
}

TEST_CASE("PowerSGD error feedback: applied gradients plus the mean residual sum to the true ones", "[ddp][powersgd]") {
  const int rank = comm().rank();
  auto state = std::make_shared<ddp::PowerSGDState>(options_with(1));
  auto hook = ddp::powersgd_hook(state);
  torch::Tensor applied = torch::zeros({16, 20}, torch::kFloat64), truth = torch::zeros_like(applied);
  for (int step = 0; step < 6; ++step) {
    INFO("step " << step);
    auto bucket = make_bucket(random_gradients(rank, step), kNames, step);
    hook(comm(), bucket)->wait();
    applied += gradient_of(bucket, 0).to(torch::kFloat64).view({16, 20});
    truth += exact_average([&](int w) { return random_gradients(w, step); })[0].view({16, 20});
    // Each rank's residual is e = M + e_before - applied; averaged over ranks, the sum telescopes.
    const torch::Tensor mean_error = average_over_ranks(state->error("conv.weight"));
    CHECK(torch::allclose(applied + mean_error, truth, 1e-5, 1e-4));
    CHECK(same_on_every_rank(bucket.buffer));
  }
  CHECK((applied - truth).abs().max().item<double>() > 0.5);  // rank 1 was lossy; the residual made up for it

  // With one gradient repeated, the mean of what was applied converges to it like 1/T: the residual
  // stays bounded (here about 10 |g|, as the contraction of a rank-1 projection of a 16 x 20 allows).
  state->reset();
  const torch::Tensor g = random_gradients(rank, 0)[0];
  const torch::Tensor target = exact_average([](int w) { return random_gradients(w, 0); })[0];
  torch::Tensor sum = torch::zeros_like(target);
  std::vector<double> relative_error;
  for (int step = 0; step < 200; ++step) {
    auto bucket = make_bucket({g}, {"conv.weight"}, step);
    hook(comm(), bucket)->wait();
    sum += gradient_of(bucket, 0).to(torch::kFloat64);
    relative_error.push_back(((sum / (step + 1) - target).norm() / target.norm()).item<double>());
  }
  INFO("relative error of the mean after 1, 20, 200 steps: " << relative_error[0] << ", " << relative_error[19]
                                                             << ", " << relative_error[199]);
  CHECK(relative_error[199] < 0.1);
  CHECK(relative_error[199] < relative_error[19] / 4);
}

TEST_CASE("PowerSGD averages exactly before start_iteration, and 1-D and small gradients always", "[ddp][powersgd]") {
  const int rank = comm().rank();
  auto state = std::make_shared<ddp::PowerSGDState>(options_with(1, 2));
  auto hook = ddp::powersgd_hook(state);
  for (int step = 0; step < 4; ++step) {
    INFO("step " << step);
    auto bucket = make_bucket(random_gradients(rank, step), kNames, step);
    auto reference = make_bucket(random_gradients(rank, step), kNames, step);
    hook(comm(), bucket)->wait();
    ddp::allreduce_hook()(comm(), reference)->wait();
    const Gradients exact = exact_average([&](int w) { return random_gradients(w, step); });
    for (std::size_t k = 0; k < exact.size(); ++k) {
      const torch::Tensor result = gradient_of(bucket, k).to(torch::kFloat64);
      // The bias and the 3 x 3 matrix are never compressed; the 16 x 20 matrix from step 2 on.
      if (k > 0 || step < 2) {
        CHECK(torch::allclose(result, exact[k], 1e-6, 1e-6));
        // Before start_iteration, the very same arithmetic as the default hook on the same buffer.
        if (step < 2) CHECK(torch::equal(gradient_of(bucket, k), gradient_of(reference, k)));
      } else {
        CHECK_FALSE(torch::allclose(result, exact[k], 1e-2, 1e-2));
      }
    }
    CHECK_FALSE(state->error("conv.bias").defined());
    CHECK_FALSE(state->error("tiny.weight").defined());
  }
  const ddp::PowerSGDStats s = state->stats();
  CHECK(s.plain_buckets == 2);
  CHECK(s.compressed_buckets == 2);
  CHECK(s.compressed_matrices == 2);
  CHECK(s.uncompressed_tensors == 4);
  // [bias, tiny | P (16 x 1)] and Q (20 x 1) against 16 x 20 + 16 + 9 floats.
  CHECK(s.compressed_bytes == 2 * 4 * (16 + 9 + 16 + 20));
  CHECK(s.compression_ratio() == Approx((16.0 * 20 + 16 + 9) / (16 + 9 + 16 + 20)));
}

TEST_CASE("DataParallel with PowerSGD trains a small model, identically on every rank", "[ddp][powersgd]") {
  const int n = comm().size();
  const int rank = comm().rank();
  torch::manual_seed(21);
  auto model = torch::nn::Sequential(torch::nn::Linear(10, 64), torch::nn::Tanh(), torch::nn::Linear(64, 33),
                                     torch::nn::Tanh(), torch::nn::Linear(33, 4));
  const torch::Tensor teacher = torch::randn({10, 4}) / 3;
  auto batch = [&](int r, int step) {
    torch::manual_seed(900 + 13 * step + r);
    torch::Tensor x = torch::randn({8, 10});
    return std::make_pair(x, torch::tanh(x.mm(teacher)));
  };
  auto global_loss = [&] {
    torch::NoGradGuard no_grad;
    double loss = 0;
    for (int r = 0; r < n; ++r) {
      for (int step = 0; step < 4; ++step) {
        auto [x, y] = batch(r, 1000 + step);
        loss += torch::mse_loss(model->forward(x), y).item<double>();
      }
    }
    return loss / (4 * n);
  };
  auto state = std::make_shared<ddp::PowerSGDState>(options_with(2, 5));
  ddp::DataParallelOptions options;
  options.bucket_cap_mb = 0.004;  // several buckets: several P and Q rounds per step, and a rebuild
  options.first_bucket_cap_mb = 0.001;
  options.comm_hook = ddp::powersgd_hook(state);
  ddp::DataParallel dp(model, comm_ptr(), options);
  CHECK(dp.reducer().bucket_assignment().size() > 1);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  const double before = global_loss();
  for (int step = 0; step < 60; ++step) {
    opt.zero_grad();
    auto [x, y] = batch(rank, step);
    torch::mse_loss(model->forward(x), y).backward();
    opt.step();
  }
  const double after = global_loss();
  INFO("loss " << before << " -> " << after << " on " << n << " ranks");
  CHECK(after < 0.3 * before);
  CHECK(identical_across_ranks(*model));
  const ddp::PowerSGDStats s = state->stats();
  CHECK(s.plain_buckets > 0);
  CHECK(s.compressed_matrices > 0);
  CHECK(s.compression_ratio() > 1.5);
}

TEST_CASE("gather_strings gives every rank's bytes to the root only, whatever their lengths", "[ddp][powersgd]") {
  // Rank r's string: 3 r bytes, a zero byte among them (binary state), and none at all for rank 0.
  auto text_of = [](int r) {
    std::string text(static_cast<std::size_t>(3 * r), static_cast<char>('a' + r));
    if (r > 0) text[1] = '\0';
    return text;
  };
  const int rank = comm().rank(), size = comm().size();
  for (int root : {0, size - 1}) {
    INFO("root " << root);
    const std::vector<std::string> got = lockstep::comm::gather_strings(comm(), text_of(rank), root);
    if (rank == root) {
      REQUIRE(static_cast<int>(got.size()) == size);
      for (int r = 0; r < size; ++r) CHECK(got[r] == text_of(r));
    } else {
      CHECK(got.empty());
    }
  }
}
