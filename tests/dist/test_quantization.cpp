// Quantization-aware training inside data-parallel training at 2 and 3 ranks: activation ranges that
// are the global batch's and bitwise equal on every rank, weights at their int8 values in the forward
// pass, a step equal to the single-process step on the concatenated batch at the int8 weights, the
// int8 export equal to the trained model, bitwise resume, and a clear error when ranks disagree.
// Every rank walks the same path (CHECK, not REQUIRE).
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "lockstep/compress/fake_quant.hpp"
#include "lockstep/compress/pruning.hpp"
#include "lockstep/compress/quantization.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"

namespace {

using lockstep::testing::same_on_every_rank;
using lockstep::compress::ActivationFakeQuant;
using lockstep::compress::QuantizationAwareTraining;
using lockstep::compress::QuantizationOptions;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::identical_across_ranks;
using lockstep::testing::SmallConvNet;
using lockstep::train::Callback;
using lockstep::train::DistributedTrainer;
using lockstep::train::TrainerContext;
using lockstep::train::TrainerOptions;

std::shared_ptr<lockstep::data::SyntheticDataset> images(int64_t size, uint64_t seed) {
  return lockstep::testing::synthetic_images(size, 8, seed);
}

TrainerOptions options(int64_t epochs) { return lockstep::testing::quiet_trainer(epochs, 9); }

std::shared_ptr<torch::optim::SGD> sgd(torch::nn::Module& model, double momentum) {
  return std::make_shared<torch::optim::SGD>(model.parameters(),
                                             torch::optim::SGDOptions(0.1).momentum(momentum).weight_decay(momentum > 0 ? 1e-3 : 0));
}

QuantizationOptions quiet_quant() {
  QuantizationOptions o;
  o.print_table = false;
  return o;
}

// Collective: `local` from every rank, concatenated along dim 0 in rank order.
at::Tensor gather(const at::Tensor& local) {
  const at::Tensor input = local.contiguous();
  std::vector<int64_t> shape = input.sizes().vec();
  shape[0] *= comm().size();
  at::Tensor all = torch::empty(shape, input.options());
  comm().allgather(input, all)->wait();
  return all;
}

// How far the weight is from its int8 grid (in steps of its own per-channel scale).
double off_grid(const at::Tensor& weight) {
  const at::Tensor scale = lockstep::compress::weight_scale(weight, true);
  std::vector<int64_t> shape(static_cast<size_t>(weight.dim()), 1);
  shape[0] = -1;
  const at::Tensor steps = weight.detach() / scale.view(shape);
  return (steps - steps.round()).abs().max().item<double>();
}

}  // namespace

TEST_CASE("quantization: activation ranges are the global batch's, bitwise on every rank", "[quant]") {
  // Added after the QAT callback: sees the int8 weights at batch begin and the updated ranges after
  // backward, and computes the expected ranges independently from the gathered batches.
  struct Probe : Callback {
    SmallConvNet net;
    at::Tensor expected_min, expected_max;
    int64_t steps = 0, range_mismatches = 0, weights_off_grid = 0, weights_not_restored = 0, ranks_differ = 0;
    explicit Probe(SmallConvNet net) : net(std::move(net)) {}
    void on_batch_begin(TrainerContext& ctx) override {
      const at::Tensor all = gather(ctx.batch.data);
      const at::Tensor lo = all.min(), hi = all.max();
      expected_min = expected_min.defined() ? expected_min + (lo - expected_min) * 0.5 : lo;
      expected_max = expected_max.defined() ? expected_max + (hi - expected_max) * 0.5 : hi;
      for (const at::Tensor* w : {&net->conv->weight, &net->fc->weight}) weights_off_grid += off_grid(*w) > 1e-3;
    }
    void on_after_backward(TrainerContext& ctx) override {
      range_mismatches += !torch::equal(net->quant_input->min_val, expected_min);
      range_mismatches += !torch::equal(net->quant_input->max_val, expected_max);
      // The float weights are back (random initial values are off the grid).
      weights_not_restored += off_grid(net->fc->weight) < 1e-3;
      ranks_differ += !same_on_every_rank(net->quant_relu->min_val) || !same_on_every_rank(net->quant_relu->max_val);
      ++steps;
    }
  };
  torch::manual_seed(3);
  SmallConvNet model(/*batch_norm=*/false, /*quantize_activations=*/true);
  DistributedTrainer trainer(model, sgd(*model, 0.9), comm_ptr(), options(2));
  QuantizationOptions o = quiet_quant();
  o.averaging_constant = 0.5;
  auto qat = std::make_shared<QuantizationAwareTraining>(o);
  auto probe = std::make_shared<Probe>(model);
  trainer.add_callback(qat);
  trainer.add_callback(probe);
  const auto metrics = trainer.fit(images(12 * comm().size() + 1, 4), images(10, 5));  // a short last batch too
  CHECK(probe->steps == 8);
  CHECK(probe->range_mismatches == 0);
  CHECK(probe->weights_off_grid == 0);
  CHECK(probe->weights_not_restored == 0);
  CHECK(probe->ranks_differ == 0);
  CHECK(model->quant_input->updates.item<int64_t>() == 8);
  CHECK(model->quant_relu->max_val.item<float>() > 0);
  CHECK(metrics.at("quant_active") == 1.0);
  CHECK(metrics.at("quant_weight_sqnr_db") > 30.0);
  CHECK(qat->activation_points() == std::vector<std::string>{"quant_input", "quant_relu"});
  // After fit the model holds the int8 values of its weights.
  CHECK(off_grid(model->conv->weight) < 1e-3);
  CHECK(identical_across_ranks(*model));
}

TEST_CASE("quantization: a step is the single-process step on the concatenated batch at the int8 weights", "[quant]") {
  // Added before the QAT callback: records the float weights and the global batch of the first step.
  struct Record : Callback {
    std::vector<at::Tensor> before, after;
    at::Tensor data, target;
    void on_batch_begin(TrainerContext& ctx) override {
      if (ctx.global_step != 0) return;
      for (const auto& p : ctx.model->parameters()) before.push_back(p.detach().clone());
      data = gather(ctx.batch.data);
      target = gather(ctx.batch.target);
    }
    void on_after_optimizer_step(TrainerContext& ctx) override {
      if (ctx.global_step != 1) return;
      for (const auto& p : ctx.model->parameters()) after.push_back(p.detach().clone());
    }
  };
  torch::manual_seed(4);
  SmallConvNet model;
  TrainerOptions t = options(1);
  t.stop_after_steps = 1;
  DistributedTrainer trainer(model, sgd(*model, 0.0), comm_ptr(), t);
  QuantizationOptions o = quiet_quant();
  o.activations = false;
  auto record = std::make_shared<Record>();
  trainer.add_callback(record);
  trainer.add_callback(std::make_shared<QuantizationAwareTraining>(o));
  trainer.fit(images(8 * comm().size(), 6), nullptr);

  // The oracle: one process, the whole batch, the weights replaced by their int8 values, plain SGD.
  SmallConvNet oracle;
  {
    torch::NoGradGuard no_grad;
    auto params = oracle->parameters();
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(record->before[i]);
    oracle->conv->weight.copy_(lockstep::compress::fake_quantize_weight(record->before[0], true));
    oracle->fc->weight.copy_(lockstep::compress::fake_quantize_weight(record->before[2], true));
  }
  torch::nn::functional::cross_entropy(oracle->forward(record->data), record->target).backward();
  REQUIRE(record->after.size() == 4);
  const auto grads = oracle->parameters();
  double worst = 0.0;
  for (size_t i = 0; i < 4; ++i) {
    // The optimizer moved the float weights (not the int8 values) by the gradient taken at the int8 values.
    const at::Tensor expected = record->before[i] - 0.1 * grads[i].grad();
    worst = std::max(worst, (record->after[i] - expected).abs().max().item<double>());
  }
  CHECK(worst < 1e-6);
  CHECK(off_grid(record->after[0]) > 1e-3);
}

TEST_CASE("quantization: the int8 export computes what the trained model computes", "[quant]") {
  const std::string dir = lockstep::testing::shared_temp_dir("quant_export");
  torch::manual_seed(5);
  SmallConvNet model(/*batch_norm=*/true, /*quantize_activations=*/true);
  DistributedTrainer trainer(model, sgd(*model, 0.9), comm_ptr(), options(2));
  QuantizationOptions o = quiet_quant();
  o.begin_epoch = 0.5;
  o.freeze_epoch = 1.5;
  o.export_path = dir + "/model.int8";
  auto qat = std::make_shared<QuantizationAwareTraining>(o);
  trainer.add_callback(qat);
  const auto metrics = trainer.fit(images(16 * comm().size(), 7), images(24, 8));
  CHECK(qat->frozen());
  // 4 steps per epoch: ranges observed in steps 2..5, frozen from step 6.
  CHECK(model->quant_relu->updates.item<int64_t>() == 4);
  CHECK(std::filesystem::exists(o.export_path));

  torch::manual_seed(6);
  SmallConvNet loaded(true, true);
  lockstep::compress::load_int8(*loaded, o.export_path);
  model->eval();
  loaded->eval();
  torch::manual_seed(7);
  const at::Tensor x = torch::rand({6, 1, 8, 8});
  CHECK(torch::equal(model->forward(x), loaded->forward(x)));
  // The last evaluation measured the int8 model: the loaded model gets the same accuracy.
  const auto test_set = images(24, 8);
  std::vector<int64_t> all(24);
  for (int64_t i = 0; i < 24; ++i) all[static_cast<size_t>(i)] = i;
  const auto batch = test_set->get_batch(all);
  const int64_t correct = loaded->forward(batch.data).argmax(1).eq(batch.target).sum().item<int64_t>();
  CHECK(static_cast<double>(correct) / 24.0 == Approx(metrics.at("test_acc")));
}

TEST_CASE("quantization: stop and resume keeps the ranges and the schedule, bitwise", "[quant]") {
  int64_t first_step = -1;  // of the last run (-1: it took no step)
  auto run = [&first_step](const std::string& dir, int64_t stop_after, const std::string& resume) {
    torch::manual_seed(31 + comm().rank());
    SmallConvNet model(/*batch_norm=*/true, /*quantize_activations=*/true);
    TrainerOptions t = lockstep::testing::resumable(options(3), dir, stop_after, resume);
    DistributedTrainer trainer(model, sgd(*model, 0.9), comm_ptr(), t);
    QuantizationOptions o = quiet_quant();
    o.begin_step = 2;
    o.freeze_step = 7;
    trainer.add_callback(std::make_shared<QuantizationAwareTraining>(o));
    auto first = std::make_shared<lockstep::testing::FirstStep>();
    trainer.add_callback(first);
    trainer.fit(images(12 * comm().size(), 3), nullptr);  // 3 steps per epoch
    first_step = first->step;
    return lockstep::testing::state_of(*model);
  };
  const auto full = run(lockstep::testing::shared_temp_dir("quant_full"), 0, "never");
  for (int64_t stop : {1, 4, 7}) {  // before quantization, while observing, at the freeze
    INFO("stopped after step " << stop);
    const std::string dir = lockstep::testing::shared_temp_dir("quant_stop" + std::to_string(stop));
    run(dir, stop, "auto");
    const auto resumed = run(dir, 0, "auto");
    CHECK(first_step == stop);  // from the stop's checkpoint, not from the start
    bool equal = resumed.size() == full.size();
    for (size_t i = 0; equal && i < full.size(); ++i) equal = equal && torch::equal(full[i], resumed[i]);
    CHECK(equal);
  }
}

TEST_CASE("quantization: a run resumed at an epoch's end evaluates that epoch as the uninterrupted run did", "[quant]") {
  // Quantization begins with epoch 2 (step 3). A run stopped after step 3, epoch 1's last, evaluates
  // epoch 1 when resumed: before, it did so with int8 weights (the state of step 3, not 2).
  struct EpochMetrics : Callback {
    std::map<int64_t, std::map<std::string, double>> by_epoch;
    void on_epoch_end(TrainerContext& ctx) override { by_epoch[ctx.epoch] = ctx.metrics; }
  };
  int64_t first_step = -1;  // of the last run (-1: it took no step)
  auto run = [&first_step](const std::string& dir, int64_t stop_after, const std::string& resume) {
    torch::manual_seed(32 + comm().rank());
    SmallConvNet model(/*batch_norm=*/true, /*quantize_activations=*/true);
    TrainerOptions t = lockstep::testing::resumable(options(2), dir, stop_after, resume);
    DistributedTrainer trainer(model, sgd(*model, 0.9), comm_ptr(), t);
    QuantizationOptions o = quiet_quant();
    o.begin_step = 3;
    trainer.add_callback(std::make_shared<QuantizationAwareTraining>(o));
    auto metrics = std::make_shared<EpochMetrics>();
    trainer.add_callback(metrics);
    auto first = std::make_shared<lockstep::testing::FirstStep>();
    trainer.add_callback(first);
    trainer.fit(images(12 * comm().size(), 3), images(16, 5));  // 3 steps per epoch
    first_step = first->step;
    return metrics->by_epoch;
  };
  const auto full = run(lockstep::testing::shared_temp_dir("quant_epoch_full"), 0, "never");
  const std::string dir = lockstep::testing::shared_temp_dir("quant_epoch_stop3");
  CHECK(run(dir, 3, "auto").empty());  // stopped before epoch 1's evaluation
  const auto resumed = run(dir, 0, "auto");
  CHECK(first_step == 3);  // from the stop's checkpoint: a fresh run would evaluate epoch 1 alike
  REQUIRE(full.count(0) == 1);
  REQUIRE(resumed.count(0) == 1);
  CHECK(full.at(0).at("quant_active") == 0.0);
  CHECK(resumed.at(0).at("quant_active") == 0.0);
  CHECK(resumed.at(0).at("test_acc") == full.at(0).at("test_acc"));
  CHECK(resumed.at(0).at("test_loss") == full.at(0).at("test_loss"));
  CHECK(resumed.at(1).at("quant_active") == 1.0);
}

TEST_CASE("quantization: ranks whose activation ranges differ get an error naming the point", "[quant]") {
  // A rogue callback (added before the QAT callback) moves rank 1's range, as a rank that observed its
  // own batch only would.
  struct Diverge : Callback {
    SmallConvNet net;
    explicit Diverge(SmallConvNet net) : net(std::move(net)) {}
    void on_epoch_end(TrainerContext& ctx) override {
      torch::NoGradGuard no_grad;
      if (ctx.world.rank == 1) net->quant_relu->max_val.add_(0.5);
    }
  };
  torch::manual_seed(8);
  SmallConvNet model(false, true);
  DistributedTrainer trainer(model, sgd(*model, 0.0), comm_ptr(), options(1));
  trainer.add_callback(std::make_shared<Diverge>(model));
  trainer.add_callback(std::make_shared<QuantizationAwareTraining>(quiet_quant()));
  CHECK_THROWS_WITH(trainer.fit(images(8 * comm().size(), 3), nullptr),
                    Catch::Contains("activation range of 'quant_relu' differs between rank 0") &&
                        Catch::Contains("and rank 1"));
}

TEST_CASE("quantization: pruning and quantization compose: pruned weights are int8 zeros, the file is plain", "[quant]") {
  const std::string dir = lockstep::testing::shared_temp_dir("quant_pruned");
  torch::manual_seed(12);
  SmallConvNet model(/*batch_norm=*/false, /*quantize_activations=*/true);
  DistributedTrainer trainer(model, sgd(*model, 0.9), comm_ptr(), options(2));
  lockstep::compress::PruningOptions prune;
  prune.schedule = lockstep::compress::PruneSchedule::OneShot;
  prune.target_sparsity = 0.5;
  prune.begin_step = 1;
  prune.print_table = false;
  QuantizationOptions quant = quiet_quant();
  quant.export_path = dir + "/pruned.int8";
  trainer.add_callback(std::make_shared<lockstep::compress::MagnitudePruning>(prune));  // first (compression.md)
  trainer.add_callback(std::make_shared<QuantizationAwareTraining>(quant));
  trainer.fit(images(12 * comm().size(), 4), nullptr);
  // The model holds its int8 values: every pruned weight is zero (small kept ones may round to zero
  // too), and the weights are on the int8 grid.
  auto buffers = model->named_buffers();
  for (const std::string name : {"conv", "fc"}) {
    const at::Tensor w = model->named_parameters()[name + ".weight"];
    const at::Tensor keep = buffers["pruning_masks." + name + "__weight"];
    CHECK(keep.logical_not().sum().item<int64_t>() == w.numel() / 2);
    CHECK(w.masked_select(keep.logical_not()).eq(0).all().item<bool>());
    CHECK(off_grid(w) < 1e-3);
  }
  // The int8 file has no masks: it loads into the plain (unpruned) definition, zeros included.
  SmallConvNet plain(false, true);
  lockstep::compress::load_int8(*plain, quant.export_path);
  CHECK(torch::equal(plain->conv->weight, model->conv->weight));
  CHECK(torch::equal(plain->fc->weight, model->fc->weight));
}

TEST_CASE("quantization: a batch with an inf or a nan activation leaves the ranges as they were, on every rank",
          "[quant]") {
  // At step 2 one rank's batch holds an inf (an overflow): its range would make the scale inf and every
  // later output nan. The injector also zeroes that step's (nan) gradients, so the weights stay finite.
  // A nan must be left out on every rank alike: MPI_MAX keeps or drops a nan by argument order.
  for (const float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
  INFO("the bad value: " << bad);
  struct Overflow : Callback {
    explicit Overflow(float value) : value(value) {}
    float value;
    int64_t step = 0;
    void on_batch_begin(TrainerContext& ctx) override {
      if (++step == 2 && comm().rank() == comm().size() - 1) {
        ctx.batch.data = ctx.batch.data.clone();
        ctx.batch.data.view({-1})[0] = value;
      }
    }
    void on_after_backward(TrainerContext& ctx) override {
      if (step != 2) return;
      for (auto& p : ctx.model->parameters()) p.mutable_grad().zero_();
    }
  };
  torch::manual_seed(4);
  SmallConvNet model(/*batch_norm=*/false, /*quantize_activations=*/true);
  DistributedTrainer trainer(model, sgd(*model, 0.0), comm_ptr(), options(1));
  trainer.add_callback(std::make_shared<QuantizationAwareTraining>(quiet_quant()));
  trainer.add_callback(std::make_shared<Overflow>(bad));
  const auto metrics = trainer.fit(images(16 * comm().size(), 6), images(8, 7));  // 4 steps
  for (const auto* point : {&model->quant_input, &model->quant_relu}) {
    CHECK(std::isfinite((*point)->max_val.item<float>()));
    CHECK(std::isfinite((*point)->min_val.item<float>()));
  }
  CHECK(model->quant_input->updates.item<int64_t>() == 3);  // the bad step is not counted
  CHECK(std::isfinite(metrics.at("test_loss")));
  CHECK(identical_across_ranks(*model));
  }
}
