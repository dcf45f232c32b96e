// SyncBatchNorm against the single-process oracle: N ranks, each with its slice of a batch (sizes
// unequal, one rank possibly empty), must produce one process's BatchNorm2d outputs, input gradients,
// summed parameter gradients and running statistics on the whole batch; under DataParallel, K steps
// of training must leave the model where one process training on the concatenated batch leaves it.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/comm/work.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/sync_batch_norm.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/counting_communicator.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using lockstep::testing::same_on_every_rank;
using Catch::Matchers::Contains;
using lockstep::ddp::DataParallel;
using lockstep::ddp::DataParallelOptions;
using lockstep::ddp::SyncBatchNorm;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::CountingCommunicator;

bool close(const torch::Tensor& a, const torch::Tensor& b, double tol = 1e-5) {
  return a.sizes() == b.sizes() && torch::allclose(a, b, tol, tol);
}

// Samples per rank: unequal, and at 3 ranks the middle rank has none.
std::vector<int64_t> slice_sizes(int world) {
  if (world == 3) return {3, 0, 2};
  std::vector<int64_t> sizes;
  for (int r = 0; r < world; ++r) sizes.push_back(2 + r);
  return sizes;
}

// conv -> SyncBN (4-D) -> relu -> fc -> SyncBN ([N, C]) -> relu -> fc. With `Norm` = BatchNorm
// modules, the single-process oracle.
template <typename Norm2d, typename Norm1d>
struct TwoNormNetImpl : torch::nn::Module {
  TwoNormNetImpl() {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 6, 3).padding(1)));
    bn_conv = register_module("bn_conv", Norm2d(6));
    fc1 = register_module("fc1", torch::nn::Linear(6 * 4 * 4, 10));
    bn_fc = register_module("bn_fc", Norm1d(10));
    fc2 = register_module("fc2", torch::nn::Linear(10, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h = torch::relu(bn_conv(conv(x))).flatten(1);
    return fc2(torch::relu(bn_fc(fc1(h))));
  }
  torch::nn::Conv2d conv{nullptr};
  Norm2d bn_conv{nullptr};
  torch::nn::Linear fc1{nullptr};
  Norm1d bn_fc{nullptr};
  torch::nn::Linear fc2{nullptr};
};
using SyncNetImpl = TwoNormNetImpl<SyncBatchNorm, SyncBatchNorm>;
using PlainNetImpl = TwoNormNetImpl<torch::nn::BatchNorm2d, torch::nn::BatchNorm1d>;

void copy_state(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto a = from.parameters();
  auto b = to.parameters();
  for (std::size_t i = 0; i < a.size(); ++i) b[i].copy_(a[i]);
  auto c = from.buffers();
  auto d = to.buffers();
  for (std::size_t i = 0; i < c.size(); ++i) d[i].copy_(c[i]);
}

}  // namespace

TEST_CASE("SyncBatchNorm: forward, backward and running statistics are one process's on the whole batch",
          "[syncbn]") {
  const int world = comm().size();
  const int rank = comm().rank();
  const std::vector<int64_t> sizes = slice_sizes(world);
  int64_t total = 0;
  int64_t offset = 0;
  for (int r = 0; r < world; ++r) {
    if (r < rank) offset += sizes[r];
    total += sizes[r];
  }
  SyncBatchNorm sync(torch::nn::BatchNormOptions(5).momentum(0.3));
  torch::nn::BatchNorm2d oracle(torch::nn::BatchNormOptions(5).momentum(0.3));
  {
    torch::NoGradGuard no_grad;
    torch::manual_seed(11);
    oracle->weight.uniform_(0.5, 2);
    oracle->bias.uniform_(-1, 1);
    sync->weight.copy_(oracle->weight);
    sync->bias.copy_(oracle->bias);
  }
  CHECK(lockstep::ddp::attach_sync_batch_norm(*sync, comm_ptr()) == 1);
  CHECK(sync->synchronised());

  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    // The same global batch on every rank (same seed); a mean far from 0 tests the variance's stability.
    torch::manual_seed(100 + step);
    const torch::Tensor x_all = torch::randn({total, 5, 3, 4}) * 3 + 50;
    const torch::Tensor g_all = torch::randn({total, 5, 3, 4});
    const torch::Tensor x_mine = x_all.narrow(0, offset, sizes[rank]).clone().requires_grad_(true);
    const torch::Tensor x_ref = x_all.clone().requires_grad_(true);
    sync->weight.mutable_grad() = torch::Tensor();
    sync->bias.mutable_grad() = torch::Tensor();
    oracle->weight.mutable_grad() = torch::Tensor();
    oracle->bias.mutable_grad() = torch::Tensor();

    const torch::Tensor y_mine = sync->forward(x_mine);
    const torch::Tensor y_ref = oracle->forward(x_ref);
    CHECK(close(y_mine, y_ref.narrow(0, offset, sizes[rank])));
    // A linear functional of the output: its gradient is g, with no 1/batch to account for.
    (y_mine * g_all.narrow(0, offset, sizes[rank])).sum().backward();
    (y_ref * g_all).sum().backward();
    CHECK(close(x_mine.grad(), x_ref.grad().narrow(0, offset, sizes[rank]), 1e-4));
    // Parameter gradients are this rank's share: their sum over ranks is the whole batch's.
    torch::Tensor dw = sync->weight.grad().clone();
    torch::Tensor db = sync->bias.grad().clone();
    comm().allreduce(dw)->wait();
    comm().allreduce(db)->wait();
    CHECK(close(dw, oracle->weight.grad(), 1e-4));
    CHECK(close(db, oracle->bias.grad(), 1e-4));
    CHECK(close(sync->running_mean, oracle->running_mean, 1e-4));
    CHECK(close(sync->running_var, oracle->running_var, 1e-4));
    CHECK(torch::equal(sync->num_batches_tracked, oracle->num_batches_tracked));
    CHECK(same_on_every_rank(sync->running_mean));
    CHECK(same_on_every_rank(sync->running_var));
  }
  // Eval mode normalises with the (identical) running statistics, locally.
  sync->eval();
  oracle->eval();
  const torch::Tensor x = torch::randn({2, 5, 2, 2}) + 50;
  CHECK(close(sync->forward(x), oracle->forward(x), 1e-4));
}

TEST_CASE("SyncBatchNorm: bfloat16 inputs are normalised in float32 and returned in bfloat16", "[syncbn]") {
  const int world = comm().size();
  const int rank = comm().rank();
  SyncBatchNorm sync(3);
  torch::nn::BatchNorm2d oracle(3);
  lockstep::ddp::attach_sync_batch_norm(*sync, comm_ptr());
  torch::manual_seed(21);
  const torch::Tensor x = (torch::randn({2 * world, 3, 4, 4}) * 4 + 7).to(torch::kBFloat16);
  const torch::Tensor g = torch::randn({2 * world, 3, 4, 4});
  const torch::Tensor mine = x.narrow(0, 2 * rank, 2).clone().requires_grad_(true);
  const torch::Tensor whole = x.to(torch::kFloat).requires_grad_(true);
  const torch::Tensor y = sync->forward(mine);
  CHECK(y.scalar_type() == torch::kBFloat16);
  (y.to(torch::kFloat) * g.narrow(0, 2 * rank, 2)).sum().backward();
  const torch::Tensor y_ref = oracle->forward(whole);
  (y_ref * g).sum().backward();
  CHECK(mine.grad().scalar_type() == torch::kBFloat16);
  // Only the output's and the gradient's final rounding to bfloat16 (8 significant bits) differ.
  CHECK(torch::allclose(y.to(torch::kFloat), y_ref.narrow(0, 2 * rank, 2), 1e-2, 1e-2));
  CHECK(torch::allclose(mine.grad().to(torch::kFloat), whole.grad().narrow(0, 2 * rank, 2), 1e-2, 1e-2));
  CHECK(close(sync->running_var, oracle->running_var, 1e-4));
}

TEST_CASE("SyncBatchNorm: one all-gather in forward, one in backward, none in eval mode or once detached",
          "[syncbn]") {
  auto counting = std::make_shared<CountingCommunicator>(comm_ptr());
  SyncBatchNorm sync(4);
  lockstep::ddp::attach_sync_batch_norm(*sync, counting);
  const torch::Tensor x = torch::randn({3, 4, 2, 2}, torch::requires_grad());
  torch::Tensor y = sync->forward(x);
  CHECK(counting->calls == 1);
  y.sum().backward();
  CHECK(counting->calls == 2);
  CHECK(counting->allgathers == 2);
  {
    torch::NoGradGuard no_grad;  // no backward to come: only the forward's all-gather
    sync->forward(x);
  }
  CHECK(counting->calls == 3);
  sync->eval();
  sync->forward(x).sum().backward();
  CHECK(counting->calls == 3);
  sync->train();
  // Double backward would differentiate through collectives that are not: an error, on every rank.
  const torch::Tensor y2 = sync->forward(x);
  CHECK_THROWS_WITH(torch::autograd::grad({y2.pow(2).sum()}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true),
                    Contains("no double backward"));
  counting->calls = 3;
  CHECK(lockstep::ddp::detach_sync_batch_norm(*sync) == 1);
  sync->forward(x).sum().backward();
  CHECK(counting->calls == 3);
  CHECK_FALSE(sync->synchronised());
}

TEST_CASE("SyncBatchNorm under DataParallel: K steps equal one process on the concatenated batch", "[syncbn]") {
  const int world = comm().size();
  const int rank = comm().rank();
  constexpr int64_t kPerRank = 3;
  torch::manual_seed(5);
  auto model = std::make_shared<SyncNetImpl>();
  auto oracle = std::make_shared<PlainNetImpl>();
  copy_state(*model, *oracle);
  DataParallelOptions options;
  options.sync_batch_norm = true;
  options.first_bucket_cap_mb = 0.0005;  // several buckets, launched between the layers' all-gathers
  auto dp = std::make_unique<DataParallel>(model, comm_ptr(), options);
  CHECK(model->bn_conv->synchronised());
  CHECK(model->bn_fc->layer_index() == 1);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD opt_ref(oracle->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));

  for (int step = 0; step < 4; ++step) {
    torch::manual_seed(200 + step);
    const torch::Tensor x = torch::randn({world * kPerRank, 2, 4, 4});
    const torch::Tensor y = torch::randint(0, 3, {world * kPerRank});
    opt.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x.narrow(0, rank * kPerRank, kPerRank)),
                                         y.narrow(0, rank * kPerRank, kPerRank))
        .backward();
    opt.step();
    opt_ref.zero_grad();
    torch::nn::functional::cross_entropy(oracle->forward(x), y).backward();
    opt_ref.step();
  }
  const auto mine = model->named_parameters();
  const auto ref = oracle->named_parameters();
  for (std::size_t i = 0; i < mine.size(); ++i) {
    INFO(mine[i].key());
    CHECK(close(mine[i].value(), ref[i].value(), 1e-4));
  }
  const auto mine_b = model->named_buffers();
  const auto ref_b = oracle->named_buffers();
  for (std::size_t i = 0; i < mine_b.size(); ++i) {
    INFO(mine_b[i].key());
    CHECK(close(mine_b[i].value().to(torch::kDouble), ref_b[i].value().to(torch::kDouble), 1e-4));
    // Bitwise equal on every rank without the buffer broadcast (which leaves SyncBatchNorm's out).
    CHECK(same_on_every_rank(mine_b[i].value()));
  }
  dp.reset();
  CHECK_FALSE(model->bn_conv->synchronised());  // DataParallel detaches what it attached
}

TEST_CASE("SyncBatchNorm with find_unused_parameters: a layer one rank alone uses does not put its bucket "
          "among the layers' all-gathers (Note [SyncBatchNorm among the buckets])",
          "[syncbn]") {
  // `aux`, registered last, is bucket 0 (one parameter per bucket): used on rank 0 alone, it filled
  // and launched there before the SyncBatchNorm layer's backward all-gather, and only at the end of
  // backward on the other ranks, whose first collective was that all-gather.
  struct Net : torch::nn::Module {
    Net() {
      conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3).padding(1)));
      bn = register_module("bn", SyncBatchNorm(4));
      head = register_module("head", torch::nn::Linear(4 * 4 * 4, 3));
      aux = register_module("aux", torch::nn::Linear(4 * 4 * 4, 2));
    }
    torch::nn::Conv2d conv{nullptr};
    SyncBatchNorm bn{nullptr};
    torch::nn::Linear head{nullptr}, aux{nullptr};
  };
  const int rank = comm().rank();
  torch::manual_seed(6);
  auto model = std::make_shared<Net>();
  DataParallelOptions options;
  options.sync_batch_norm = true;
  options.find_unused_parameters = true;
  options.bucket_cap_mb = 0;
  options.first_bucket_cap_mb = 0;
  DataParallel dp(model, comm_ptr(), options);
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int step = 0; step < 3; ++step) {
    torch::manual_seed(300 + step + rank);
    const torch::Tensor x = torch::randn({3, 1, 4, 4});
    opt.zero_grad();
    torch::Tensor rank0_aux_grad = torch::zeros_like(model->aux->weight);
    const std::string error = lockstep::testing::error_of([&] {
      const torch::Tensor h = torch::relu(model->bn(model->conv(x))).flatten(1);
      torch::Tensor loss = model->head(h).pow(2).mean();
      if (rank == 0) {
        loss = loss + model->aux(h).pow(2).mean();
        // d mean(out^2) / dW for out = h W^T + b: 2 out^T h / out.numel(), from this rank's h alone.
        torch::NoGradGuard no_grad;
        const torch::Tensor out = model->aux(h);
        rank0_aux_grad = out.t().mm(h) * (2.0 / static_cast<double>(out.numel()));
      }
      loss.backward();
    });
    INFO("step " << step << ": " << error);
    REQUIRE(error.empty());
    // aux's gradient is rank 0's, averaged over the world (every other rank contributes zero).
    comm().broadcast(rank0_aux_grad, {0})->wait();
    CHECK(same_on_every_rank(model->aux->weight.grad()));
    CHECK(torch::allclose(model->aux->weight.grad(), rank0_aux_grad / comm().size(), 1e-4, 1e-6));
    opt.step();
  }
  CHECK(lockstep::testing::identical_across_ranks(*model));
}

TEST_CASE("SyncBatchNorm: a DataParallel that dies leaves the layers a newer one attached", "[syncbn]") {
  auto model = std::make_shared<SyncNetImpl>();
  DataParallelOptions options;
  options.sync_batch_norm = true;
  auto first = std::make_unique<DataParallel>(model, comm_ptr(), options);
  auto second = std::make_unique<DataParallel>(model, comm_ptr(), options);  // e.g. a second fit()
  first.reset();
  CHECK(model->bn_conv->synchronised());
  CHECK(model->bn_fc->synchronised());
  CHECK(model->bn_fc->layer_index() == 1);
  second.reset();
  CHECK_FALSE(model->bn_conv->synchronised());
  CHECK_FALSE(model->bn_fc->synchronised());
  // A layer attached by hand after DataParallel was built stays attached when it goes, too.
  second = std::make_unique<DataParallel>(model, comm_ptr(), options);
  lockstep::ddp::attach_sync_batch_norm(*model, comm_ptr());
  second.reset();
  CHECK(model->bn_conv->synchronised());
  CHECK(lockstep::ddp::detach_sync_batch_norm(*model) == 2);
}

TEST_CASE("SyncBatchNorm: clear errors on every rank for a model without it and for ranks out of step",
          "[syncbn]") {
  auto plain = std::make_shared<PlainNetImpl>();
  DataParallelOptions options;
  options.sync_batch_norm = true;
  CHECK_THROWS_WITH(DataParallel(plain, comm_ptr(), options),
                    Contains("sync_batch_norm is set") && Contains("no lockstep::ddp::SyncBatchNorm"));

  // Layers attached by hand, DataParallel told nothing of them: its buckets (and a Join) would not be
  // ordered with their collectives. On one rank only, it is the options disagreement on every rank.
  {
    auto attached = std::make_shared<SyncNetImpl>();
    DataParallelOptions unsynced;
    unsynced.find_unused_parameters = true;
    lockstep::ddp::attach_sync_batch_norm(*attached, comm_ptr());
    CHECK_THROWS_WITH(DataParallel(attached, comm_ptr(), unsynced),
                      Contains("SyncBatchNorm layer 'bn_conv' is attached to a communicator") &&
                          Contains("DataParallelOptions::sync_batch_norm is false"));
    if (comm().rank() != 0) lockstep::ddp::detach_sync_batch_norm(*attached);
    CHECK_THROWS_WITH(DataParallel(attached, comm_ptr(), unsynced), Contains("SyncBatchNorm attached by hand"));
    lockstep::ddp::detach_sync_batch_norm(*attached);
    CHECK_NOTHROW(DataParallel(attached, comm_ptr(), unsynced));  // per-rank batch norm
    lockstep::ddp::attach_sync_batch_norm(*attached, comm_ptr());
    unsynced.sync_batch_norm = true;
    CHECK_NOTHROW(DataParallel(attached, comm_ptr(), unsynced));  // DataParallel attaches them itself
  }

  // Ranks run two layers of the same width in different orders: the first all-gather pairs layer a
  // on rank 0 with layer b elsewhere, and every rank names both.
  auto model = std::make_shared<SyncNetImpl>();
  SyncBatchNorm second(model->register_module("bn_extra", SyncBatchNorm(6)));
  lockstep::ddp::attach_sync_batch_norm(*model, comm_ptr());
  const torch::Tensor x = torch::randn({2, 6, 2, 2});
  auto run = [&] {
    if (comm().rank() == 0) return second(model->bn_conv(x));
    return model->bn_conv(second(x));
  };
  CHECK_THROWS_WITH(run(), Contains("out of step") && Contains("rank 0: layer #0 'bn_conv' (forward)") &&
                               Contains("rank 1: layer #2 'bn_extra' (forward)"));
  lockstep::ddp::detach_sync_batch_norm(*model);
}

TEST_CASE("SyncBatchNorm: ResNet-18 trained by the trainer with ddp.sync_batch_norm keeps identical statistics",
          "[syncbn]") {
  lockstep::models::ResNet18Options o;
  o.width = 4;
  o.num_classes = 4;
  o.in_channels = 1;
  o.stem = lockstep::models::Stem::Small;
  torch::manual_seed(7);
  lockstep::models::ResNet18 model(o);
  lockstep::train::TrainerOptions options = lockstep::testing::quiet_trainer(1, 3);
  options.batch_size = 2;  // per rank: BatchNorm over 2 samples alone would be noisy
  options.ddp.sync_batch_norm = true;
  options.ddp.broadcast_buffers = false;
  auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.05));
  lockstep::train::DistributedTrainer trainer(model, opt, comm_ptr(), options);
  const auto metrics = trainer.fit(lockstep::testing::synthetic_images(6 * comm().size(), 8, 1),
                                   lockstep::testing::synthetic_images(8, 8, 2));
  CHECK(metrics.count("test_acc") == 1);
  for (const auto& item : model->named_buffers()) {
    INFO(item.key());
    CHECK(same_on_every_rank(item.value()));
  }
  CHECK(lockstep::testing::identical_across_ranks(*model));
}
