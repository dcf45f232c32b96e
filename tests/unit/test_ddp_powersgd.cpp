// PowerSGD's pieces on their own and its hook in a world of one rank: Gram-Schmidt against a QR
// decomposition, which gradients are compressed, option checks, exactness on low-rank matrices,
// error feedback, 16-bit buckets, and state that follows a parameter into another bucket.
#include <torch/torch.h>
// Catch after the LibTorch headers: glog (through c10) defines CHECK too, and Catch's must win.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "lockstep/core/error.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/train/callback.hpp"
#include "lockstep/train/grad_scaler.hpp"
#include "lockstep/train/powersgd_state_callback.hpp"
#include "support/grad_buckets.hpp"
#include "support/solo_communicator.hpp"

using Catch::Matchers::Contains;
namespace ddp = lockstep::ddp;
using lockstep::testing::gradient_of;
using lockstep::testing::make_bucket;
using lockstep::testing::SoloCommunicator;

namespace {

std::string error_of(const ddp::PowerSGDOptions& o) {
  try {
    ddp::validate(o);
  } catch (const lockstep::Error& e) {
    return e.message();
  }
  return "(no error)";
}

ddp::PowerSGDOptions starting_at_once(std::int64_t rank = 1) {
  ddp::PowerSGDOptions o;
  o.matrix_approximation_rank = rank;
  o.start_iteration = 0;
  return o;
}

}  // namespace

TEST_CASE("orthogonalize_columns gives a QR decomposition's Q", "[ddp][powersgd]") {
  torch::manual_seed(3);
  const torch::Tensor a = torch::randn({40, 4}, torch::kFloat64);
  torch::Tensor p = a.clone();
  ddp::orthogonalize_columns(p);
  // Gram-Schmidt is the QR decomposition whose R has a positive diagonal.
  auto [q, r] = at::linalg_qr(a);
  q = q * r.diagonal().sign();
  CHECK(torch::allclose(p, q, 1e-10, 1e-12));
  CHECK(torch::allclose(p.t().mm(p), torch::eye(4, torch::kFloat64), 1e-10, 1e-12));
}

TEST_CASE("orthogonalize_columns keeps zero columns zero and divides by norm + epsilon", "[ddp][powersgd]") {
  torch::Tensor p = torch::zeros({5, 3});
  p.select(1, 0).copy_(torch::tensor({3.0f, 4.0f, 0.0f, 0.0f, 0.0f}));
  p.select(1, 2).copy_(torch::tensor({3.0f, 4.0f, 2.0f, 0.0f, 0.0f}));  // column 0 plus 2 e_2
  ddp::orthogonalize_columns(p);
  CHECK(torch::isfinite(p).all().item<bool>());
  CHECK(torch::allclose(p.select(1, 0), torch::tensor({0.6f, 0.8f, 0.0f, 0.0f, 0.0f})));
  CHECK(torch::equal(p.select(1, 1), torch::zeros({5})));
  CHECK(torch::allclose(p.select(1, 2), torch::tensor({0.0f, 0.0f, 1.0f, 0.0f, 0.0f}), 1e-6, 1e-6));

  torch::Tensor zero = torch::zeros({4, 2});
  ddp::orthogonalize_columns(zero, 1e-8);
  CHECK(torch::equal(zero, torch::zeros({4, 2})));

  torch::Tensor one = torch::tensor({{3.0}, {4.0}}, torch::kFloat64);
  ddp::orthogonalize_columns(one, 1.0);
  CHECK(torch::allclose(one, torch::tensor({{0.5}, {4.0 / 6.0}}, torch::kFloat64)));

  CHECK_THROWS_WITH(ddp::orthogonalize_columns(torch::zeros({3})), Contains("expects a matrix"));
}

TEST_CASE("orthogonalize_columns on a matrix of rank below its column count keeps P P^T M = M", "[ddp][powersgd]") {
  // Rank 1 in float32: after column 0's part is removed, columns 1 and 2 are rounding noise. Before,
  // each was normalised into a unit vector far from orthogonal to column 0, and P P^T M missed M.
  torch::manual_seed(5);
  const torch::Tensor u = torch::randn({40, 1});
  const torch::Tensor m = u.mm(torch::randn({1, 3}));
  torch::Tensor p = m.clone();
  ddp::orthogonalize_columns(p);
  CHECK(torch::allclose(p.select(1, 0).abs(), (u / u.norm()).squeeze(1).abs(), 1e-5, 1e-6));
  CHECK(torch::equal(p.narrow(1, 1, 2), torch::zeros({40, 2})));
  CHECK(torch::allclose(p.mm(p.t().mm(m)), m, 1e-4, 1e-5));
  // Rank 2 of 3 columns in float64: the third column goes, the first two stay orthonormal.
  const torch::Tensor a = torch::randn({30, 2}, torch::kFloat64);
  torch::Tensor q = torch::cat({a, a.mm(torch::tensor({{2.0}, {-1.0}}, torch::kFloat64))}, 1);
  const torch::Tensor original = q.clone();
  ddp::orthogonalize_columns(q);
  CHECK(torch::equal(q.select(1, 2), torch::zeros({30}, torch::kFloat64)));
  CHECK(torch::allclose(q.narrow(1, 0, 2).t().mm(q.narrow(1, 0, 2)), torch::eye(2, torch::kFloat64), 1e-12, 1e-12));
  CHECK(torch::allclose(q.mm(q.t().mm(original)), original, 1e-10, 1e-10));
}

TEST_CASE("compressed_rank: 1-D, empty and small matrices go uncompressed", "[ddp][powersgd]") {
  ddp::PowerSGDOptions o;                               // rank 1, min_compression_rate 2
  CHECK(ddp::compressed_rank({64, 32, 3, 3}, o) == 1);  // n 64, m 288: 704 < 18432
  CHECK(ddp::compressed_rank({10}, o) == 0);
  CHECK(ddp::compressed_rank({}, o) == 0);
  CHECK(ddp::compressed_rank({0, 5}, o) == 0);
  CHECK(ddp::compressed_rank({3, 3}, o) == 0);     // 12 >= 9
  CHECK(ddp::compressed_rank({4, 4}, o) == 0);     // 16 >= 16: no strict gain
  CHECK(ddp::compressed_rank({5, 5}, o) == 1);     // 20 < 25
  CHECK(ddp::compressed_rank({7, 1, 1}, o) == 0);  // m = 1
  o.matrix_approximation_rank = 4;
  CHECK(ddp::compressed_rank({10, 100}, o) == 4);  // 880 < 1000
  CHECK(ddp::compressed_rank({10, 10, 10}, o) == 4);
  CHECK(ddp::compressed_rank({12, 10}, o) == 0);  // 176 >= 120
  o.min_compression_rate = 1;
  CHECK(ddp::compressed_rank({3, 100}, o) == 0);   // rank capped at 3: 309 >= 300
  CHECK(ddp::compressed_rank({3, 1000}, o) == 0);  // with r = n it never pays: (n + m) n >= n m
  CHECK(ddp::compressed_rank({5, 1000}, o) == 4);
}

TEST_CASE("PowerSGD options are checked, with errors naming the option and the value", "[ddp][powersgd]") {
  CHECK(error_of({}) == "(no error)");
  ddp::PowerSGDOptions o;
  o.matrix_approximation_rank = 0;
  CHECK_THAT(error_of(o), Contains("matrix_approximation_rank must be >= 1, got 0"));
  o = {};
  o.min_compression_rate = 0.5;
  CHECK_THAT(error_of(o), Contains("min_compression_rate") && Contains("got 0.5"));
  o.min_compression_rate = std::nan("");
  CHECK_THAT(error_of(o), Contains("min_compression_rate"));
  o = {};
  o.orthogonalization_epsilon = -1e-8;
  CHECK_THAT(error_of(o), Contains("orthogonalization_epsilon must be a finite number >= 0"));
  o = {};
  o.matrix_approximation_rank = -2;
  CHECK_THROWS_WITH(ddp::powersgd_hook(o), Contains("matrix_approximation_rank"));
  CHECK_THROWS_WITH(ddp::powersgd_hook(std::shared_ptr<ddp::PowerSGDState>()), Contains("needs a PowerSGDState"));
}

TEST_CASE("PowerSGD on one rank: exact on rank-r matrices, two all-reduces per bucket", "[ddp][powersgd]") {
  for (std::int64_t r : {1, 2}) {
    INFO("rank " << r);
    torch::manual_seed(10 + r);
    // Columns in an r-dimensional subspace: the rank-r approximation is the matrix itself.
    const torch::Tensor w = torch::randn({12, r}).mm(torch::randn({r, 18})).view({12, 2, 3, 3});
    const torch::Tensor b = torch::randn({12});
    auto bucket = make_bucket({w, b}, {"w", "b"});
    auto state = std::make_shared<ddp::PowerSGDState>(starting_at_once(r));
    SoloCommunicator solo;
    ddp::powersgd_hook(state)(solo, bucket)->wait();
    CHECK(solo.allreduces == 2);
    CHECK(torch::allclose(gradient_of(bucket, 0), w, 1e-4, 1e-5));
    CHECK(torch::equal(gradient_of(bucket, 1), b));
    CHECK(state->error("w").abs().max().item<float>() < 1e-4);
    CHECK_FALSE(state->error("b").defined());  // 1-D: no residual
    const ddp::PowerSGDStats s = state->stats();
    CHECK(s.compressed_buckets == 1);
    CHECK(s.compressed_matrices == 1);
    CHECK(s.uncompressed_tensors == 1);
    CHECK(s.gradient_bytes == 4 * (12 * 18 + 12));
    CHECK(s.compressed_bytes == 4 * (12 + 12 * r + 18 * r));  // [b | P], then Q
  }
  SoloCommunicator solo;
  auto bias_only = make_bucket({torch::ones({5})}, {"b"});
  ddp::powersgd_hook(starting_at_once())(solo, bias_only)->wait();
  CHECK(solo.allreduces == 1);  // no matrix, no Q round
}

TEST_CASE("PowerSGD on one rank: what was applied plus the residual is what came in", "[ddp][powersgd]") {
  auto state = std::make_shared<ddp::PowerSGDState>(starting_at_once());
  auto hook = ddp::powersgd_hook(state);
  SoloCommunicator solo;
  torch::manual_seed(5);
  torch::Tensor applied = torch::zeros({16, 20}, torch::kFloat64), given = torch::zeros_like(applied);
  for (int step = 0; step < 5; ++step) {
    const torch::Tensor g = torch::randn({16, 20});
    auto bucket = make_bucket({g}, {"w"}, step);
    hook(solo, bucket)->wait();
    applied += gradient_of(bucket, 0).to(torch::kFloat64);
    given += g.to(torch::kFloat64);
    // Closed form of error feedback: sum of applied + residual = sum of gradients.
    CHECK(torch::allclose(applied + state->error("w").to(torch::kFloat64), given, 1e-5, 1e-5));
  }
  CHECK((applied - given).abs().max().item<double>() > 0.1);  // rank 1 of a random 16 x 20 is lossy
}

TEST_CASE("PowerSGD error() read from another thread during steps gives whole residuals (Note [PowerSGD "
          "residuals read during a step])",
          "[ddp][powersgd]") {
  // A reader thread calls error() over and over while the hook runs steps. Every residual it gets must
  // be one that a step left (recorded between steps); one read while a step adds its gradient into the
  // residual would be a mix of two and match none. The main thread waits for a read after each step,
  // so whole residuals are read as well as attempts during steps.
  auto state = std::make_shared<ddp::PowerSGDState>(starting_at_once());
  auto hook = ddp::powersgd_hook(state);
  SoloCommunicator solo;
  torch::manual_seed(12);
  constexpr int kSteps = 40;
  std::atomic<bool> done{false};
  std::atomic<long> reads{0};
  std::vector<torch::Tensor> seen;
  long attempts = 0;
  std::thread reader([&] {
    while (!done.load()) {
      torch::Tensor e = state->error("w");
      ++attempts;
      // Kept when it differs from the last one kept (most reads between two steps see the same).
      if (e.defined() && (seen.empty() || !torch::equal(e, seen.back()))) seen.push_back(std::move(e));
      reads.fetch_add(1);
    }
  });
  std::vector<torch::Tensor> between_steps;
  for (int step = 0; step < kSteps; ++step) {
    auto bucket = make_bucket({torch::randn({384, 512})}, {"w"}, step);
    hook(solo, bucket)->wait();
    between_steps.push_back(state->error("w"));
    const long after = reads.load() + 2;  // a read that began after this step's end
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (reads.load() < after && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  }
  done = true;
  reader.join();
  INFO(seen.size() << " distinct residuals read in " << attempts << " calls");
  REQUIRE(seen.size() >= static_cast<std::size_t>(kSteps));
  std::size_t whole = 0;
  for (const torch::Tensor& e : seen) {
    bool found = false;
    for (const torch::Tensor& b : between_steps) found = found || torch::equal(e, b);
    whole += found ? 1 : 0;
  }
  CHECK(whole == seen.size());
}

TEST_CASE("PowerSGD without warm start and error feedback carries nothing from one step to the next",
          "[ddp][powersgd]") {
  // Two states see different first gradients, then the same second one at the same iteration. Only
  // what a state carries over (the last Q under warm_start, the residual under use_error_feedback) can
  // make their second results differ: with neither, they are bitwise the same.
  torch::manual_seed(8);
  const torch::Tensor g1 = torch::randn({16, 20}), g2 = torch::randn({16, 20}), g3 = torch::randn({16, 20});
  for (const bool warm : {false, true}) {
    for (const bool feedback : {false, true}) {
      INFO("warm_start " << warm << ", use_error_feedback " << feedback);
      ddp::PowerSGDOptions o = starting_at_once();
      o.warm_start = warm;
      o.use_error_feedback = feedback;
      auto second_step = [&o, &g2](const torch::Tensor& first) {
        auto state = std::make_shared<ddp::PowerSGDState>(o);
        auto hook = ddp::powersgd_hook(state);
        SoloCommunicator solo;
        auto before = make_bucket({first.clone()}, {"w"}, 0);
        hook(solo, before)->wait();
        CHECK(state->error("w").defined() == o.use_error_feedback);
        auto bucket = make_bucket({g2.clone()}, {"w"}, 1);
        hook(solo, bucket)->wait();
        return gradient_of(bucket, 0).clone();
      };
      const torch::Tensor after_g1 = second_step(g1);
      const torch::Tensor after_g3 = second_step(g3);
      CHECK(torch::equal(after_g1, after_g3) == (!warm && !feedback));
      if (!warm && !feedback) {
        // Nor the first step's Q: the second is the draw for its own iteration, as a state that had
        // not run before would use.
        auto state = std::make_shared<ddp::PowerSGDState>(o);
        SoloCommunicator solo;
        auto bucket = make_bucket({g2.clone()}, {"w"}, 1);
        ddp::powersgd_hook(state)(solo, bucket)->wait();
        CHECK(torch::equal(after_g1, gradient_of(bucket, 0)));
      }
    }
  }
}

TEST_CASE("PowerSGD under loss scaling: residuals follow the scale and go with a skipped step (Note [PowerSGD "
          "under loss scaling])",
          "[ddp][powersgd]") {
  auto state = std::make_shared<ddp::PowerSGDState>(starting_at_once());
  auto hook = ddp::powersgd_hook(state);
  SoloCommunicator solo;
  torch::manual_seed(7);
  auto step = [&](int iteration) {
    auto bucket = make_bucket({torch::randn({16, 20})}, {"w"}, iteration);
    hook(solo, bucket)->wait();
  };
  step(0);
  const torch::Tensor first = state->error("w");
  REQUIRE(first.abs().max().item<float>() > 0.01f);
  state->rescale_residuals(0.25);
  CHECK(torch::allclose(state->error("w"), first * 0.25));
  CHECK_THROWS_WITH(state->rescale_residuals(-1.0), Contains("factor must be a finite number >= 0, got -1"));

  // In the trainer: a GradScaler among the callbacks (fp16) drives it.
  lockstep::train::GradScalerOptions o;
  o.init_scale = 1024.0;
  o.growth_interval = 1;  // grows after every good step
  auto scaler = std::make_shared<lockstep::train::GradScaler>(o);
  auto keeper = std::make_shared<lockstep::train::PowerSGDStateCallback>(state);
  const std::vector<std::shared_ptr<lockstep::train::Callback>> callbacks{scaler, keeper};
  lockstep::train::TrainerContext ctx;
  ctx.callbacks = &callbacks;
  keeper->on_train_begin(ctx);
  step(1);
  const torch::Tensor before = state->error("w");
  scaler->update(/*found_inf=*/false);  // 1024 -> 2048: the next step's gradients are twice as large
  REQUIRE(scaler->scale_value() == 2048.0);
  ctx.step_skipped = false;
  keeper->on_after_optimizer_step(ctx);
  CHECK(torch::allclose(state->error("w"), before * 2.0));
  keeper->on_after_optimizer_step(ctx);  // the scale did not change: nor do the residuals
  CHECK(torch::allclose(state->error("w"), before * 2.0));
  step(2);
  scaler->update(/*found_inf=*/true);  // an overflow: the step is skipped, its approximation never applied
  ctx.step_skipped = true;
  keeper->on_after_optimizer_step(ctx);
  CHECK(state->error("w").abs().max().item<float>() == 0.0f);
}

TEST_CASE("PowerSGD on one rank: before start_iteration it averages, 16-bit buckets work in float32",
          "[ddp][powersgd]") {
  ddp::PowerSGDOptions o;
  o.start_iteration = 2;
  auto state = std::make_shared<ddp::PowerSGDState>(o);
  SoloCommunicator solo;
  const torch::Tensor g = torch::randn({16, 20});
  for (std::uint64_t it = 0; it < 3; ++it) {
    auto bucket = make_bucket({g}, {"w"}, it);
    ddp::powersgd_hook(state)(solo, bucket)->wait();
    if (it < 2)
      CHECK(torch::equal(gradient_of(bucket, 0), g));
    else
      CHECK_FALSE(torch::allclose(gradient_of(bucket, 0), g, 1e-3, 1e-3));
  }
  CHECK(state->stats().plain_buckets == 2);
  CHECK(state->stats().compressed_buckets == 1);

  for (auto dtype : {torch::kHalf, torch::kBFloat16}) {
    INFO(dtype);
    // Exactly rank 1 in 16 bits too (small integers times quarters): only the result is rounded.
    const torch::Tensor w =
        (torch::randint(1, 5, {10, 1}, torch::kFloat).mm(torch::randint(-3, 4, {1, 30}, torch::kFloat)) / 4.0)
            .to(torch::kFloat)
            .to(dtype);
    auto bucket = make_bucket({w}, {"w"});
    auto half_state = std::make_shared<ddp::PowerSGDState>(starting_at_once());
    ddp::powersgd_hook(half_state)(solo, bucket)->wait();
    CHECK(bucket.buffer.scalar_type() == dtype);
    const double u = dtype == torch::kHalf ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
    const torch::Tensor exact = w.to(torch::kFloat64);
    const torch::Tensor error = (gradient_of(bucket, 0).to(torch::kFloat64) - exact).abs();
    CHECK((error <= 1.01 * u * exact.abs() + 1e-4 * exact.abs().max()).all().item<bool>());
    CHECK(half_state->error("w").scalar_type() == torch::kFloat);
  }
}

TEST_CASE("PowerSGD state follows a parameter into another bucket and restarts on a new shape", "[ddp][powersgd]") {
  SoloCommunicator solo;
  auto fixed = std::make_shared<ddp::PowerSGDState>(starting_at_once());
  auto moved = std::make_shared<ddp::PowerSGDState>(starting_at_once());
  torch::manual_seed(8);
  for (std::uint64_t it = 0; it < 3; ++it) {
    const torch::Tensor a = torch::randn({8, 9}), c = torch::randn({6, 7});
    auto both = make_bucket({a, c}, {"a", "c"}, it);
    ddp::powersgd_hook(fixed)(solo, both)->wait();
    // The other state sees them in two buckets from iteration 1 on, in the other order.
    if (it == 0) {
      auto again = make_bucket({a, c}, {"a", "c"}, it);
      ddp::powersgd_hook(moved)(solo, again)->wait();
      CHECK(torch::allclose(again.buffer, both.buffer, 1e-5, 1e-6));
      continue;
    }
    auto first = make_bucket({c}, {"c"}, it, 0, 2), second = make_bucket({a}, {"a"}, it, 1, 2);
    ddp::powersgd_hook(moved)(solo, first)->wait();
    ddp::powersgd_hook(moved)(solo, second)->wait();
    // Not bitwise: the same products at other addresses may take other vector paths.
    CHECK(torch::allclose(gradient_of(second, 0), gradient_of(both, 0), 1e-5, 1e-6));
    CHECK(torch::allclose(gradient_of(first, 0), gradient_of(both, 1), 1e-5, 1e-6));
  }
  // Same name, new shape: a fresh residual (none carried over), not an error.
  const torch::Tensor reshaped = torch::randn({9, 8});
  auto bucket = make_bucket({reshaped}, {"a"}, 3);
  ddp::powersgd_hook(moved)(solo, bucket)->wait();
  CHECK(moved->error("a").sizes() == reshaped.sizes());
  CHECK(torch::allclose(moved->error("a") + gradient_of(bucket, 0), reshaped, 1e-5, 1e-5));
}

TEST_CASE("PowerSGD recovers from a zero or non-finite gradient instead of sticking to it", "[ddp][powersgd]") {
  // Note [PowerSGD degenerate state]: warm start would carry a zero or NaN Q forever.
  torch::manual_seed(12);
  const torch::Tensor g = torch::randn({12, 1}).mm(torch::randn({1, 15}));  // rank 1: approximated exactly
  torch::Tensor poisoned = torch::zeros({12, 15});
  poisoned[3][4] = std::numeric_limits<float>::infinity();
  for (const torch::Tensor& bad : {torch::zeros({12, 15}), poisoned}) {
    INFO((bad.isfinite().all().item<bool>() ? "zero gradient first" : "inf in the first gradient"));
    auto state = std::make_shared<ddp::PowerSGDState>(starting_at_once());
    auto hook = ddp::powersgd_hook(state);
    SoloCommunicator solo;
    auto first = make_bucket({bad}, {"w"}, 0);
    hook(solo, first)->wait();
    // A bad gradient is passed on as such (GradScaler must see it); the residual is kept finite.
    CHECK(torch::isfinite(gradient_of(first, 0)).all().item<bool>() == bad.isfinite().all().item<bool>());
    CHECK(torch::isfinite(state->error("w")).all().item<bool>());
    for (std::uint64_t it = 1; it < 3; ++it) {
      auto next = make_bucket({g}, {"w"}, it);
      hook(solo, next)->wait();
      CHECK(torch::allclose(gradient_of(next, 0), g, 1e-4, 1e-5));
    }
  }
}

TEST_CASE("PowerSGD rejects buckets it cannot reduce", "[ddp][powersgd]") {
  SoloCommunicator solo;
  auto hook = ddp::powersgd_hook(starting_at_once());
  auto ints = make_bucket({torch::ones({4, 4}, torch::kInt)}, {"i"});
  CHECK_THROWS_WITH(hook(solo, ints), Contains("floating-point") && Contains("rank 0"));
  auto shapeless = make_bucket({torch::ones({4, 4})}, {"w"});
  shapeless.sizes.clear();
  CHECK_THROWS_WITH(hook(solo, shapeless), Contains("GradBucket::sizes"));
}

namespace {

// Gradients of a conv weight (compressed), a bias and a small matrix (uncompressed) at `step`.
std::vector<torch::Tensor> gradients_at(int step) {
  torch::manual_seed(300 + step);
  return {torch::randn({8, 3, 2, 2}), torch::randn({8}), torch::randn({3, 3})};
}
const std::vector<std::string> kNames = {"conv.weight", "conv.bias", "tiny.weight"};

// Reduces steps [first, last) of gradients_at with `state`, GradBucket::iteration counting from
// `iteration`; returns what was applied.
std::vector<torch::Tensor> run_steps(ddp::PowerSGDState& state, int first, int last, std::uint64_t iteration) {
  SoloCommunicator solo;
  std::vector<torch::Tensor> applied;
  for (int step = first; step < last; ++step) {
    auto bucket = make_bucket(gradients_at(step), kNames, iteration++);
    state.reduce(solo, bucket)->wait();
    applied.push_back(bucket.buffer.clone());
  }
  return applied;
}

bool bitwise(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  bool equal = a.size() == b.size();
  for (std::size_t i = 0; equal && i < a.size(); ++i) equal = torch::equal(a[i], b[i]);
  return equal;
}

std::string restore_error(ddp::PowerSGDState& state, const std::vector<std::string>& states,
                          const std::map<std::string, std::vector<std::int64_t>>* parameters = nullptr) {
  SoloCommunicator solo;
  try {
    state.restore_state(states, solo, parameters);
  } catch (const lockstep::Error& e) {
    return e.message();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("PowerSGD state saved and restored continues bitwise, counting iterations on from the saved count",
          "[ddp][powersgd]") {
  ddp::PowerSGDOptions o;
  o.matrix_approximation_rank = 2;
  o.start_iteration = 3;
  for (int saved_after : {2, 5}) {  // before compression starts (only the count matters), and after
    INFO("saved after " << saved_after << " steps");
    ddp::PowerSGDState original(o);
    run_steps(original, 0, saved_after, 0);
    SoloCommunicator solo;
    const std::vector<std::string> states = original.gather_state(solo);
    REQUIRE(states.size() == 1);

    ddp::PowerSGDState restored(o);
    restored.restore_state(states, solo);
    if (saved_after > 3) CHECK(torch::equal(restored.error("conv.weight"), original.error("conv.weight")));
    // The original goes on with its reducer's count; the restored one sees a new reducer's, from 0.
    const auto expected = run_steps(original, saved_after, 8, saved_after);
    const auto resumed = run_steps(restored, saved_after, 8, 0);
    CHECK(bitwise(expected, resumed));
    CHECK(torch::equal(restored.error("conv.weight"), original.error("conv.weight")));
    CHECK(restored.stats().compressed_buckets == original.stats().compressed_buckets);
    CHECK(restored.stats().plain_buckets == 3);
    CHECK(restored.stats().compressed_bytes == original.stats().compressed_bytes);
    CHECK(restored.error("tiny.weight").defined() == false);  // uncompressed: no state

    // Without the state (a fresh one) the same steps come out otherwise.
    ddp::PowerSGDState fresh(o);
    CHECK_FALSE(bitwise(expected, run_steps(fresh, saved_after, 8, 0)));
  }
}

TEST_CASE("PowerSGD restore_state refuses another world size, other options, another model and garbage",
          "[ddp][powersgd]") {
  ddp::PowerSGDOptions o;
  o.start_iteration = 0;
  ddp::PowerSGDState saved(o);
  run_steps(saved, 0, 2, 0);
  SoloCommunicator solo;
  const std::vector<std::string> states = saved.gather_state(solo);

  ddp::PowerSGDState target(o);
  CHECK_THAT(restore_error(target, {states[0], states[0]}),
             Contains("residuals of 2 ranks but this job has 1") && Contains("at the world size it was saved at"));
  CHECK_THAT(restore_error(target, {"not an archive"}), Contains("not a readable PowerSGD state"));

  std::map<std::string, std::vector<std::int64_t>> model = {
      {"conv.weight", {8, 3, 2, 2}}, {"conv.bias", {8}}, {"tiny.weight", {3, 3}}};
  CHECK(restore_error(target, states, &model) == "(no error)");
  model.erase("conv.weight");
  CHECK_THAT(restore_error(target, states, &model), Contains("'conv.weight'") && Contains("does not have"));
  model["conv.weight"] = {8, 12};
  CHECK_THAT(restore_error(target, states, &model), Contains("'conv.weight'") && Contains("[8, 12]"));

  ddp::PowerSGDOptions other = o;
  other.matrix_approximation_rank = 2;
  ddp::PowerSGDState wider(other);
  CHECK_THAT(restore_error(wider, states), Contains("matrix_approximation_rank 1 but this run has 2"));
  other = o;
  other.min_compression_rate = 1.5;
  ddp::PowerSGDState looser(other);
  CHECK_THAT(restore_error(looser, states), Contains("min_compression_rate 2 but this run has 1.5"));
  other = o;
  other.use_error_feedback = false;
  ddp::PowerSGDState no_feedback(other);
  CHECK_THAT(restore_error(no_feedback, states), Contains("use_error_feedback"));
  // Options that leave the saved tensors meaningful may change.
  other = o;
  other.start_iteration = 4;
  other.seed = 3;
  ddp::PowerSGDState reseeded(other);
  CHECK(restore_error(reseeded, states) == "(no error)");

  // A failed restore leaves the state as it was.
  ddp::PowerSGDState kept(o);
  run_steps(kept, 5, 6, 0);
  const torch::Tensor kept_error = kept.error("conv.weight");
  CHECK(restore_error(kept, {"not an archive"}) != "(no error)");
  CHECK(torch::equal(kept.error("conv.weight"), kept_error));

  // Restored state that a step finds for another shape is an error, not silently replaced.
  ddp::PowerSGDState unchecked(o);
  unchecked.restore_state(states, solo);
  auto reshaped = make_bucket({torch::randn({12, 8})}, {"conv.weight"});
  CHECK_THROWS_WITH(unchecked.reduce(solo, reshaped), Contains("restored for parameter 'conv.weight'") &&
                                                          Contains("[8, 3, 2, 2]") && Contains("[12, 8]"));
}

TEST_CASE("powersgd_state_of finds the state of a PowerSGD hook and nothing in other hooks", "[ddp][powersgd]") {
  auto state = std::make_shared<ddp::PowerSGDState>();
  CHECK(ddp::powersgd_state_of(ddp::powersgd_hook(state)) == state);
  CHECK(ddp::powersgd_state_of(ddp::powersgd_hook(ddp::PowerSGDOptions{})) != nullptr);
  CHECK(ddp::powersgd_state_of(ddp::allreduce_hook()) == nullptr);
  CHECK(ddp::powersgd_state_of(ddp::CommHook{}) == nullptr);
  // A hook of one's own around a state is opaque (its callback must be added by hand).
  const ddp::CommHook wrapped = [state](lockstep::comm::Communicator& c, const ddp::GradBucket& b) {
    return state->reduce(c, b);
  };
  CHECK(ddp::powersgd_state_of(wrapped) == nullptr);
}
