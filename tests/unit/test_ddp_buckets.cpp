// Bucket assignment and the model description, which need no communication, and DataParallel in a
// world of one rank (SoloCommunicator).
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <memory>
#include <set>
#include <string>

#include "lockstep/core/error.hpp"
#include "lockstep/ddp/bucket_assignment.hpp"
#include "lockstep/comm/agree.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/model_sync.hpp"
#include "lockstep/ddp/timeline.hpp"
#include "support/counting_communicator.hpp"
#include "support/solo_communicator.hpp"

using lockstep::ddp::assign_buckets;
using lockstep::ddp::BucketAssignment;
using lockstep::ddp::reverse_order;

namespace {
// Four float parameters of 100, 10, 300 and 20 elements (400, 40, 1200, 80 bytes).
std::vector<torch::Tensor> four_parameters() {
  return {torch::zeros({10, 10}), torch::zeros({10}), torch::zeros({30, 10}), torch::zeros({20})};
}
}  // namespace

TEST_CASE("A cap of zero gives every parameter its own bucket, last registered first", "[ddp]") {
  const auto params = four_parameters();
  CHECK(assign_buckets(params, reverse_order(4), 0, 0) == BucketAssignment{{3}, {2}, {1}, {0}});
}

TEST_CASE("A large cap gives one bucket per dtype", "[ddp]") {
  auto params = four_parameters();
  CHECK(assign_buckets(params, reverse_order(4), 1 << 20, 1 << 20) == BucketAssignment{{3, 2, 1, 0}});
  params[1] = torch::zeros({10}, torch::kFloat64);
  CHECK(assign_buckets(params, reverse_order(4), 1 << 20, 1 << 20) == BucketAssignment{{3, 2, 0}, {1}});
}

TEST_CASE("The first bucket has its own, smaller cap", "[ddp]") {
  const auto params = four_parameters();
  // Reverse order: 80 B closes the first bucket (>= 64 B); 1200 + 40 B reach 1220 B; 400 B is left.
  CHECK(assign_buckets(params, reverse_order(4), 64, 1220) == BucketAssignment{{3}, {2, 1}, {0}});
  // A bucket closes once it reaches its cap, so a large parameter may overshoot it.
  CHECK(assign_buckets(params, reverse_order(4), 1 << 20, 1 << 20).size() == 1);
}

TEST_CASE("Buckets follow the given order", "[ddp]") {
  const auto params = four_parameters();
  CHECK(assign_buckets(params, {1, 3, 0, 2}, 0, 0) == BucketAssignment{{1}, {3}, {0}, {2}});
  CHECK(assign_buckets(params, {1, 3, 0, 2}, 100, 100) == BucketAssignment{{1, 3}, {0}, {2}});
}

TEST_CASE("assign_buckets rejects an order that is not a permutation", "[ddp]") {
  const auto params = four_parameters();
  CHECK_THROWS_WITH(assign_buckets(params, {0, 1, 1, 2}, 0, 0), Catch::Contains("is not a permutation of 0..3"));
  CHECK_THROWS_WITH(assign_buckets(params, {0, 1, 2, 7}, 0, 0), Catch::Contains("is not a permutation of 0..3"));
  CHECK_THROWS_WITH(assign_buckets(params, {0, 1, 2}, 0, 0), Catch::Contains("the order names 3"));
  CHECK_THROWS_WITH(lockstep::ddp::cap_bytes_from_mb(-1, "bucket_cap_mb"),
                    Catch::Contains("bucket_cap_mb must be a non-negative number of MiB"));
  CHECK(lockstep::ddp::cap_bytes_from_mb(25, "bucket_cap_mb") == 25 << 20);
  // Past int64's bytes: it rounded to a negative count, which a later check called negative.
  CHECK_THROWS_WITH(lockstep::ddp::cap_bytes_from_mb(1e20, "bucket_cap_mb"),
                    Catch::Contains("bucket_cap_mb must be a non-negative number of MiB below 2^43 (8 EiB), found 1e+20"));
  CHECK(lockstep::ddp::cap_bytes_from_mb(1e12, "bucket_cap_mb") == static_cast<std::int64_t>(1e12) << 20);
}

TEST_CASE("Model entries describe what must agree across ranks", "[ddp]") {
  auto p = torch::zeros({3, 4}, torch::kFloat64).requires_grad_();
  CHECK(lockstep::ddp::describe({"parameter", "fc.weight", p}) ==
        "parameter fc.weight: Double [3, 4] on cpu, requires grad");
  CHECK(lockstep::ddp::describe({"buffer", "bn.running_mean", torch::zeros({4})}) ==
        "buffer bn.running_mean: Float [4] on cpu");
  CHECK(lockstep::comm::fingerprint("a") != lockstep::comm::fingerprint("b"));
  // The device's kind, not its index: on a host of several GPUs each rank's model is on its own one.
  CHECK(lockstep::ddp::device_kind(c10::Device("cuda:1")) == "cuda");
  CHECK(lockstep::ddp::device_kind(c10::Device("cuda:0")) == lockstep::ddp::device_kind(c10::Device("cuda:1")));
  CHECK(lockstep::ddp::device_kind(c10::Device("cpu")) == "cpu");
  // Labels: the kind where a model has one device of it; numbered in first-seen order where it has
  // several, so that which tensors share a GPU still has to agree.
  using Labels = std::vector<std::string>;
  CHECK(lockstep::ddp::device_labels({c10::Device("cuda:3"), c10::Device("cuda:3"), c10::Device("cpu")}) ==
        Labels{"cuda", "cuda", "cpu"});
  CHECK(lockstep::ddp::device_labels({c10::Device("cuda:5"), c10::Device("cuda:2"), c10::Device("cuda:5")}) ==
        Labels{"cuda#0", "cuda#1", "cuda#0"});
  CHECK(lockstep::ddp::device_labels({c10::Device("cuda:0"), c10::Device("cuda:1"), c10::Device("cuda:0")}) ==
        lockstep::ddp::device_labels({c10::Device("cuda:6"), c10::Device("cuda:7"), c10::Device("cuda:6")}));
  CHECK(lockstep::ddp::device_labels({c10::Device("cuda:0"), c10::Device("cuda:1")}) !=
        lockstep::ddp::device_labels({c10::Device("cuda:2"), c10::Device("cuda:2")}));
  CHECK(lockstep::ddp::describe({"parameter", "fc.weight", p}, "cuda#1") ==
        "parameter fc.weight: Double [3, 4] on cuda#1, requires grad");
}

TEST_CASE("Timeline writes Chrome trace events", "[ddp]") {
  lockstep::ddp::Timeline timeline(3, /*max_events=*/2);
  const auto t0 = lockstep::comm::Clock::now();
  timeline.add({"backward", lockstep::ddp::Timeline::Track::Compute, t0, t0 + std::chrono::milliseconds(2), {}});
  timeline.add({"allreduce bucket 0",
                lockstep::ddp::Timeline::Track::Communication,
                t0,
                t0 + std::chrono::microseconds(500),
                {{"bytes", 64}}});
  timeline.add({"dropped", lockstep::ddp::Timeline::Track::Compute, t0, t0, {}});
  CHECK(timeline.size() == 2);
  CHECK(timeline.dropped() == 1);
  const std::string json = timeline.to_json(t0);
  CHECK(json.find("\"name\":\"backward\"") != std::string::npos);
  CHECK(json.find("\"dur\":2000.0") != std::string::npos);
  CHECK(json.find("\"pid\":3") != std::string::npos);
  CHECK(json.find("\"dropped_events\":1") != std::string::npos);
}

namespace {
// Two layers, a batch norm (buffers DataParallel would broadcast) and a layer that never takes part.
struct SoloNetImpl : torch::nn::Module {
  SoloNetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(6, 5))),
        bn(register_module("bn", torch::nn::BatchNorm1d(5))),
        fc2(register_module("fc2", torch::nn::Linear(5, 3))),
        idle(register_module("idle", torch::nn::Linear(3, 3))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(bn(fc1(x)))); }
  torch::nn::Linear fc1;
  torch::nn::BatchNorm1d bn;
  torch::nn::Linear fc2, idle;
};
TORCH_MODULE(SoloNet);
}  // namespace

TEST_CASE("At one rank a synchronised backward issues only its buckets' collectives", "[ddp]") {
  // Note [CPU tensors through NCCL] and the reducer: at one rank the per-step flags all-reduce and the
  // buffer broadcast are identities, and over NCCL each was a host round trip per step; only the
  // buckets (which a comm hook may transform) still go through the communicator.
  torch::manual_seed(3);
  SoloNet model;
  torch::manual_seed(3);
  SoloNet plain;  // the same initial weights, trained without DataParallel
  auto counting = std::make_shared<lockstep::testing::CountingCommunicator>(
      std::make_shared<lockstep::testing::SoloCommunicator>());
  lockstep::ddp::DataParallelOptions options;
  options.bucket_cap_mb = 0;  // one bucket per parameter
  options.first_bucket_cap_mb = 0;
  options.find_unused_parameters = true;  // `idle` never gets a gradient
  lockstep::ddp::DataParallel dp(model, counting, options);
  const std::size_t buckets = dp.reducer().bucket_assignment().size();
  CHECK(buckets == 8);
  const torch::Tensor x = torch::randn({4, 6});
  for (int step = 0; step < 3; ++step) {
    const int before = counting->calls;
    model->forward(x).sum().backward();
    CHECK(counting->calls - before == static_cast<int>(buckets));
  }
  // The reduced gradients are this rank's own (sum, and average, over one rank), and the unused
  // layer's gradient stays undefined, as in a process without DataParallel.
  for (int step = 0; step < 3; ++step) plain->forward(x).sum().backward();
  for (const auto& item : plain->named_parameters()) {
    INFO(item.key());
    const torch::Tensor& mine = model->named_parameters()[item.key()].grad();
    CHECK(mine.defined() == item.value().grad().defined());
    if (mine.defined()) CHECK(torch::allclose(mine, item.value().grad()));
  }
}

TEST_CASE("At one rank a parameter without a gradient is still an error that names it", "[ddp]") {
  torch::manual_seed(3);
  SoloNet model;
  lockstep::ddp::DataParallel dp(model, std::make_shared<lockstep::testing::SoloCommunicator>());
  std::string error;
  try {
    model->forward(torch::randn({4, 6})).sum().backward();
  } catch (const std::exception& e) {
    error = e.what();
  }
  INFO(error);
  CHECK(error.find("'idle.weight' (on 1 of 1 ranks)") != std::string::npos);
  CHECK(error.find("find_unused_parameters") != std::string::npos);
}

TEST_CASE("Gradients reset to none, all or some of them, are copied into the buckets whole or one by one",
          "[ddp]") {
  // Note [Gradient views]: a bucket whose gradients all arrive fresh is filled with one at::cat, one
  // with some fresh and some already in place by a copy each; either way every .grad() ends as its
  // view of the bucket and the values are a single process's, also across no_sync micro-batches.
  for (const bool all : {true, false}) {
    INFO((all ? "every gradient reset" : "every other gradient reset"));
    torch::manual_seed(5);
    SoloNet model;
    torch::manual_seed(5);
    SoloNet plain;
    model->idle->weight.set_requires_grad(false);
    model->idle->bias.set_requires_grad(false);
    plain->idle->weight.set_requires_grad(false);
    plain->idle->bias.set_requires_grad(false);
    lockstep::ddp::DataParallelOptions options;
    options.first_bucket_cap_mb = 0;  // the first gradient ready alone, then the other five together
    lockstep::ddp::DataParallel dp(model, std::make_shared<lockstep::testing::SoloCommunicator>(), options);
    REQUIRE(dp.reducer().bucket_assignment().size() == 2);
    auto opt = torch::optim::SGD(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    auto plain_opt = torch::optim::SGD(plain->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    for (int step = 0; step < 4; ++step) {
      const torch::Tensor x = torch::randn({4, 6}), extra = torch::randn({4, 6});
      int k = 0;
      for (auto& p : model->parameters()) {
        if (p.requires_grad() && (all || k++ % 2 == 0)) p.mutable_grad() = torch::Tensor();
        else if (p.grad().defined()) p.mutable_grad().zero_();
      }
      if (step % 2 == 1) {  // a micro-batch under no_sync first
        auto guard = dp.no_sync();
        model->forward(extra).sum().backward();
      }
      model->forward(x).sum().backward();
      opt.step();
      plain_opt.zero_grad();
      if (step % 2 == 1) plain->forward(extra).sum().backward();
      plain->forward(x).sum().backward();
      plain_opt.step();
      const auto mine = model->named_parameters();
      for (const auto& item : plain->named_parameters()) {
        if (!item.value().requires_grad()) continue;
        INFO(item.key() << ", step " << step);
        CHECK(torch::allclose(mine[item.key()], item.value(), 1e-6, 1e-6));
      }
    }
    // Every gradient is a view of one of the two buckets' buffers.
    std::set<const void*> buffers;
    for (const auto& p : model->parameters()) {
      if (!p.requires_grad()) continue;
      REQUIRE(p.grad().defined());
      buffers.insert(p.grad().storage().unsafeGetStorageImpl());
    }
    CHECK(buffers.size() == 2);
  }
}
