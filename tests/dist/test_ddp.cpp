// DataParallel against the single-process oracle: K steps of SGD (momentum, weight decay) on N
// ranks, each on its slice of the batch, must leave the parameters where one process training on
// the whole batch leaves them. The oracle runs on every rank, locally, without DataParallel.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <unistd.h>
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/train/model_tensors.hpp"
#include "support/dist.hpp"

namespace {

using lockstep::ddp::DataParallel;
using lockstep::ddp::DataParallelOptions;
using lockstep::testing::comm;
using lockstep::testing::identical_across_ranks;
using lockstep::testing::comm_ptr;

const std::vector<std::int64_t> kWidths = {13, 32, 7, 40, 3};  // layers of unequal sizes

struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(const std::vector<std::int64_t>& widths) {
    for (std::size_t i = 0; i + 1 < widths.size(); ++i) {
      layers.push_back(register_module("fc" + std::to_string(i), torch::nn::Linear(widths[i], widths[i + 1])));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (std::size_t i = 0; i < layers.size(); ++i) {
      x = layers[i]->forward(x);
      if (i + 1 < layers.size()) x = torch::tanh(x);
    }
    return x;
  }
  std::vector<torch::nn::Linear> layers;
};
TORCH_MODULE(Mlp);

// The same initial values on every rank (seeded), then the non-root ranks are disturbed so that
// only DataParallel's broadcast can make them agree.
Mlp make_model(torch::Dtype dtype, bool disturb) {
  torch::manual_seed(7);
  Mlp model(kWidths);
  model->to(dtype);
  if (disturb && comm().rank() != 0) {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.add_(0.5 * comm().rank());
  }
  return model;
}

struct Batch {
  torch::Tensor x, y;
};

// The global batch of step `step`, identical on every rank.
Batch global_batch(int step, std::int64_t rows, torch::Dtype dtype) {
  torch::manual_seed(1000 + step);
  return {torch::randn({rows, kWidths.front()}).to(dtype), torch::randn({rows, kWidths.back()}).to(dtype)};
}

Batch slice(const Batch& batch, int part, int parts) {
  const std::int64_t rows = batch.x.size(0) / parts;
  return {batch.x.narrow(0, part * rows, rows), batch.y.narrow(0, part * rows, rows)};
}

torch::optim::SGD make_sgd(torch::nn::Module& model) {
  return torch::optim::SGD(model.parameters(), torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(1e-3));
}

double max_relative_error(Mlp& a, Mlp& b) {
  double worst = 0;
  auto pa = a->parameters();
  auto pb = b->parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    const double scale = std::max(pb[i].abs().max().item<double>(), 1e-30);
    worst = std::max(worst, (pa[i] - pb[i]).abs().max().item<double>() / scale);
  }
  return worst;
}

std::vector<std::int64_t> allgather_ints(const std::vector<std::int64_t>& values, std::int64_t length) {
  torch::Tensor mine = torch::full({length}, -1, torch::kLong);
  for (std::size_t k = 0; k < values.size() && static_cast<std::int64_t>(k) < length; ++k) mine[k] = values[k];
  torch::Tensor all = torch::empty({comm().size() * length}, torch::kLong);
  comm().allgather(mine, all)->wait();
  return std::vector<std::int64_t>(all.data_ptr<std::int64_t>(), all.data_ptr<std::int64_t>() + all.numel());
}

std::vector<std::int64_t> flatten_assignment(const lockstep::ddp::BucketAssignment& assignment) {
  std::vector<std::int64_t> flat;
  for (const auto& bucket : assignment) {
    for (std::size_t i : bucket) flat.push_back(static_cast<std::int64_t>(i));
    flat.push_back(-2);  // bucket boundary
  }
  return flat;
}

bool same_on_all_ranks(const std::vector<std::int64_t>& values) {
  const auto length = static_cast<std::int64_t>(values.size());
  torch::Tensor n = torch::full({1}, length, torch::kLong);
  torch::Tensor lengths = torch::empty({comm().size()}, torch::kLong);
  comm().allgather(n, lengths)->wait();
  const std::int64_t longest = lengths.max().item<std::int64_t>();
  const auto all = allgather_ints(values, longest);
  bool same = (lengths == length).all().item<bool>();
  for (int r = 1; r < comm().size(); ++r) {
    same = same && std::equal(all.begin() + r * longest, all.begin() + (r + 1) * longest, all.begin());
  }
  return same;
}

struct Config {
  const char* name;
  double bucket_cap_mb;
  double first_bucket_cap_mb;
  bool gradient_as_bucket_view;
};

}  // namespace

TEST_CASE("DataParallel matches one process training on the whole batch", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  constexpr int kSteps = 5;
  constexpr std::int64_t kRowsPerRank = 4;
  const std::vector<Config> configs = {
      {"a bucket per parameter", 0.0, 0.0, true},
      {"buckets of about 1 KiB", 1.0 / 1024, 1.0 / 1024, true},
      {"one bucket for all", 1000.0, 1000.0, true},
      {"the default caps", 25.0, 1.0, true},
      {"a bucket per parameter, gradients copied", 0.0, 0.0, false},
  };
  for (torch::Dtype dtype : {torch::kFloat64, torch::kFloat32}) {
    const double tolerance = dtype == torch::kFloat64 ? 1e-10 : 1e-5;
    for (const auto& config : configs) {
      INFO(config.name << ", " << (dtype == torch::kFloat64 ? "float64" : "float32") << ", " << n << " ranks");
      Mlp oracle = make_model(dtype, false);
      Mlp model = make_model(dtype, true);
      DataParallelOptions options;
      options.bucket_cap_mb = config.bucket_cap_mb;
      options.first_bucket_cap_mb = config.first_bucket_cap_mb;
      options.gradient_as_bucket_view = config.gradient_as_bucket_view;
      DataParallel dp(model, comm_ptr(), options);
      CHECK(max_relative_error(model, oracle) == 0.0);  // rank 0's values everywhere

      const std::size_t parameters = model->parameters().size();
      if (config.bucket_cap_mb == 0.0) CHECK(dp.reducer().bucket_assignment().size() == parameters);
      if (config.bucket_cap_mb >= 25.0) CHECK(dp.reducer().bucket_assignment().size() == 1);

      auto opt = make_sgd(*model);
      auto oracle_opt = make_sgd(*oracle);
      for (int step = 0; step < kSteps; ++step) {
        const Batch batch = global_batch(step, kRowsPerRank * n, dtype);
        const Batch mine = slice(batch, rank, n);
        opt.zero_grad();
        torch::mse_loss(model->forward(mine.x), mine.y).backward();
        opt.step();
        oracle_opt.zero_grad();
        torch::mse_loss(oracle->forward(batch.x), batch.y).backward();
        oracle_opt.step();
        CHECK(dp.last_step().synchronized);
        CHECK(dp.last_step().bucket_count == dp.reducer().bucket_assignment().size());
      }
      CHECK(max_relative_error(model, oracle) <= tolerance);
      CHECK(identical_across_ranks(*model));
      if (config.gradient_as_bucket_view && config.bucket_cap_mb >= 25.0) {
        // One bucket: every gradient is a view of the same buffer.
        auto ps = model->parameters();
        for (std::size_t i = 1; i < ps.size(); ++i) CHECK(ps[i].grad().is_alias_of(ps[0].grad()));
      }
    }
  }
}

TEST_CASE("DataParallel repairs gradients reset to undefined (zero_grad with set_to_none)", "[ddp]") {
  const int n = comm().size();
  Mlp oracle = make_model(torch::kFloat64, false);
  Mlp model = make_model(torch::kFloat64, true);
  DataParallelOptions options;
  options.bucket_cap_mb = 1000;
  DataParallel dp(model, comm_ptr(), options);
  auto opt = make_sgd(*model);
  auto oracle_opt = make_sgd(*oracle);
  for (int step = 0; step < 4; ++step) {
    const Batch batch = global_batch(step, 3 * n, torch::kFloat64);
    const Batch mine = slice(batch, comm().rank(), n);
    for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();  // set_to_none
    torch::mse_loss(model->forward(mine.x), mine.y).backward();
    opt.step();
    oracle_opt.zero_grad();
    torch::mse_loss(oracle->forward(batch.x), batch.y).backward();
    oracle_opt.step();
  }
  CHECK(max_relative_error(model, oracle) <= 1e-10);
  auto ps = model->parameters();
  for (std::size_t i = 1; i < ps.size(); ++i) CHECK(ps[i].grad().is_alias_of(ps[0].grad()));
}

namespace {
struct ConvNetImpl : torch::nn::Module {
  ConvNetImpl()
      : conv1(register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 6, 3).padding(1)))),
        conv2(register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(6, 5, 3).stride(2)))),
        fc(register_module("fc", torch::nn::Linear(5 * 3 * 3, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(torch::tanh(conv2(torch::tanh(conv1(x)))).flatten(1)); }
  torch::nn::Conv2d conv1, conv2;
  torch::nn::Linear fc;
};
TORCH_MODULE(ConvNet);
}  // namespace

TEST_CASE("DataParallel with channels_last convolutions: the NCHW oracle's values, gradients in the parameters' layout",
          "[ddp]") {
  // Note [Gradient layout]: each gradient aliases its bucket slice with its parameter's strides, so
  // fresh gradients (set_to_none) and in-place accumulation keep channels_last.
  const int n = comm().size();
  torch::manual_seed(21);
  ConvNet oracle;
  torch::manual_seed(21);
  ConvNet model;
  CHECK(lockstep::train::to_channels_last(*model) == 2);  // the two convolution weights
  REQUIRE(model->conv1->weight.is_contiguous(at::MemoryFormat::ChannelsLast));
  REQUIRE_FALSE(model->conv1->weight.is_contiguous());
  DataParallelOptions options;
  options.bucket_cap_mb = 1000;
  DataParallel dp(model, comm_ptr(), options);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  torch::optim::SGD oracle_opt(oracle->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  for (int step = 0; step < 4; ++step) {
    torch::manual_seed(300 + step);
    const torch::Tensor x = torch::randn({2 * n, 3, 7, 7}), y = torch::randn({2 * n, 4});
    if (step % 2 == 0) {
      for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();  // fresh: one at::cat per bucket
    } else {
      opt.zero_grad();  // in place into the slices (LibTorch 1.13's default; 2.x sets to none)
    }
    torch::mse_loss(model->forward(x.narrow(0, 2 * comm().rank(), 2)), y.narrow(0, 2 * comm().rank(), 2)).backward();
    opt.step();
    oracle_opt.zero_grad();
    torch::mse_loss(oracle->forward(x), y).backward();
    oracle_opt.step();
    auto ps = model->parameters();
    auto want = oracle->parameters();
    for (std::size_t i = 0; i < ps.size(); ++i) {
      INFO("step " << step << ", parameter " << i);
      CHECK(torch::allclose(ps[i], want[i], 1e-4, 1e-5));
      CHECK(ps[i].grad().strides() == ps[i].strides());
      CHECK(ps[i].grad().is_alias_of(ps[0].grad()));  // one bucket
    }
  }
  CHECK(model->conv1->weight.is_contiguous(at::MemoryFormat::ChannelsLast));
  CHECK(identical_across_ranks(*model));
}

TEST_CASE("no_sync over micro-batches equals one synchronised step on their union", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  constexpr int kMicro = 4;
  constexpr std::int64_t kRows = 3;  // per rank and micro-batch
  Mlp oracle = make_model(torch::kFloat64, false);
  Mlp model = make_model(torch::kFloat64, true);
  DataParallelOptions options;
  options.bucket_cap_mb = 0;
  options.first_bucket_cap_mb = 0;
  DataParallel dp(model, comm_ptr(), options);
  auto opt = make_sgd(*model);
  auto oracle_opt = make_sgd(*oracle);
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    oracle_opt.zero_grad();
    for (int m = 0; m < kMicro; ++m) {
      const Batch batch = global_batch(10 * step + m, kRows * n, torch::kFloat64);
      const Batch mine = slice(batch, rank, n);
      if (m + 1 < kMicro) {
        auto guard = dp.no_sync();
        (torch::mse_loss(model->forward(mine.x), mine.y) / kMicro).backward();
        CHECK_FALSE(dp.last_step().synchronized);
      } else {
        (torch::mse_loss(model->forward(mine.x), mine.y) / kMicro).backward();
        CHECK(dp.last_step().synchronized);
      }
      if (m == 0 && n > 1) {
        // Nothing was communicated: the ranks' gradients differ (their data do).
        torch::Tensor norm = model->parameters()[0].grad().norm().reshape({1}).clone();
        torch::Tensor norms = torch::empty({n}, norm.options());
        comm().allgather(norm, norms)->wait();
        CHECK(norms[0].item<double>() != norms[1].item<double>());
      }
      (torch::mse_loss(oracle->forward(batch.x), batch.y) / kMicro).backward();
    }
    opt.step();
    oracle_opt.step();
  }
  CHECK(max_relative_error(model, oracle) <= 1e-10);
  CHECK(identical_across_ranks(*model));
}

namespace {

// Two independent branches whose forward order is chosen per call: autograd runs the branch built
// last first, so ranks that build them in different orders see gradients in different orders.
struct TwoBranchImpl : torch::nn::Module {
  TwoBranchImpl()
      : a1(register_module("a1", torch::nn::Linear(6, 9))),
        a2(register_module("a2", torch::nn::Linear(9, 2))),
        b1(register_module("b1", torch::nn::Linear(6, 5))),
        b2(register_module("b2", torch::nn::Linear(5, 2))) {}
  torch::Tensor forward(torch::Tensor x, bool a_first) {
    torch::Tensor ya, yb;
    if (a_first) {
      ya = a2(torch::tanh(a1(x)));
      yb = b2(torch::tanh(b1(x)));
    } else {
      yb = b2(torch::tanh(b1(x)));
      ya = a2(torch::tanh(a1(x)));
    }
    return ya + yb;
  }
  torch::nn::Linear a1, a2, b1, b2;
};
TORCH_MODULE(TwoBranch);

}  // namespace

namespace {

struct NormedImpl : torch::nn::Module {
  NormedImpl() : fc(register_module("fc", torch::nn::Linear(4, 3))), bn(register_module("bn", torch::nn::BatchNorm1d(3))) {}
  torch::Tensor forward(torch::Tensor x) { return bn(fc(x)); }
  torch::nn::Linear fc;
  torch::nn::BatchNorm1d bn;
};
TORCH_MODULE(Normed);

}  // namespace

TEST_CASE("sync_buffers copies rank 0's buffers to every rank after steps under no_sync", "[ddp]") {
  torch::manual_seed(3);
  Normed model;
  DataParallel dp(model, comm_ptr());
  for (int m = 0; m < 3; ++m) {  // each rank its own data: the running statistics part ways
    auto guard = dp.no_sync();
    torch::manual_seed(100 * comm().rank() + m);
    model->forward(torch::randn({5, 4}) * (1 + comm().rank())).sum().backward();
  }
  std::vector<torch::Tensor> root;  // rank 0's buffers, sent by hand
  for (const auto& b : model->buffers()) {
    torch::Tensor copy = b.clone();
    comm().broadcast(copy)->wait();
    root.push_back(copy);
  }
  REQUIRE(root.size() == 3);  // running_mean, running_var, num_batches_tracked
  CHECK(lockstep::testing::ranks_equal_to_rank0(model->bn->running_mean) == 1);  // rank 0's own only
  CHECK(lockstep::testing::ranks_equal_to_rank0(model->bn->running_var) == 1);
  dp.sync_buffers();
  const auto buffers = model->buffers();
  for (std::size_t i = 0; i < buffers.size(); ++i) CHECK(torch::equal(buffers[i], root[i]));
  for (const auto& b : buffers) CHECK(lockstep::testing::same_on_every_rank(b));
  CHECK(identical_across_ranks(*model));
}

TEST_CASE("Buckets launch in the same order on every rank whatever order gradients arrive in", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  torch::manual_seed(3);
  TwoBranch oracle;
  oracle->to(torch::kFloat64);
  torch::manual_seed(3);
  TwoBranch model;
  model->to(torch::kFloat64);
  DataParallelOptions options;
  options.bucket_cap_mb = 0;  // a bucket per parameter: the order is visible
  options.first_bucket_cap_mb = 0;
  DataParallel dp(model, comm_ptr(), options);
  const std::size_t buckets = dp.reducer().bucket_assignment().size();
  REQUIRE(buckets == 8);
  // Rank 0 builds branch b first, so it sees a's gradients first: its order differs from the
  // initial (reverse registration) one and the rebuild after the first step changes the buckets.
  const bool a_first = rank % 2 == 1;
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  torch::optim::SGD oracle_opt(oracle->parameters(), torch::optim::SGDOptions(0.1).momentum(0.5));
  const auto initial = flatten_assignment(dp.reducer().bucket_assignment());
  for (int step = 0; step < 3; ++step) {
    torch::manual_seed(50 + step);
    torch::Tensor x = torch::randn({2 * n, 6}, torch::kFloat64);
    torch::Tensor y = torch::randn({2 * n, 2}, torch::kFloat64);
    opt.zero_grad();
    torch::mse_loss(model->forward(x.narrow(0, 2 * rank, 2), a_first), y.narrow(0, 2 * rank, 2)).backward();
    opt.step();
    oracle_opt.zero_grad();
    torch::mse_loss(oracle->forward(x, true), y).backward();
    oracle_opt.step();

    // Launched in index order on every rank, buckets holding the same parameters.
    std::vector<std::int64_t> launched(dp.reducer().last_launch_order().begin(),
                                       dp.reducer().last_launch_order().end());
    std::vector<std::int64_t> expected(buckets);
    for (std::size_t b = 0; b < buckets; ++b) expected[b] = static_cast<std::int64_t>(b);
    CHECK(launched == expected);
    const auto assignment = dp.reducer().bucket_assignment();
    std::vector<std::int64_t> launched_parameters;
    for (auto b : launched) {
      for (std::size_t i : assignment[static_cast<std::size_t>(b)])
        launched_parameters.push_back(static_cast<std::int64_t>(i));
    }
    CHECK(same_on_all_ranks(launched_parameters));
    // ... although the buckets became ready in different orders on different ranks.
    if (n > 1) {
      std::vector<std::int64_t> ready(dp.reducer().last_bucket_ready_order().begin(),
                                      dp.reducer().last_bucket_ready_order().end());
      CHECK_FALSE(same_on_all_ranks(ready));
    }
    if (step == 0) {
      CHECK(dp.reducer().buckets_rebuilt());
      CHECK(flatten_assignment(dp.reducer().bucket_assignment()) != initial);
    }
    CHECK(same_on_all_ranks(flatten_assignment(dp.reducer().bucket_assignment())));
  }
  double worst = 0;
  auto pa = model->parameters();
  auto pb = oracle->parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    worst = std::max(worst, (pa[i] - pb[i]).abs().max().item<double>() / pb[i].abs().max().item<double>());
  }
  CHECK(worst <= 1e-10);
  CHECK(identical_across_ranks(*model));
}

TEST_CASE("DataParallel reports step timings and writes a Chrome trace", "[ddp]") {
  const int n = comm().size();
  const int rank = comm().rank();
  const std::string path = lockstep::testing::shared_temp_dir("ddp_trace") + "/trace.json";
  {
    Mlp model = make_model(torch::kFloat32, false);
    DataParallelOptions options;
    options.bucket_cap_mb = 0;
    options.first_bucket_cap_mb = 0;
    DataParallel dp(model, comm_ptr(), options);
    dp.enable_trace(path);
    torch::optim::SGD opt(model->parameters(), 0.1);
    for (int step = 0; step < 3; ++step) {
      const Batch mine = slice(global_batch(step, 4 * n, torch::kFloat32), rank, n);
      opt.zero_grad();
      dp.before_forward();
      torch::Tensor loss = torch::mse_loss(model->forward(mine.x), mine.y);
      dp.before_backward();
      loss.backward();
      opt.step();
    }
    const auto& t = dp.last_step();
    CHECK(t.synchronized);
    CHECK(t.bucket_count == model->parameters().size());
    CHECK(t.forward_s > 0);
    CHECK(t.backward_s > 0);
    CHECK(t.communication_s > 0);
    CHECK(t.exposed_communication_s >= 0);
    CHECK(t.bucket_bytes > 0);
    dp.write_trace();
    if (rank == 0) {
      std::ifstream in(path);
      CHECK(in.good());  // not REQUIRE: the other ranks go on to collectives below
      const auto trace =
          in.good() ? nlohmann::json::parse(in) : nlohmann::json{{"traceEvents", nlohmann::json::array()}};
      std::set<int> pids;
      std::size_t backward = 0, allreduce = 0, waits = 0;
      for (const auto& event : trace["traceEvents"]) {
        if (event["ph"] != "X") continue;
        pids.insert(event["pid"].get<int>());
        const std::string name = event["name"];
        backward += name == "backward";
        allreduce += name.rfind("allreduce bucket", 0) == 0;
        waits += name == "wait for reduction";
        CHECK(event["dur"].get<double>() >= 0);
      }
      CHECK(static_cast<int>(pids.size()) == n);
      CHECK(backward == 3u * n);
      CHECK(allreduce == 3u * n * model->parameters().size());
      CHECK(waits == 3u * n);
      std::filesystem::remove(path);
    }
    // One more step after writing: the destructor writes it to a file per rank.
    opt.zero_grad();
    const Batch mine = slice(global_batch(9, 4 * n, torch::kFloat32), rank, n);
    torch::mse_loss(model->forward(mine.x), mine.y).backward();
  }
  const std::string mine = path.substr(0, path.size() - 5) + ".rank" + std::to_string(rank) + ".json";
  CHECK(std::filesystem::exists(mine));
  std::filesystem::remove(mine);

  // A trace enabled on rank 0 alone (for "one file"): write_trace() is collective, and fails on
  // every rank instead of rank 0 waiting in the merge for ranks that raise.
  {
    Mlp model = make_model(torch::kFloat32, false);
    DataParallel dp(model, comm_ptr(), DataParallelOptions{});
    if (rank == 0) dp.enable_trace(path);
    const std::string error = lockstep::testing::error_of([&] { dp.write_trace(); });
    INFO(error);
    if (n > 1) {
      CHECK_THAT(error, Catch::Contains("DataParallel::write_trace: the ranks disagree on enable_trace() called: yes on "
                                        "rank 0; no on rank") &&
                            Catch::Contains("Call enable_trace(path) on every rank"));
    } else {
      CHECK(error.empty());
    }
    CHECK(lockstep::testing::communicator_healthy());
  }
  std::filesystem::remove(path);
  std::filesystem::remove(path.substr(0, path.size() - 5) + ".rank0.json");
}
