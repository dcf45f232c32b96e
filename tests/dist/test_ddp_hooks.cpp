// Communication hooks: the 16-bit compression hooks stay within their rounding of the exact
// average, and a user's own hook is called once per bucket, in bucket order.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "lockstep/ddp/data_parallel.hpp"
#include "support/dist.hpp"

namespace {

using lockstep::ddp::DataParallel;
using lockstep::ddp::DataParallelOptions;
using lockstep::testing::comm;
using lockstep::testing::identical_across_ranks;
using lockstep::testing::comm_ptr;

torch::nn::Sequential make_model() {
  torch::manual_seed(21);
  return torch::nn::Sequential(torch::nn::Linear(10, 64), torch::nn::Tanh(), torch::nn::Linear(64, 33),
                               torch::nn::Tanh(), torch::nn::Linear(33, 4));
}

// Rank r's input for step `step`; every rank can compute every rank's.
std::pair<torch::Tensor, torch::Tensor> rank_batch(int r, int step) {
  torch::manual_seed(400 + 17 * step + r);
  return {torch::randn({5, 10}) * (1 + r), torch::randn({5, 4})};
}

// Each rank's local gradients of `model` at its current values, computed here without communication.
std::vector<std::vector<torch::Tensor>> local_gradients(torch::nn::Sequential& reference, int step) {
  std::vector<std::vector<torch::Tensor>> grads;
  for (int r = 0; r < comm().size(); ++r) {
    reference->zero_grad();
    auto [x, y] = rank_batch(r, step);
    torch::mse_loss(reference->forward(x), y).backward();
    std::vector<torch::Tensor> g;
    for (const auto& p : reference->parameters()) g.push_back(p.grad().clone());
    grads.push_back(g);
  }
  return grads;
}

}  // namespace

TEST_CASE("fp16 and bf16 compression stay within 16-bit rounding of the exact average", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  struct Case {
    const char* name;
    lockstep::ddp::CommHook hook;
    double unit_roundoff;  // half an ulp, relative
    double underflow;      // absolute error a flushed or subnormal value may add
  };
  const std::vector<Case> cases = {
      {"fp16", lockstep::ddp::fp16_compress_hook(), std::ldexp(1.0, -11), std::ldexp(1.0, -24)},
      {"bf16", lockstep::ddp::bf16_compress_hook(), std::ldexp(1.0, -8), 1e-38},
  };
  for (const auto& c : cases) {
    INFO(c.name << " on " << n << " ranks");
    auto reference = make_model();
    auto model = make_model();
    DataParallelOptions options;
    options.bucket_cap_mb = 0.004;  // a few buckets
    options.first_bucket_cap_mb = 0.001;
    options.comm_hook = c.hook;
    DataParallel dp(model, comm_ptr(), options);
    const auto local = local_gradients(reference, 0);
    auto [x, y] = rank_batch(rank, 0);
    torch::mse_loss(model->forward(x), y).backward();

    // Each rank's share g_r / n is rounded once, and each of the n - 1 partial sums once more, so
    // |error| <= u * (sum_r |g_r| / n) * n = u * sum_r |g_r|, plus underflow per rounding.
    bool rounded_somewhere = false;
    auto params = model->parameters();
    for (std::size_t i = 0; i < params.size(); ++i) {
      torch::Tensor exact = torch::zeros_like(local[0][i], torch::kFloat64);
      torch::Tensor magnitude = torch::zeros_like(exact);
      for (int r = 0; r < n; ++r) {
        exact += local[r][i].to(torch::kFloat64) / n;
        magnitude += local[r][i].to(torch::kFloat64).abs();
      }
      torch::Tensor error = (params[i].grad().to(torch::kFloat64) - exact).abs();
      torch::Tensor bound = 1.01 * c.unit_roundoff * magnitude + 2 * n * c.underflow + 1e-6 * exact.abs();
      CHECK((error <= bound).all().item<bool>());
      rounded_somewhere = rounded_somewhere || (error > 1e-6 * exact.abs() + 1e-12).any().item<bool>();
    }
    CHECK(rounded_somewhere);  // it did compress

    // Training with it keeps the ranks in lockstep.
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    for (int step = 1; step < 4; ++step) {
      opt.zero_grad();
      auto [xs, ys] = rank_batch(rank, step);
      torch::mse_loss(model->forward(xs), ys).backward();
      opt.step();
    }
    CHECK(identical_across_ranks(*model));
  }
}

TEST_CASE("A user's communication hook runs once per bucket, in bucket order", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  auto reference = make_model();
  auto model = make_model();
  std::vector<std::size_t> seen;
  std::vector<std::uint64_t> iterations;
  DataParallelOptions options;
  options.bucket_cap_mb = 0;
  options.first_bucket_cap_mb = 0;
  // Sum, then divide once the sum is in: a different but equivalent averaging.
  options.comm_hook = [&](lockstep::comm::Communicator& c, const lockstep::ddp::GradBucket& bucket) {
    seen.push_back(bucket.index);
    iterations.push_back(bucket.iteration);
    CHECK(bucket.parameter_names.size() == 1);
    CHECK(bucket.offsets.size() == bucket.numels.size());
    CHECK(bucket.sizes.size() == 1);  // the parameter's shape: a Linear weight or bias
    if (bucket.sizes.size() == 1) {
      CHECK(c10::multiply_integers(bucket.sizes[0]) == bucket.numels[0]);
      CHECK(bucket.sizes[0].size() == (bucket.parameter_names[0].find("weight") != std::string::npos ? 2u : 1u));
    }
    at::Tensor buffer = bucket.buffer;
    return lockstep::comm::then(c.allreduce(buffer), [buffer, size = c.size()] { buffer.div_(size); });
  };
  DataParallel dp(model, comm_ptr(), options);
  const std::size_t buckets = dp.reducer().bucket_assignment().size();
  for (int step = 0; step < 2; ++step) {
    const auto local = local_gradients(reference, 0);
    model->zero_grad();
    auto [x, y] = rank_batch(rank, 0);
    torch::mse_loss(model->forward(x), y).backward();
    auto params = model->parameters();
    for (std::size_t i = 0; i < params.size(); ++i) {
      torch::Tensor exact = torch::zeros_like(local[0][i]);
      for (int r = 0; r < n; ++r) exact += local[r][i] / n;
      CHECK(torch::allclose(params[i].grad(), exact, 1e-5, 1e-7));
    }
  }
  REQUIRE(seen.size() == 2 * buckets);
  for (std::size_t k = 0; k < seen.size(); ++k) {
    CHECK(seen[k] == k % buckets);
    CHECK(iterations[k] == k / buckets);
  }
}
