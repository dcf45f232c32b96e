// MagnitudePruning inside data-parallel training at 2 and 3 ranks: identical masks on every rank,
// pruned weights that stay exactly zero under momentum and weight decay, exact per-layer sparsity,
// masks and schedule position surviving a stop and resume, and a clear error when ranks disagree.
// Every rank walks the same path (CHECK, not REQUIRE).
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "lockstep/compress/pruning.hpp"
#include "lockstep/data/synthetic_dataset.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using lockstep::testing::same_on_every_rank;

namespace fs = std::filesystem;
using lockstep::compress::MagnitudePruning;
using lockstep::compress::PruneGranularity;
using lockstep::compress::PruneSchedule;
using lockstep::compress::PruneScope;
using lockstep::compress::PruningOptions;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::identical_across_ranks;
using lockstep::train::Callback;
using lockstep::train::DistributedTrainer;
using lockstep::train::TrainerContext;
using lockstep::train::TrainerOptions;

struct NetImpl : torch::nn::Module {
  NetImpl()
      : conv(register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)))),
        fc1(register_module("fc1", torch::nn::Linear(8 * 16, 24))),
        fc2(register_module("fc2", torch::nn::Linear(24, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return fc2(torch::relu(fc1(torch::relu(conv(x)).flatten(1))));
  }
  torch::nn::Conv2d conv;
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Net);

std::shared_ptr<lockstep::data::SyntheticDataset> synthetic(int64_t size, uint64_t seed) {
  return lockstep::testing::synthetic_images(size, 4, seed);
}

std::string shared_dir(const std::string& name) { return lockstep::testing::shared_temp_dir("prune_" + name); }

TrainerOptions options(int64_t epochs) { return lockstep::testing::quiet_trainer(epochs, 5); }

std::shared_ptr<torch::optim::SGD> sgd(Net& model) {
  // Momentum and weight decay: both would move a pruned weight off zero if the masks were not applied.
  return std::make_shared<torch::optim::SGD>(
      model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(1e-3));
}

at::Tensor mask_of(torch::nn::Module& model, const std::string& parameter) {
  std::string buffer = "pruning_masks.";
  for (char c : parameter) buffer += c == '.' ? std::string("__") : std::string(1, c);
  for (const auto& b : model.named_buffers()) {
    if (b.key() == buffer) return b.value();
  }
  return {};
}

// After every optimizer step: every pruned weight is exactly zero, and every rank holds the same
// masks and weights.
struct Watcher : Callback {
  explicit Watcher(std::vector<std::string> names) : names(std::move(names)) {}
  void on_after_optimizer_step(TrainerContext& ctx) override {
    for (const auto& name : names) {
      const at::Tensor mask = mask_of(*ctx.model, name);
      const at::Tensor weight = ctx.model->named_parameters()[name];
      if (!mask.defined()) {
        missing_masks++;
        continue;
      }
      revived += weight.masked_select(mask.logical_not()).ne(0).sum().item<int64_t>();
    }
    ++steps;
  }
  std::vector<std::string> names;
  int64_t revived = 0, missing_masks = 0, steps = 0;
};

}  // namespace

TEST_CASE("pruning: gradual pruning keeps masks identical on every rank and pruned weights at zero",
          "[compress]") {
  const int world = comm().size();
  for (auto [granularity, scope] : {std::pair{PruneGranularity::Unstructured, PruneScope::Layer},
                                    std::pair{PruneGranularity::Unstructured, PruneScope::Global},
                                    std::pair{PruneGranularity::Structured, PruneScope::Layer}}) {
    INFO(lockstep::compress::to_string(granularity) << " " << lockstep::compress::to_string(scope));
    torch::manual_seed(10 + comm().rank());  // different inits: DataParallel broadcasts rank 0's
    Net model;
    DistributedTrainer trainer(model, sgd(model), comm_ptr(), options(2));
    PruningOptions o;
    o.granularity = granularity;
    o.scope = scope;
    o.target_sparsity = 0.75;
    o.begin_step = 2;
    o.end_step = 8;
    o.frequency = 2;
    std::vector<std::string> pruned{"conv.weight", "fc1.weight", "fc2.weight"};
    if (granularity == PruneGranularity::Structured) {
      o.include = {"^conv\\.", "^fc1\\."};  // the classifier's rows are its classes
      pruned.pop_back();
    }
    auto pruning = std::make_shared<MagnitudePruning>(o);
    CAPTURE(pruned);
    auto watcher = std::make_shared<Watcher>(pruned);
    trainer.add_callback(pruning);
    trainer.add_callback(watcher);
    const auto metrics = trainer.fit(synthetic(24 * world, 3), synthetic(10, 4));  // 6 steps per epoch

    CHECK(watcher->missing_masks == 0);
    CHECK(watcher->steps == 12);
    CHECK(watcher->revived == 0);
    CHECK(identical_across_ranks(*model));
    // Exact sparsity at the end of the schedule.
    int64_t zeros = 0, numel = 0;
    for (const auto& name : pruning->layers()) {
      const at::Tensor mask = mask_of(*model, name);
      const at::Tensor weight = model->named_parameters()[name];
      CHECK(same_on_every_rank(mask));
      const int64_t pruned = mask.numel() - mask.count_nonzero().item<int64_t>();
      zeros += pruned;
      numel += mask.numel();
      if (scope == PruneScope::Layer) {
        const int64_t unit = granularity == PruneGranularity::Structured ? mask.numel() / mask.size(0) : 1;
        INFO(name);
        CHECK(std::abs(pruned - 0.75 * mask.numel()) <= 0.5 * unit);  // to one element (or one channel)
      }
      CHECK(weight.masked_select(mask.logical_not()).ne(0).sum().item<int64_t>() == 0);
    }
    if (granularity == PruneGranularity::Unstructured && scope == PruneScope::Global) {
      CHECK(zeros == std::llround(0.75 * numel));
    }
    CHECK(metrics.at("sparsity") >= 0.7);
    CHECK(metrics.count("sparsity/fc1.weight") == 1);
    CHECK(metrics.at("sparsity_scheduled") == Approx(0.75));
  }
}

TEST_CASE("pruning: N:M holds in every group after training", "[compress]") {
  torch::manual_seed(20 + comm().rank());
  Net model;
  DistributedTrainer trainer(model, sgd(model), comm_ptr(), options(1));
  PruningOptions o;
  o.granularity = PruneGranularity::NM;
  o.schedule = PruneSchedule::OneShot;
  o.begin_step = 1;
  o.include = {"^fc"};
  auto pruning = std::make_shared<MagnitudePruning>(o);
  trainer.add_callback(pruning);
  trainer.fit(synthetic(24 * comm().size(), 3), nullptr);
  CHECK(pruning->layers() == std::vector<std::string>{"fc1.weight", "fc2.weight"});
  for (const auto& name : pruning->layers()) {
    const at::Tensor groups = model->named_parameters()[name].reshape({-1, 4}).ne(0).sum(1);
    CHECK((groups <= 2).all().item<bool>());
    const at::Tensor mask_groups = mask_of(*model, name).reshape({-1, 4}).sum(1);
    CHECK((mask_groups == 2).all().item<bool>());
  }
  CHECK(identical_across_ranks(*model));
}

TEST_CASE("pruning: stop and resume keeps masks and the schedule position, bitwise", "[compress]") {
  int64_t first_step = -1;  // of the last run (-1: it took no step)
  auto run = [&first_step](const std::string& dir, int64_t stop_after, const std::string& resume) {
    torch::manual_seed(30 + comm().rank());
    Net model;
    TrainerOptions t = lockstep::testing::resumable(options(3), dir, stop_after, resume);
    DistributedTrainer trainer(model, sgd(model), comm_ptr(), t);
    PruningOptions o;
    o.target_sparsity = 0.6;
    o.begin_epoch = 0.5;
    o.end_epoch = 2.0;
    o.frequency = 2;
    trainer.add_callback(std::make_shared<MagnitudePruning>(o));
    auto first = std::make_shared<lockstep::testing::FirstStep>();
    trainer.add_callback(first);
    trainer.fit(synthetic(16 * comm().size(), 3), nullptr);  // 4 steps per epoch: prunes at 2, 4, 6, 8
    first_step = first->step;
    return lockstep::testing::state_of(*model);
  };
  const auto full = run(shared_dir("full"), 0, "never");
  for (int64_t stop : {3, 5, 8}) {  // between pruning steps, and just before the last one
    INFO("stopped after step " << stop);
    const std::string dir = shared_dir("stop" + std::to_string(stop));
    run(dir, stop, "auto");
    const auto resumed = run(dir, 0, "auto");
    CHECK(first_step == stop);  // from the stop's checkpoint, not from the start
    CHECK(resumed.size() == full.size());
    bool equal = resumed.size() == full.size();
    for (size_t i = 0; equal && i < full.size(); ++i) equal = equal && torch::equal(full[i], resumed[i]);
    CHECK(equal);
  }
}

TEST_CASE("pruning from a trained dense model: init_from takes its weights; a resume of it is refused, naming init_from",
          "[compress]") {
  // The dense run: 2 epochs, checkpoints in dense/.
  const std::string dense_dir = shared_dir("dense");
  std::vector<at::Tensor> dense_weights;
  {
    torch::manual_seed(50 + comm().rank());
    Net model;
    DistributedTrainer trainer(model, sgd(model), comm_ptr(), lockstep::testing::resumable(options(2), dense_dir, 0, "never"));
    trainer.fit(synthetic(16 * comm().size(), 3), nullptr);
    dense_weights = lockstep::testing::state_of(*model);
  }
  const std::string file = dense_dir + "/checkpoints/" + lockstep::train::checkpoint_file_name(8);
  PruningOptions o;
  o.target_sparsity = 0.5;
  o.begin_step = 1;
  o.end_step = 5;
  o.frequency = 2;

  // Resuming the dense run with pruning on: the checkpoint has no masks. The error says why and what
  // to do instead.
  {
    torch::manual_seed(51);
    Net model;
    DistributedTrainer trainer(model, sgd(model), comm_ptr(), lockstep::testing::resumable(options(3), dense_dir, 0, "auto"));
    trainer.add_callback(std::make_shared<MagnitudePruning>(o));
    const std::string error = lockstep::testing::error_of([&] { trainer.fit(synthetic(16 * comm().size(), 3), nullptr); });
    CHECK_THAT(error, Catch::Contains("holds no module 'pruning_masks'") && Catch::Contains("Pruning adds") &&
                          Catch::Contains("trainer.init_from"));
  }

  // A new run from the dense weights: they are in place on every rank when training begins, and
  // pruning starts from them.
  struct AtBegin : Callback {
    void on_train_begin(TrainerContext& ctx) override {
      for (const auto& p : ctx.model->parameters()) weights.push_back(p.detach().clone());
      for (const auto& b : ctx.model->buffers()) {
        if (b.is_floating_point()) weights.push_back(b.detach().clone());
      }
    }
    std::vector<at::Tensor> weights;
  };
  torch::manual_seed(52 + comm().rank());
  Net model;
  TrainerOptions t = lockstep::testing::resumable(options(2), shared_dir("pruned"), 0, "auto");
  t.init_from = file;
  DistributedTrainer trainer(model, sgd(model), comm_ptr(), t);
  auto pruning = std::make_shared<MagnitudePruning>(o);
  auto at_begin = std::make_shared<AtBegin>();
  trainer.add_callback(pruning);
  trainer.add_callback(at_begin);
  const auto metrics = trainer.fit(synthetic(16 * comm().size(), 3), nullptr);
  REQUIRE(at_begin->weights.size() == dense_weights.size());
  bool equal = true;
  for (size_t i = 0; i < dense_weights.size(); ++i) equal = equal && torch::equal(at_begin->weights[i], dense_weights[i]);
  CHECK(equal);
  CHECK(metrics.at("sparsity") == Approx(0.5).margin(0.01));
  CHECK(metrics.at("step") == 8);  // from step 0: the dense run's steps are not this run's
  CHECK(identical_across_ranks(*model));

  // The same run again, longer, its init_from file gone meanwhile: it resumes its own checkpoint and
  // never reads the file.
  {
    torch::manual_seed(54);
    Net resumed_model;
    TrainerOptions longer = t;
    longer.epochs = 3;
    longer.init_from = file + ".rotated_away";
    DistributedTrainer resumed(resumed_model, sgd(resumed_model), comm_ptr(), longer);
    resumed.add_callback(std::make_shared<MagnitudePruning>(o));
    const auto again = resumed.fit(synthetic(16 * comm().size(), 3), nullptr);
    CHECK(again.at("step") == 12);
    CHECK(again.at("sparsity") == Approx(0.5).margin(0.01));
  }

  // A file missing on one rank's node (a new run): every rank raises at fit(), naming it.
  TrainerOptions fresh = options(1);
  fresh.init_from = comm().rank() == comm().size() - 1 ? file + ".gone" : file;
  torch::manual_seed(53);
  Net other;
  DistributedTrainer other_trainer(other, sgd(other), comm_ptr(), fresh);
  const std::string error =
      lockstep::testing::error_of([&] { other_trainer.fit(synthetic(16 * comm().size(), 3), nullptr); });
  CHECK_THAT(error, Catch::Contains("weights file " + file + ".gone does not exist"));
  CHECK_THAT(error, Catch::Contains("trainer.init_from"));

  // A stale copy on one node (another file that fits the model): the ranks' weights would differ, so
  // every rank raises.
  const std::string stale = shared_dir("stale") + "/weights.pt";
  if (comm().rank() == 0) {
    torch::manual_seed(55);
    Net different;
    torch::save(different, stale);
  }
  comm().barrier()->wait();
  fresh.init_from = comm().rank() == comm().size() - 1 ? stale : file;
  Net third;
  DistributedTrainer third_trainer(third, sgd(third), comm_ptr(), fresh);
  const std::string differ =
      lockstep::testing::error_of([&] { third_trainer.fit(synthetic(16 * comm().size(), 3), nullptr); });
  CHECK_THAT(differ, Catch::Contains("DistributedTrainer: trainer.init_from: the ranks disagree on the weights it read") &&
                         Catch::Contains("copy the file anew"));
  CHECK(lockstep::testing::communicator_healthy());
}

TEST_CASE("pruning: ranks with different weights at a pruning step get an error naming the layer", "[compress]") {
  // A rogue callback (added before the pruning) perturbs rank 1's weights just before the masks are
  // computed, as a rank with a diverged model would.
  struct Diverge : Callback {
    void on_batch_begin(TrainerContext& ctx) override {
      if (ctx.global_step != 1 || ctx.world.rank != 1) return;
      torch::NoGradGuard no_grad;
      torch::manual_seed(99);
      for (auto& p : ctx.model->parameters()) p.add_(torch::randn_like(p) * 10);
    }
  };
  torch::manual_seed(40);
  Net model;
  DistributedTrainer trainer(model, sgd(model), comm_ptr(), options(1));
  PruningOptions o;
  o.schedule = PruneSchedule::OneShot;
  o.begin_step = 1;
  trainer.add_callback(std::make_shared<Diverge>());
  trainer.add_callback(std::make_shared<MagnitudePruning>(o));
  CHECK_THROWS_WITH(trainer.fit(synthetic(16 * comm().size(), 3), nullptr),
                    Catch::Contains("pruning mask of 'conv.weight' differs between rank 0") &&
                        Catch::Contains("and rank 1"));
}
