// DistributedTrainer at 2 and 3 ranks: callback order and powers, exact metrics, checkpoints, and
// bitwise-identical results after a stop and resume. Every rank walks the same path (CHECK, not REQUIRE).
#include <ATen/CPUGeneratorImpl.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/torch.h>
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "lockstep/data/augment.hpp"
#include "lockstep/data/mnist.hpp"
#include "lockstep/data/subset.hpp"
#include "lockstep/data/synthetic_dataset.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/train/trainer.hpp"
#include "support/dist.hpp"
#include "support/fixtures.hpp"
#include "train/checksum.hpp"

namespace {

using lockstep::testing::bitwise_equal;

namespace fs = std::filesystem;
using lockstep::testing::comm;
using lockstep::testing::comm_ptr;
using lockstep::testing::FirstStep;
using lockstep::train::Callback;
using lockstep::train::DistributedTrainer;
using lockstep::train::TrainerContext;
using lockstep::train::TrainerOptions;

constexpr int64_t kClasses = 4;

struct TinyNetImpl : torch::nn::Module {
  TinyNetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(16, 12))),
        bn(register_module("bn", torch::nn::BatchNorm1d(12))),
        drop(register_module("drop", torch::nn::Dropout(0.25))),
        fc2(register_module("fc2", torch::nn::Linear(12, kClasses))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(drop(torch::relu(bn(fc1(x.flatten(1)))))); }
  torch::nn::Linear fc1;
  torch::nn::BatchNorm1d bn;
  torch::nn::Dropout drop;
  torch::nn::Linear fc2;
};
TORCH_MODULE(TinyNet);

// logits = W x + b with W = 0 and b = (1, 0, 0, 0): every sample's prediction and loss in closed form.
struct FixedLinearImpl : torch::nn::Module {
  FixedLinearImpl() : fc(register_module("fc", torch::nn::Linear(16, kClasses))) {
    torch::NoGradGuard no_grad;
    fc->weight.zero_();
    fc->bias.zero_();
    fc->bias[0] = 1.0;
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc(x.flatten(1)); }
  torch::nn::Linear fc;
};
TORCH_MODULE(FixedLinear);

std::shared_ptr<lockstep::data::SyntheticDataset> synthetic(int64_t size, uint64_t seed = 3) {
  lockstep::data::SyntheticOptions o;
  o.channels = 1;
  o.height = 4;
  o.width = 4;
  o.num_classes = kClasses;
  o.size = size;
  o.seed = seed;
  return std::make_shared<lockstep::data::SyntheticDataset>(o);
}

TrainerOptions quiet(int64_t epochs, size_t batch_size) {
  TrainerOptions o;
  o.epochs = epochs;
  o.batch_size = batch_size;
  o.eval_batch_size = 3;
  o.progress = false;
  o.checkpoints = false;
  o.prefetch = 1;
  o.device = "cpu";  // compared with CPU oracles and bitwise resumes; GPU training is in tests/gpu
  return o;
}

std::string shared_dir(const std::string& name) { return lockstep::testing::shared_temp_dir("train_" + name); }

std::shared_ptr<torch::optim::SGD> sgd(torch::nn::Module& model, double lr, double momentum = 0.0) {
  torch::optim::SGDOptions o(lr);
  o.momentum(momentum);
  if (momentum > 0) o.nesterov(true).weight_decay(1e-4);
  return std::make_shared<torch::optim::SGD>(model.parameters(), o);
}

struct Recorder : Callback {
  std::vector<std::string> events;
  void on_setup(TrainerContext& ctx) override { events.push_back("setup"); }
  void on_train_begin(TrainerContext& ctx) override { events.push_back("train_begin"); }
  void on_train_end(TrainerContext& ctx) override { events.push_back("train_end"); }
  void on_epoch_begin(TrainerContext& ctx) override { events.push_back("epoch_begin " + std::to_string(ctx.epoch)); }
  void on_epoch_end(TrainerContext& ctx) override { events.push_back("epoch_end " + std::to_string(ctx.epoch)); }
  void on_after_epoch_end(TrainerContext& ctx) override {
    events.push_back("after_epoch_end " + std::to_string(ctx.epoch));
  }
  void on_batch_begin(TrainerContext& ctx) override {
    events.push_back("batch_begin " + std::to_string(ctx.batch_in_epoch) + " step " + std::to_string(ctx.global_step));
  }
  void on_after_backward(TrainerContext& ctx) override { events.push_back("after_backward"); }
  void on_after_optimizer_step(TrainerContext& ctx) override {
    events.push_back("after_step " + std::to_string(ctx.global_step));
  }
  void on_evaluation_begin(TrainerContext& ctx) override {
    events.push_back(std::string("evaluation_begin ") + (ctx.metrics.count("test_acc") ? "with test_acc" : "without"));
  }
  void on_evaluation_end(TrainerContext& ctx) override {
    events.push_back(std::string("evaluation_end ") + (ctx.metrics.count("test_acc") ? "with test_acc" : "without"));
  }
};

}  // namespace

TEST_CASE("trainer: callback events come in the documented order", "[train]") {
  const int world = comm().size();
  torch::manual_seed(1);
  TinyNet model;
  auto recorder = std::make_shared<Recorder>();
  DistributedTrainer trainer(model, sgd(*model, 0.1), comm_ptr(), quiet(2, 4));
  trainer.add_callback(recorder);
  trainer.fit(synthetic(12 * world), synthetic(7));  // 3 batches of 4 per rank per epoch

  std::vector<std::string> expected = {"setup", "train_begin"};
  int64_t step = 0;
  for (int epoch = 0; epoch < 2; ++epoch) {
    expected.push_back("epoch_begin " + std::to_string(epoch));
    for (int batch = 0; batch < 3; ++batch) {
      expected.push_back("batch_begin " + std::to_string(batch) + " step " + std::to_string(step));
      expected.push_back("after_backward");
      expected.push_back("after_step " + std::to_string(++step));
    }
    expected.push_back("evaluation_begin without");
    expected.push_back("evaluation_end with test_acc");
    expected.push_back("epoch_end " + std::to_string(epoch));
    expected.push_back("after_epoch_end " + std::to_string(epoch));
  }
  expected.push_back("train_end");
  CHECK(recorder->events == expected);
}

TEST_CASE("trainer: zeroing gradients in on_after_backward makes every step a no-op", "[train]") {
  struct ZeroGrads : Callback {
    void on_after_backward(TrainerContext& ctx) override {
      for (auto& p : ctx.model->parameters()) {
        if (p.grad().defined()) p.grad().zero_();
      }
    }
  };
  torch::manual_seed(2);
  FixedLinear model;
  DistributedTrainer trainer(model, sgd(*model, 0.5), comm_ptr(), quiet(2, 4));
  const auto before = lockstep::testing::state_of(*model);
  trainer.add_callback(std::make_shared<ZeroGrads>());
  trainer.fit(synthetic(10 * comm().size()), nullptr);
  CHECK(bitwise_equal(before, lockstep::testing::state_of(*model)));
}

TEST_CASE("trainer: weights changed in on_after_optimizer_step persist into the next step", "[train]") {
  struct Overwrite : Callback {
    bool saw_overwritten = true;
    int64_t steps = 0;
    void on_batch_begin(TrainerContext& ctx) override {
      if (steps == 0) return;
      for (auto& p : ctx.model->parameters()) saw_overwritten = saw_overwritten && (p == 0.25).all().item<bool>();
    }
    void on_after_optimizer_step(TrainerContext& ctx) override {
      torch::NoGradGuard no_grad;
      for (auto& p : ctx.model->parameters()) p.fill_(0.25);
      ++steps;
    }
  };
  torch::manual_seed(3);
  FixedLinear model;
  DistributedTrainer trainer(model, sgd(*model, 0.5), comm_ptr(), quiet(1, 4));
  auto overwrite = std::make_shared<Overwrite>();
  trainer.add_callback(overwrite);
  trainer.fit(synthetic(12 * comm().size()), nullptr);
  CHECK(overwrite->steps == 3);
  CHECK(overwrite->saw_overwritten);
  for (const auto& p : model->parameters()) CHECK((p == 0.25).all().item<bool>());
}

TEST_CASE("trainer: metrics are exact sums over ranks, each test sample counted once", "[train]") {
  const int world = comm().size();
  const int64_t train_size = 12 * world;
  const int64_t test_size = 11;  // pads the last eval shard at 2 and 3 ranks
  auto train_set = synthetic(train_size, 5);
  auto test_set = synthetic(test_size, 6);
  // lr 0: the fixed model stays fixed, so every loss has a closed form: log(e + 3) - [label == 0].
  auto closed_form = [](const lockstep::data::SyntheticDataset& set) {
    double loss = 0, correct = 0;
    for (int64_t i = 0; i < static_cast<int64_t>(set.size()); ++i) {
      const bool zero = set.label(i) == 0;
      loss += std::log(std::exp(1.0) + 3.0) - (zero ? 1.0 : 0.0);
      correct += zero ? 1.0 : 0.0;
    }
    return std::make_pair(loss / set.size(), correct / set.size());
  };
  FixedLinear model;
  DistributedTrainer trainer(model, sgd(*model, 0.0), comm_ptr(), quiet(1, 5));
  const auto metrics = trainer.fit(train_set, test_set);
  const auto [train_loss, train_acc] = closed_form(*train_set);
  const auto [test_loss, test_acc] = closed_form(*test_set);
  CHECK(metrics.at("train_count") == train_size);
  CHECK(metrics.at("train_loss") == Approx(train_loss).epsilon(1e-6));
  CHECK(metrics.at("train_acc") == Approx(train_acc).epsilon(1e-12));
  CHECK(metrics.at("test_count") == test_size);
  CHECK(metrics.at("test_loss") == Approx(test_loss).epsilon(1e-6));
  CHECK(metrics.at("test_acc") == Approx(test_acc).epsilon(1e-12));
  CHECK(metrics.at("epoch") == 1);
  CHECK(metrics.count("images_per_s") == 1);
  CHECK(metrics.count("backward_ms") == 1);
  // Every metric is the same on every rank, the timings included (each rank's clock differs: the
  // time is the mean over ranks), so a callback that decides on any of them decides alike.
  std::vector<double> values;
  for (const auto& [key, value] : metrics) values.push_back(value);
  CHECK(lockstep::testing::same_on_every_rank(torch::tensor(values, torch::kFloat64)));
}

TEST_CASE("trainer: the optimizer gets the scheduled learning rate", "[train]") {
  struct LrRecorder : Callback {
    std::vector<double> seen, second_group;
    void on_batch_begin(TrainerContext& ctx) override {
      seen.push_back(ctx.optimizer->param_groups().front().options().get_lr());
      second_group.push_back(ctx.optimizer->param_groups().back().options().get_lr());
    }
  };
  const int world = comm().size();
  torch::manual_seed(4);
  TinyNet model;
  TrainerOptions o = quiet(2, 4);
  o.lr.kind = lockstep::train::LrScheduleKind::Cosine;
  o.lr.warmup_steps = 2;
  o.lr.scale_lr_with_world_size = true;
  // Two groups, the second at a tenth of the first's lr: it keeps that proportion under the schedule.
  std::vector<torch::Tensor> parameters = model->parameters();
  const std::vector<torch::Tensor> head(parameters.end() - 2, parameters.end());
  parameters.resize(parameters.size() - 2);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(parameters);
  groups.emplace_back(head, std::make_unique<torch::optim::SGDOptions>(0.01));
  auto two_groups = std::make_shared<torch::optim::SGD>(groups, torch::optim::SGDOptions(0.1));
  DistributedTrainer trainer(model, two_groups, comm_ptr(), o);  // base_lr 0: the first group's 0.1
  auto recorder = std::make_shared<LrRecorder>();
  trainer.add_callback(recorder);
  trainer.fit(synthetic(12 * world), nullptr);
  const double peak = 0.1 * world;
  REQUIRE(recorder->seen.size() == 6);
  CHECK(recorder->seen[0] == Approx(peak / 2));
  CHECK(recorder->seen[1] == Approx(peak));
  CHECK(recorder->seen[2] == Approx(peak));  // cosine starts after the 2 warm-up steps, over 4 steps
  CHECK(recorder->seen[3] == Approx(peak * 0.5 * (1 + std::cos(M_PI / 4))));
  CHECK(recorder->seen[5] == Approx(peak * 0.5 * (1 + std::cos(M_PI * 3 / 4))));
  for (size_t i = 0; i < recorder->seen.size(); ++i) {
    CHECK(recorder->second_group[i] == Approx(recorder->seen[i] * 0.1));
  }
}

namespace {

struct RunResult {
  std::vector<torch::Tensor> state;
  std::map<std::string, double> metrics;
  int64_t first_step = -1;  // global_step before the run's first step (-1: it took none)
};

// Trains TinyNet (batch norm, dropout) on augmented synthetic data for 3 epochs; 54 samples give
// uneven last batches at 2 and 3 ranks.
RunResult resumable_run(const std::string& dir, int64_t stop_after, const std::string& resume,
                        int64_t every_steps = 0, int64_t keep_last = 3,
                        std::vector<std::string> metrics = {"accuracy", "macro_f1"}) {
  torch::manual_seed(100 + comm().rank());  // different inits: only a checkpoint or rank 0 decides
  TinyNet model;
  TrainerOptions o = quiet(3, 4);
  o.seed = 9;
  o.output_dir = dir;
  o.checkpoints = true;
  o.progress = true;
  o.log_every = 0;
  o.stop_after_steps = stop_after;
  o.metrics = std::move(metrics);
  o.checkpoint.resume = resume;
  o.checkpoint.every_steps = every_steps;
  o.checkpoint.keep_last = keep_last;
  o.lr.kind = lockstep::train::LrScheduleKind::Cosine;
  o.lr.warmup_steps = 3;
  o.clip_grad_norm = 1e6;  // never clips (a factor of exactly 1), but reports grad_norm
  DistributedTrainer trainer(model, sgd(*model, 0.05, 0.9), comm_ptr(), o);
  auto first_step = std::make_shared<FirstStep>();
  trainer.add_callback(first_step);
  lockstep::data::AugmentOptions augment;
  augment.pad = 1;
  augment.hflip = true;
  augment.seed = 9;
  auto train_set = std::make_shared<lockstep::data::Augment>(synthetic(54, 7), augment);
  RunResult result;
  result.metrics = trainer.fit(train_set, synthetic(9, 8));
  result.state = lockstep::testing::state_of(*model);
  result.first_step = first_step->step;
  return result;
}

// The epochs' lines of <dir>/metrics.jsonl.
std::vector<nlohmann::json> metrics_lines(const std::string& dir) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

// Rewrites the checkpoint at `path` as a run on a GPU would have written it: every tensor's storage
// says it lives on `location` ("cuda:0"); the bytes of the data are unchanged. LibTorch's pickler
// writes a storage's device as a string (BINUNICODE: 'X', a 4-byte little-endian length, the bytes)
// once and refers back to it after that, so replacing that one string relocates them all. Returns
// how many it replaced (0: the format changed and the test would prove nothing).
int relocate_tensors(const std::string& path, const std::string& location) {
  auto unicode = [](const std::string& text) {
    const auto size = static_cast<std::uint32_t>(text.size());
    std::string out("X");
    out.append(reinterpret_cast<const char*>(&size), sizeof size);
    return out + text;
  };
  const std::string from = unicode("cpu"), to = unicode(location);
  std::vector<std::pair<std::string, std::string>> records;
  std::uint64_t version = 0;
  {
    caffe2::serialize::PyTorchStreamReader reader(path);
    version = reader.version();
    for (const std::string& name : reader.getAllRecords()) {
      at::DataPtr data;
      size_t size = 0;
      std::tie(data, size) = reader.getRecord(name);
      records.emplace_back(name, std::string(static_cast<const char*>(data.get()), size));
    }
  }
  int replaced = 0;
  const std::string relocated = path + ".relocated";
  lockstep::train::ChecksumWriter file(relocated);  // as the Checkpointer writes (Note [Checksummed files])
  {
    caffe2::serialize::PyTorchStreamWriter writer([&file](const void* data, size_t size) {
      file.write(data, size);
      return size;
    });
    writer.setMinVersion(version);
    for (auto& [name, bytes] : records) {
      // The writer writes its own version (and, in LibTorch 2.x, byte order and id) records.
      if (name == "version" || name == ".data/version" || writer.getAllWrittenRecords().count(name) > 0) continue;
      if (name.size() > 4 && name.compare(name.size() - 4, 4, ".pkl") == 0) {
        for (size_t at = bytes.find(from); at != std::string::npos; at = bytes.find(from, at + to.size())) {
          bytes.replace(at, from.size(), to);
          ++replaced;
        }
      }
      writer.writeRecord(name, bytes.data(), bytes.size());
    }
    writer.writeEndOfFile();
  }
  file.finish();
  fs::rename(relocated, path);
  return replaced;
}

}  // namespace

TEST_CASE("trainer: stop and resume (mid-epoch and at an epoch end) is bitwise identical", "[train]") {
  const std::string full_dir = shared_dir("full");
  const RunResult full = resumable_run(full_dir, 0, "never");
  const std::vector<nlohmann::json> full_lines = metrics_lines(full_dir);
  REQUIRE(full_lines.size() == 3);

  for (int64_t stop : {4, 7, 13}) {  // mid-epoch at 2 and 3 ranks; 7 ends epoch 0 at 2 ranks
    const std::string dir = shared_dir("stop" + std::to_string(stop));
    const RunResult stopped = resumable_run(dir, stop, "auto");
    CHECK_FALSE(bitwise_equal(full.state, stopped.state));
    const RunResult resumed = resumable_run(dir, 0, "auto");
    INFO("stopped after step " << stop);
    CHECK(resumed.first_step == stop);  // from the stop's checkpoint, not from the start
    CHECK(bitwise_equal(full.state, resumed.state));
    CHECK(resumed.metrics.at("test_acc") == full.metrics.at("test_acc"));
    // Note [Epoch totals in checkpoints]: the interrupted epoch's line covers the whole epoch, as the
    // uninterrupted run's does (the loss summed in another order: equal to rounding).
    const std::vector<nlohmann::json> lines = metrics_lines(dir);
    CHECK(lines.size() == 3);
    for (size_t e = 0; e < std::min<size_t>(lines.size(), 3); ++e) {
      INFO("epoch " << e + 1);
      CHECK(lines[e]["epoch"] == full_lines[e]["epoch"]);
      CHECK(lines[e]["lr"] == full_lines[e]["lr"]);
      CHECK(lines[e]["train_count"] == full_lines[e]["train_count"]);
      CHECK(lines[e]["train_acc"] == full_lines[e]["train_acc"]);
      CHECK(lines[e]["train_macro_f1"] == full_lines[e]["train_macro_f1"]);
      CHECK(lines[e]["train_loss"].get<double>() == Approx(full_lines[e]["train_loss"].get<double>()).epsilon(1e-12));
      // The gradient norms, summed on the device, are settled into the checkpoint too.
      CHECK(lines[e]["grad_norm"].get<double>() == Approx(full_lines[e]["grad_norm"].get<double>()).epsilon(1e-12));
      CHECK(lines[e]["test_acc"] == full_lines[e]["test_acc"]);
      CHECK(lines[e]["images_per_s"].get<double>() > 0);
    }
  }

  // Two stops in a row.
  const std::string dir = shared_dir("twice");
  resumable_run(dir, 3, "auto");
  CHECK(resumable_run(dir, 9, "auto").first_step == 3);
  const RunResult twice = resumable_run(dir, 0, "auto");
  CHECK(twice.first_step == 9);
  CHECK(bitwise_equal(full.state, twice.state));

  // Resumed with other metrics: the run and its loss go on; the interrupted epoch's other train
  // metrics start at the resume (with a message), and the later epochs' are whole.
  const std::string changed = shared_dir("changed_metrics");
  resumable_run(changed, 4, "auto", 0, 3, {"accuracy"});
  const RunResult resumed = resumable_run(changed, 0, "auto");
  CHECK(resumed.first_step == 4);
  CHECK(bitwise_equal(full.state, resumed.state));
  const std::vector<nlohmann::json> lines = metrics_lines(changed);
  REQUIRE(lines.size() == 3);
  CHECK(lines[0]["train_count"] == full_lines[0]["train_count"]);
  CHECK(lines[0]["train_loss"].get<double>() == Approx(full_lines[0]["train_loss"].get<double>()).epsilon(1e-12));
  for (size_t e = 1; e < 3; ++e) {
    CHECK(lines[e]["train_acc"] == full_lines[e]["train_acc"]);
    CHECK(lines[e]["train_macro_f1"] == full_lines[e]["train_macro_f1"]);
  }
}

TEST_CASE("trainer: checkpoints are complete files, keep_last is honoured, metrics.jsonl has one line per epoch",
          "[train]") {
  const std::string dir = shared_dir("files");
  resumable_run(dir, 0, "never", /*every_steps=*/2, /*keep_last=*/2);
  const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
  CHECK(listed.size() == 2);
  bool stray_temporary = false;
  for (const auto& entry : fs::directory_iterator(dir + "/checkpoints")) {
    stray_temporary = stray_temporary || entry.path().extension() == ".tmp";
  }
  CHECK_FALSE(stray_temporary);
  std::ifstream metrics(dir + "/metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(metrics, line);) {
    ++lines;
    CHECK(line.find("\"test_acc\"") != std::string::npos);
    CHECK(line.find("\"exposed_comm_ms\"") != std::string::npos);
  }
  CHECK(lines == 3);
}

TEST_CASE("trainer: checkpoint.directory alone keeps checkpoints, and a resume with nowhere to keep them is refused",
          "[train]") {
  const std::string dir = shared_dir("directory_only") + "/ck";
  TinyNet model;
  TrainerOptions o = quiet(1, 4);
  o.checkpoints = true;
  o.checkpoint.directory = dir;  // no output_dir
  DistributedTrainer(model, sgd(*model, 0.05), comm_ptr(), o).fit(synthetic(16), synthetic(8, 8));
  CHECK(lockstep::train::list_checkpoints(dir).size() == 1);
  // Without output_dir or a directory nothing would load the file named: an error, not a fresh run.
  o.checkpoint.directory.clear();
  o.checkpoint.resume = lockstep::train::list_checkpoints(dir).back();
  const std::string error = lockstep::testing::error_of([&] { DistributedTrainer(model, sgd(*model, 0.05), comm_ptr(), o); });
  CHECK_THAT(error, Catch::Contains("checkpoint.resume names a checkpoint to resume from") &&
                        Catch::Contains("this run keeps no checkpoints (output_dir and checkpoint.directory are both empty)"));
  o.checkpoints = false;
  o.checkpoint.resume = "auto";
  o.checkpoint.directory = dir;
  CHECK_THAT(lockstep::testing::error_of([&] { DistributedTrainer(model, sgd(*model, 0.05), comm_ptr(), o); }),
             Catch::Contains("checkpoint.directory is '" + dir + "', but checkpoints is false"));
}

TEST_CASE("trainer: a resume from a named checkpoint moves the later steps of the run it left aside (Note [Starting "
          "over])",
          "[train]") {
  // A finished run with a checkpoint every step; then the run is taken up again from step 4 (another
  // learning rate, say), and stopped after step 6. Before: a later resume: auto (a requeued job) took
  // the first run's last file, of a higher step, said the run was complete, and trained nothing.
  const RunResult full = resumable_run(shared_dir("named_full"), 0, "never");
  const std::string dir = shared_dir("named");
  resumable_run(dir, 0, "never", /*every_steps=*/1, /*keep_last=*/100);
  const std::vector<std::string> first_run = lockstep::train::list_checkpoints(dir + "/checkpoints");
  REQUIRE(first_run.size() > 6);
  const std::string step4 = dir + "/checkpoints/" + lockstep::train::checkpoint_file_name(4);
  const RunResult again = resumable_run(dir, 6, step4, 1, 100);
  CHECK(again.first_step == 4);
  std::vector<std::string> names;
  for (const auto& path : lockstep::train::list_checkpoints(dir + "/checkpoints")) {
    names.push_back(fs::path(path).filename().string());
  }
  std::vector<std::string> expected;
  for (int64_t step = 1; step <= 6; ++step) expected.push_back(lockstep::train::checkpoint_file_name(step));
  CHECK(names == expected);  // 1 to 4 of the first run (kept), 5 and 6 of this one
  int aside = 0;
  for (const auto& entry : fs::directory_iterator(dir + "/checkpoints")) {
    if (!entry.is_directory()) continue;
    ++aside;
    CHECK(entry.path().filename().string().rfind("previous-run-", 0) == 0);
    // The first run's steps after 4, nothing lost.
    CHECK(lockstep::train::list_checkpoints(entry.path().string()).size() == first_run.size() - 4);
  }
  CHECK(aside == 1);
  // The requeued job goes on from this run's step 6 and ends as the uninterrupted run.
  const RunResult resumed = resumable_run(dir, 0, "auto", 1, 100);
  CHECK(resumed.first_step == 6);
  CHECK(bitwise_equal(full.state, resumed.state));
}

TEST_CASE("trainer: resume: never moves an earlier run's checkpoints aside; keep_last keeps this run's newest",
          "[train]") {
  const RunResult full = resumable_run(shared_dir("over_full"), 0, "never");
  const std::string dir = shared_dir("over");
  resumable_run(dir, 0, "never", /*every_steps=*/1, /*keep_last=*/2);  // an earlier, finished run
  const auto earlier = lockstep::train::list_checkpoints(dir + "/checkpoints");
  REQUIRE(earlier.size() == 2);
  // Starting over in the same directory, stopped after step 3. Before: keep_last counted the earlier
  // run's later steps, so it removed each checkpoint just written, and a resume: auto then picked the
  // earlier run's last one.
  resumable_run(dir, 3, "never", 1, 2);
  std::vector<std::string> names;
  for (const auto& path : lockstep::train::list_checkpoints(dir + "/checkpoints")) {
    names.push_back(fs::path(path).filename().string());
  }
  CHECK(names == std::vector<std::string>{lockstep::train::checkpoint_file_name(2),
                                          lockstep::train::checkpoint_file_name(3)});
  int aside = 0;
  for (const auto& entry : fs::directory_iterator(dir + "/checkpoints")) {
    if (!entry.is_directory()) continue;
    CHECK(entry.path().filename().string().rfind("previous-run-", 0) == 0);
    CHECK(lockstep::train::list_checkpoints(entry.path().string()).size() == earlier.size());  // nothing lost
    ++aside;
  }
  CHECK(aside == 1);
  // Its metrics.jsonl too: this run has no line yet (it stopped in epoch 1), the earlier one's 3 are kept.
  CHECK(metrics_lines(dir).empty());
  std::vector<std::string> earlier_metrics;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("metrics.previous-", 0) == 0 && entry.path().extension() == ".jsonl") earlier_metrics.push_back(name);
  }
  REQUIRE(earlier_metrics.size() == 1);
  std::ifstream earlier_file(dir + "/" + earlier_metrics[0]);
  int earlier_lines = 0;
  for (std::string line; std::getline(earlier_file, line);) ++earlier_lines;
  CHECK(earlier_lines == 3);
  // The same command with resume: auto goes on from this run's step 3.
  const RunResult resumed = resumable_run(dir, 0, "auto", 1, 2);
  CHECK(resumed.first_step == 3);
  CHECK(bitwise_equal(full.state, resumed.state));
}

namespace {
// Its head is registered before the body it follows, so its gradients arrive first: the buckets are
// rebuilt after the first synchronised backward in an order unlike the initial one (reverse registration).
struct HeadFirstImpl : torch::nn::Module {
  torch::nn::Linear head{register_module("head", torch::nn::Linear(16, 4))};
  torch::nn::Linear body{register_module("body", torch::nn::Linear(64, 16))};
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::relu(body(x.flatten(1)))); }
};
TORCH_MODULE(HeadFirst);

// The bucket layout each step ran on.
struct LayoutRecorder : Callback {
  std::vector<lockstep::ddp::BucketAssignment> layouts;
  void on_batch_begin(TrainerContext& ctx) override {
    layouts.push_back(ctx.data_parallel->reducer().bucket_assignment());
  }
};
}  // namespace

TEST_CASE("trainer: a resumed run's buckets are laid out as the uninterrupted run's from its first step (Note "
          "[Bucket order across a resume])",
          "[train]") {
  auto run = [](const std::string& dir, int64_t stop_after) {
    torch::manual_seed(5);
    HeadFirst model;
    TrainerOptions o = lockstep::testing::resumable(lockstep::testing::quiet_trainer(2, 3), dir, stop_after, "auto");
    o.ddp.first_bucket_cap_mb = 1e-6;  // a bucket per parameter: the order shows in the layout
    o.ddp.bucket_cap_mb = 1e-6;
    DistributedTrainer trainer(model, sgd(*model, 0.05, 0.9), comm_ptr(), o);
    auto recorder = std::make_shared<LayoutRecorder>();
    trainer.add_callback(recorder);
    trainer.fit(lockstep::testing::synthetic_images(8 * comm().size(), 8, 4), nullptr);  // 2 steps per epoch
    return std::make_pair(recorder->layouts, lockstep::testing::state_of(*model));
  };
  const auto [full_layouts, full_state] = run(shared_dir("layout_full"), 0);
  REQUIRE(full_layouts.size() == 4);
  REQUIRE(full_layouts[0] != full_layouts[1]);  // rebuilt after the first step
  const std::string dir = shared_dir("layout_stop");
  run(dir, 2);
  const auto [resumed_layouts, resumed_state] = run(dir, 0);
  REQUIRE(resumed_layouts.size() == 2);
  CHECK(resumed_layouts[0] == full_layouts[2]);  // before: the initial layout, full_layouts[0]
  CHECK(resumed_layouts[1] == full_layouts[3]);
  CHECK(bitwise_equal(resumed_state, full_state));
}

TEST_CASE("trainer: the last checkpoint goes on at the next epoch even when a periodic one took the step",
          "[train]") {
  const std::string dir = shared_dir("epoch_end_step");
  auto run = [&](const std::string& resume) {
    torch::manual_seed(5);
    TinyNet model;
    TrainerOptions o = quiet(2, 4);
    o.output_dir = dir;
    o.checkpoints = true;
    o.progress = true;  // metrics.jsonl
    o.log_every = 0;
    o.checkpoint.every_steps = 1;  // every step, so also each epoch's last one
    o.checkpoint.every_epoch = false;
    o.checkpoint.keep_last = 0;
    o.checkpoint.resume = resume;
    DistributedTrainer trainer(model, sgd(*model, 0.05), comm_ptr(), o);
    trainer.fit(synthetic(24), synthetic(6, 8));
  };
  run("never");
  const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
  REQUIRE_FALSE(listed.empty());
  TinyNet model;
  auto optimizer = sgd(*model, 0.05);
  TrainerContext ctx;
  ctx.communicator = &comm();
  ctx.model = model.ptr().get();
  ctx.optimizer = optimizer.get();
  lockstep::train::CheckpointOptions o;
  o.directory = dir + "/checkpoints";
  lockstep::train::Checkpointer(o).load(ctx, listed.back());
  // Before: the step's periodic checkpoint (the last epoch's end) was left as the last one, so the
  // same command evaluated the last epoch again and wrote its metrics line twice.
  REQUIRE(ctx.resume_position.has_value());
  CHECK(ctx.resume_position->epoch == 2);
  CHECK(ctx.resume_position->position == 0);
  run("auto");
  CHECK(metrics_lines(dir).size() == 2);
}

namespace {

// Resumes a fresh TinyNet and its optimizer from `path` through a Checkpointer, as fit() does.
void resume_fresh_model(const std::string& dir, const std::string& path) {
  TinyNet model;
  auto optimizer = sgd(*model, 0.05, 0.9);
  lockstep::train::CheckpointOptions o;
  o.directory = dir + "/checkpoints";
  o.resume = path;
  lockstep::train::Checkpointer checkpointer(o);
  TrainerContext ctx;
  ctx.communicator = &comm();
  ctx.model = model.get();
  ctx.optimizer = optimizer.get();
  checkpointer.on_train_begin(ctx);
}

}  // namespace

TEST_CASE("trainer: a corrupt checkpoint is named in the error, and auto-resume skips it", "[train]") {
  const std::string full_dir = shared_dir("full_c");
  const RunResult full = resumable_run(full_dir, 0, "never");
  const std::string dir = shared_dir("corrupt");
  resumable_run(dir, 5, "auto", /*every_steps=*/1, /*keep_last=*/3);
  const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
  CHECK(listed.size() == 3);
  const std::string newest = listed.empty() ? dir + "/none" : listed.back();
  if (comm().rank() == 0 && !listed.empty()) fs::resize_file(newest, fs::file_size(newest) / 2);  // truncated
  comm().barrier()->wait();

  CHECK_THROWS_WITH(resume_fresh_model(dir, newest), Catch::Contains(newest) && Catch::Contains("truncated or corrupt"));
  // Auto-resume falls back to the checkpoint before it (step 4) and still ends bitwise where the
  // uninterrupted run ends (a run started afresh would too: first_step tells them apart).
  const RunResult resumed = resumable_run(dir, 0, "auto", 1, 3);
  CHECK(resumed.first_step == 4);
  CHECK(bitwise_equal(full.state, resumed.state));
  // Step 4's checkpoint was a periodic one, written mid-epoch: the gradient norms summed on the device
  // until then are in it too, so the resumed epoch reports the whole epoch's grad_norm.
  const std::vector<nlohmann::json> lines = metrics_lines(dir);
  const std::vector<nlohmann::json> full_lines = metrics_lines(full_dir);
  REQUIRE(lines.size() == full_lines.size());
  for (size_t e = 0; e < lines.size(); ++e) {
    INFO("epoch " << e + 1);
    CHECK(lines[e]["grad_norm"].get<double>() == Approx(full_lines[e]["grad_norm"].get<double>()).epsilon(1e-12));
  }
}

TEST_CASE("trainer: a checkpoint whose weights changed on disk is refused by its checksum, and auto-resume skips it "
          "(Note [Checksummed files])",
          "[train]") {
  const std::string full_dir = shared_dir("full_f");
  const RunResult full = resumable_run(full_dir, 0, "never");
  const std::string dir = shared_dir("flipped");
  const RunResult stopped = resumable_run(dir, 5, "auto", /*every_steps=*/1, /*keep_last=*/3);
  const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
  REQUIRE(listed.size() == 3);
  const std::string newest = listed.back();
  if (comm().rank() == 0) {
    // One bit of fc1.weight's first value, found by its bytes: LibTorch alone loads the changed weight.
    std::fstream file(newest, std::ios::in | std::ios::out | std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    const at::Tensor first = stopped.state[0].contiguous().view(-1).narrow(0, 0, 4);
    const std::string pattern(static_cast<const char*>(first.data_ptr()), 16);
    const std::size_t at = bytes.find(pattern);
    REQUIRE(at != std::string::npos);
    file.clear();
    file.seekp(static_cast<std::streamoff>(at));
    file.put(static_cast<char>(bytes[at] ^ 0x01));
  }
  comm().barrier()->wait();
  CHECK_THROWS_WITH(resume_fresh_model(dir, newest), Catch::Contains("checkpoint " + newest + " is corrupt") &&
                                                        Catch::Contains("does not match the checksum"));
  {  // A context built by hand without a model is an error, not a crash.
    lockstep::train::CheckpointOptions o;
    o.directory = dir + "/checkpoints";
    lockstep::train::Checkpointer checkpointer(o);
    TrainerContext ctx;
    ctx.communicator = &comm();
    CHECK_THROWS_WITH(checkpointer.on_train_begin(ctx), Catch::Contains("the TrainerContext has no model"));
  }
  const RunResult resumed = resumable_run(dir, 0, "auto", 1, 3);
  CHECK(resumed.first_step == 4);
  CHECK(bitwise_equal(full.state, resumed.state));
}

TEST_CASE("trainer: a checkpoint rank 0 cannot write is an error on every rank, naming the file (Note [A failed "
          "checkpoint])",
          "[train]") {
  const std::string dir = shared_dir("unwritable");
  const std::string second = dir + "/checkpoints/" + lockstep::train::checkpoint_file_name(2);
  // A directory where step 2's temporary file goes: rank 0 cannot create it (root ignores permissions).
  if (comm().rank() == 0) fs::create_directories(second + ".tmp/in_the_way");
  comm().barrier()->wait();
  const std::string error = lockstep::testing::error_of([&] { resumable_run(dir, 0, "never", /*every_steps=*/1); });
  CHECK_THAT(error, Catch::Contains("could not write the checkpoint of step 2 (" + second + ")"));
  CHECK_THAT(error, Catch::Contains(second + ".tmp"));  // and what went wrong, as rank 0 saw it
  CHECK_THAT(error, Catch::Contains("(on rank 0; this is rank " + std::to_string(comm().rank()) + ")"));
  CHECK(lockstep::testing::communicator_healthy());
  // Step 1's checkpoint was written; nothing of step 2's has a final name.
  const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
  REQUIRE(listed.size() == 1);
  CHECK(fs::path(listed[0]).filename() == lockstep::train::checkpoint_file_name(1));
}

namespace {

// Checkpointed state that one rank cannot take back (its own copy of something went missing, say).
struct FragileState : Callback {
  explicit FragileState(int refuses = -1) : refuses(refuses) {}
  int refuses = -1;     // the rank whose load_state throws
  bool loaded = false;  // a state was taken
  std::string state_key() const override { return "fragile"; }
  std::string save_state() const override { return "saved"; }
  void load_state(const std::string& state) override {
    if (comm().rank() == refuses) throw std::runtime_error("fragile state lost on this node");
    loaded = true;
  }
};

std::string run_with_fragile_state(const std::string& dir, int64_t stop_after, int refuses, double momentum = 0.0) {
  torch::manual_seed(5);
  lockstep::testing::SmallConvNet model;
  auto opt =
      std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1).momentum(momentum));
  TrainerOptions o = lockstep::testing::resumable(lockstep::testing::quiet_trainer(1, 8), dir, stop_after, "auto");
  o.checkpoint.every_steps = 1;
  DistributedTrainer trainer(model, opt, comm_ptr(), o);
  trainer.add_callback(std::make_shared<FragileState>(refuses));
  return lockstep::testing::error_of(
      [&] { trainer.fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 7), nullptr); });
}

}  // namespace

TEST_CASE("trainer: a checkpoint one rank cannot load is an error on every rank, naming that rank", "[train]") {
  const std::string dir = shared_dir("one_rank_cannot_load");
  CHECK(run_with_fragile_state(dir, 1, -1).empty());
  const int last = comm().size() - 1;
  const std::string error = run_with_fragile_state(dir, 0, last);
  INFO(error);
  CHECK_THAT(error, Catch::Contains("fragile state lost on this node"));
  if (comm().rank() != last) {
    CHECK_THAT(error, Catch::Contains("Checkpointer: cannot resume from " + dir + "/checkpoints/" +
                                      lockstep::train::checkpoint_file_name(1)));
    CHECK_THAT(error, Catch::Contains("(on rank " + std::to_string(last) + "; this is rank " +
                                      std::to_string(comm().rank()) + ")"));
  }
  CHECK(lockstep::testing::communicator_healthy());
  CHECK(run_with_fragile_state(dir, 0, -1).empty());  // every rank can: the run goes on to its end
}

namespace {

// Loads `file` into `model`, `optimizer` and `callbacks`, which it expects to refuse it: the error, and
// whether the refusal left the model's values, the CPU generator and the context as they were.
struct Refusal {
  std::string error;
  bool unchanged = false;
};
Refusal refused_load(const std::string& file, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                     std::vector<lockstep::train::CallbackPtr> callbacks) {
  const std::vector<torch::Tensor> before = lockstep::testing::state_of(model);
  torch::manual_seed(77);
  const torch::Tensor rng_before = at::detail::getDefaultCPUGenerator().get_state();
  TrainerContext ctx;
  ctx.communicator = &comm();
  ctx.model = &model;
  ctx.optimizer = &optimizer;
  ctx.callbacks = &callbacks;
  Refusal out;
  lockstep::train::CheckpointOptions options;
  options.directory = std::filesystem::path(file).parent_path().string();
  out.error = lockstep::testing::error_of([&] { lockstep::train::Checkpointer(options).load(ctx, file); });
  out.unchanged = lockstep::testing::bitwise_equal(before, lockstep::testing::state_of(model)) &&
                  torch::equal(rng_before, at::detail::getDefaultCPUGenerator().get_state()) &&
                  ctx.global_step == 0 && ctx.epoch == 0 && !ctx.resume_position.has_value();
  return out;
}

}  // namespace

TEST_CASE("trainer: a checkpoint that does not fit the model, the optimizer or a callback changes nothing "
          "(Note [A checkpoint that does not fit])",
          "[train]") {
  // Written by SmallConvNet without batch norm, SGD with momentum (a buffer per parameter) and a
  // FragileState. The optimizers below are fresh: their state is empty until a load fills it.
  const std::string dir = shared_dir("does_not_fit");
  REQUIRE(run_with_fragile_state(dir, 1, -1, /*momentum=*/0.9).empty());
  const std::string file = dir + "/checkpoints/" + lockstep::train::checkpoint_file_name(1);

  auto sgd_with_momentum = [](torch::nn::Module& model) {
    return std::make_shared<torch::optim::SGD>(model.parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  };

  SECTION("a model with a layer more: its conv, found first in the file, keeps its values") {
    torch::manual_seed(11);
    lockstep::testing::SmallConvNet model(/*batch_norm=*/true);
    auto optimizer = sgd_with_momentum(*model);
    const Refusal r = refused_load(file, *model, *optimizer, {std::make_shared<FragileState>(-1)});
    INFO(r.error);
    CHECK_THAT(r.error, Catch::Contains("checkpoint " + file + " holds no module 'bn'") &&
                            Catch::Contains("which has parameters in this model: it was written from another model"));
    CHECK(r.unchanged);
    CHECK(optimizer->state().empty());
  }
  SECTION("another optimizer: the model and the callbacks keep theirs") {
    torch::manual_seed(11);
    lockstep::testing::SmallConvNet model;
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
    auto callback = std::make_shared<FragileState>(-1);
    const Refusal r = refused_load(file, *model, optimizer, {callback});
    INFO(r.error);
    CHECK_THAT(r.error, Catch::Contains("checkpoint " + file + " could not be loaded"));
    CHECK(r.unchanged);
    CHECK(optimizer.state().empty());
    CHECK_FALSE(callback->loaded);  // callbacks take their state after the optimizer took its
  }
  SECTION("a callback that refuses its state: the model and the optimizer keep theirs") {
    torch::manual_seed(11);
    lockstep::testing::SmallConvNet model;
    auto optimizer = sgd_with_momentum(*model);
    const Refusal r = refused_load(file, *model, *optimizer, {std::make_shared<FragileState>(comm().rank())});
    INFO(r.error);
    CHECK_THAT(r.error, Catch::Contains("fragile state lost on this node"));
    CHECK(r.unchanged);
    CHECK(optimizer->state().empty());  // it took the file's momentum buffers, and was put back
  }
  SECTION("another optimizer on one rank: every rank keeps its model, optimizer and callbacks") {
    torch::manual_seed(11);
    lockstep::testing::SmallConvNet model;
    const int last = comm().size() - 1;
    std::unique_ptr<torch::optim::Optimizer> optimizer;
    if (comm().rank() == last) {
      optimizer = std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.01));
    } else {
      optimizer = std::make_unique<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    }
    auto callback = std::make_shared<FragileState>(-1);
    const Refusal r = refused_load(file, *model, *optimizer, {callback});
    INFO(r.error);
    CHECK_THAT(r.error, Catch::Contains("could not be loaded"));
    CHECK(r.unchanged);
    CHECK(optimizer->state().empty());  // the SGD ranks took the file's momentum buffers, then put them back
    CHECK_FALSE(callback->loaded);
  }
  SECTION("a callback that refuses its state on one rank: every rank keeps its model and optimizer") {
    torch::manual_seed(11);
    lockstep::testing::SmallConvNet model;
    auto optimizer = sgd_with_momentum(*model);
    const int last = comm().size() - 1;
    auto callback = std::make_shared<FragileState>(last);
    const Refusal r = refused_load(file, *model, *optimizer, {callback});
    CHECK(callback->loaded == (comm().rank() != last));  // callbacks cannot be put back
    INFO(r.error);
    CHECK_THAT(r.error, Catch::Contains("fragile state lost on this node"));
    if (comm().rank() != last) {
      CHECK_THAT(r.error, Catch::Contains("Checkpointer: cannot load " + file) &&
                              Catch::Contains("(on rank " + std::to_string(last) + "; this is rank " +
                                              std::to_string(comm().rank()) + ")"));
    }
    CHECK(r.unchanged);
    CHECK(optimizer->state().empty());
  }
  SECTION("the same model, optimizer type and callbacks take it all") {
    torch::manual_seed(11);
    lockstep::testing::SmallConvNet model;
    auto optimizer = sgd_with_momentum(*model);
    const Refusal r = refused_load(file, *model, *optimizer, {std::make_shared<FragileState>(-1)});
    CHECK(r.error.empty());
    CHECK_FALSE(r.unchanged);
    CHECK(optimizer->state().size() == model->parameters().size());  // the file's momentum buffers
  }
  CHECK(lockstep::testing::communicator_healthy());
}

TEST_CASE("trainer: an output_dir rank 0 cannot create is an error on every rank", "[train]") {
  const std::string dir = shared_dir("output_in_the_way");
  if (comm().rank() == 0) std::ofstream(dir + "/a_file") << "not a directory";
  comm().barrier()->wait();
  const std::string error = lockstep::testing::error_of([&] { resumable_run(dir + "/a_file/out", 0, "never"); });
  CHECK_THAT(error, Catch::Contains("trainer: cannot create output_dir " + dir + "/a_file/out"));
  CHECK_THAT(error, Catch::Contains("(on rank 0; this is rank " + std::to_string(comm().rank()) + ")"));
  CHECK(lockstep::testing::communicator_healthy());
}

TEST_CASE("trainer: a checkpoint-looking name past int64 is not a checkpoint, and auto-resume goes on", "[train]") {
  const std::string dir = shared_dir("long_step_name");
  if (comm().rank() == 0) {
    fs::create_directories(dir + "/checkpoints");
    std::ofstream(dir + "/checkpoints/checkpoint-step99999999999999999999999.pt") << "x";
  }
  comm().barrier()->wait();
  CHECK(lockstep::train::list_checkpoints(dir + "/checkpoints").empty());
  CHECK(lockstep::testing::error_of([&] { resumable_run(dir, 0, "auto"); }).empty());
  CHECK(lockstep::train::list_checkpoints(dir + "/checkpoints").size() >= 1);
}

TEST_CASE("trainer: a metrics.jsonl rank 0 cannot write is an error on every rank, before the first step", "[train]") {
  const std::string dir = shared_dir("metrics_in_the_way");
  if (comm().rank() == 0) fs::create_directories(dir + "/metrics.jsonl");  // a directory: no file can open there
  comm().barrier()->wait();
  const std::string error = lockstep::testing::error_of([&] { resumable_run(dir, 0, "never"); });
  CHECK_THAT(error, Catch::Contains("ProgressLogger: "));
  CHECK_THAT(error, Catch::Contains("cannot open " + dir + "/metrics.jsonl for writing"));
  CHECK_THAT(error, Catch::Contains("(on rank 0; this is rank " + std::to_string(comm().rank()) + ")"));
  CHECK(lockstep::testing::communicator_healthy());
  CHECK(lockstep::train::list_checkpoints(dir + "/checkpoints").empty());  // no step was trained
}

TEST_CASE("trainer: a metrics.jsonl line that does not reach a full disk is an error on every rank", "[train]") {
  // /dev/full opens and takes writes into the stream's buffer; the bytes fail when flushed. The line
  // used to be flushed by the stream's destructor, which ignores the error: an epoch lost silently.
  if (!fs::exists("/dev/full")) return;  // Linux only
  const std::string dir = shared_dir("metrics_full_disk");
  if (comm().rank() == 0) {
    fs::create_directories(dir);
    fs::create_symlink("/dev/full", dir + "/metrics.jsonl");
  }
  comm().barrier()->wait();
  const std::string error = lockstep::testing::error_of([&] { resumable_run(dir, 0, "never"); });
  CHECK_THAT(error, Catch::Contains("ProgressLogger: cannot append to " + dir + "/metrics.jsonl"));
  CHECK_THAT(error, Catch::Contains("(on rank 0; this is rank " + std::to_string(comm().rank()) + ")"));
  CHECK(lockstep::testing::communicator_healthy());
  // The error came at the end of epoch 1, before its checkpoint (written in on_after_epoch_end): no
  // checkpoint claims an epoch whose line is missing.
  CHECK(lockstep::train::list_checkpoints(dir + "/checkpoints").empty());
}

TEST_CASE("trainer: a checkpoint written on a GPU resumes on the CPU (Note [Checkpoints across devices])",
          "[train]") {
  const RunResult full = resumable_run(shared_dir("full_gpu"), 0, "never");
  const std::string dir = shared_dir("from_gpu");
  resumable_run(dir, 5, "auto");
  const auto listed = lockstep::train::list_checkpoints(dir + "/checkpoints");
  REQUIRE_FALSE(listed.empty());  // the same directory on every rank: all go on or none
  const std::string path = listed.back();
  int replaced = 0;
  std::string error;
  if (comm().rank() == 0) {
    try {
      replaced = relocate_tensors(path, "cuda:0");
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  comm().barrier()->wait();
  if (comm().rank() == 0) {
    CHECK(error.empty());
    CHECK(replaced >= 1);
  }
  if (!torch::cuda::is_available()) {
    // The fixture is what it claims: LibTorch on its own cannot read it without a GPU.
    torch::serialize::InputArchive archive;
    CHECK_THROWS(archive.load_from(path));
  }
  // Named explicitly: auto-resume skips a checkpoint it cannot read and starts afresh, which here ends
  // in the same weights (first_step tells them apart).
  const RunResult resumed = resumable_run(dir, 0, path);
  CHECK(resumed.first_step == 5);
  CHECK(bitwise_equal(full.state, resumed.state));
}

TEST_CASE("trainer: a model with a name no checkpoint can hold is refused before the first step", "[train]") {
  // Note [Names a checkpoint cannot hold]: LibTorch would write every checkpoint of it and read none back.
  struct Stem : torch::nn::Module {
    torch::nn::Linear in{register_module("in", torch::nn::Linear(16, kClasses))};
  };
  auto model = std::make_shared<Stem>();
  TrainerOptions o = quiet(1, 4);
  o.output_dir = shared_dir("keyword_name");
  o.checkpoints = true;
  DistributedTrainer trainer(model, [model](const at::Tensor& x) { return model->in(x.flatten(1)); }, sgd(*model, 0.1),
                             comm_ptr(), o);
  CHECK_THAT(lockstep::testing::error_of([&] { trainer.fit(synthetic(8 * comm().size()), nullptr); }),
             Catch::Contains("Checkpointer: the model's submodule 'in'"));
  CHECK(lockstep::testing::communicator_healthy());
}

TEST_CASE("trainer: ResNet-18 on a Fashion-MNIST subset learns in one epoch", "[train][slow]") {
  const std::string root = lockstep::data::kFashionMnistRoot;
  if (!fs::exists(root + "/train-images-idx3-ubyte.gz") && !fs::exists(root + "/train-images-idx3-ubyte")) {
    WARN("Fashion-MNIST not found in " << root << "; skipped");
    return;
  }
  lockstep::data::FashionMnistOptions train_options;
  auto train_set = lockstep::data::Subset::first(std::make_shared<lockstep::data::FashionMnist>(train_options), 2000);
  lockstep::data::FashionMnistOptions test_options;
  test_options.split = lockstep::data::Split::Test;
  auto test_set = lockstep::data::Subset::first(std::make_shared<lockstep::data::FashionMnist>(test_options), 1000);

  torch::manual_seed(0);
  lockstep::models::ResNet18Options model_options;
  model_options.width = 8;
  model_options.stem = lockstep::models::Stem::Small;
  model_options.in_channels = 1;
  model_options.num_classes = 10;
  lockstep::models::ResNet18 model(model_options);
  TrainerOptions o = quiet(1, 8);  // 125 steps at 2 ranks, 84 at 3
  o.eval_batch_size = 250;
  o.lr.warmup_steps = 5;
  DistributedTrainer trainer(model, sgd(*model, 0.05, 0.9), comm_ptr(), o);
  const auto metrics = trainer.fit(train_set, test_set);
  CHECK(metrics.at("test_count") == 1000);
  CHECK(metrics.at("test_acc") > 0.5);
  if (comm().rank() == 0) std::printf("fashion-mnist subset: test accuracy %.2f%%\n", 100 * metrics.at("test_acc"));
}

TEST_CASE("trainer: after a resume the comm hook sees the run's iteration, not the process's", "[train]") {
  // Note [Iteration across a resume]: PowerSGD's start_iteration and draws, or a user's warm-up, depend on it.
  const std::string dir = shared_dir("iteration");
  auto run = [&](int64_t stop_after) {
    auto seen = std::make_shared<std::vector<uint64_t>>();
    TrainerOptions o = lockstep::testing::resumable(quiet(2, 4), dir, stop_after, "auto");
    const lockstep::ddp::CommHook average = lockstep::ddp::allreduce_hook();
    o.ddp.comm_hook = [seen, average](lockstep::comm::Communicator& c, const lockstep::ddp::GradBucket& bucket) {
      if (bucket.index == 0) seen->push_back(bucket.iteration);
      return average(c, bucket);
    };
    torch::manual_seed(7);
    TinyNet model;
    DistributedTrainer trainer(model, sgd(*model, 0.1), comm_ptr(), o);
    trainer.fit(synthetic(12 * comm().size()), nullptr);  // 3 steps per epoch, 6 in all
    return *seen;
  };
  CHECK(run(4) == std::vector<uint64_t>{0, 1, 2, 3});
  CHECK(run(0) == std::vector<uint64_t>{4, 5});
}

TEST_CASE("trainer: a resume refuses a changed data order inside an epoch, and changed steps per epoch anywhere",
          "[train]") {
  bool model_unchanged = false;  // after the last run: its model still holds its initial weights
  auto run = [&](const std::string& dir, int64_t epochs, int64_t per_rank, int64_t stop_after, int64_t every_steps,
                 uint64_t seed = 8, int64_t batch_size = 4) {
    torch::manual_seed(5);
    lockstep::testing::SmallConvNet model;
    std::vector<torch::Tensor> initial;
    for (const auto& p : model->parameters()) initial.push_back(p.detach().clone());
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    TrainerOptions o = lockstep::testing::resumable(lockstep::testing::quiet_trainer(epochs, seed), dir, stop_after, "auto");
    o.checkpoint.every_steps = every_steps;
    o.batch_size = batch_size;
    DistributedTrainer trainer(model, opt, comm_ptr(), o);
    const std::string error = lockstep::testing::error_of([&] {
      trainer.fit(lockstep::testing::synthetic_images(per_rank * comm().size(), 8, 7), nullptr);
    });
    const auto now = model->parameters();
    model_unchanged = now.size() == initial.size();
    for (std::size_t i = 0; model_unchanged && i < now.size(); ++i) model_unchanged = torch::equal(now[i], initial[i]);
    return error;
  };
  const std::string inside = shared_dir("order_inside");
  CHECK(run(inside, 1, 12, 1, 1).empty());  // stopped after step 1 of 3: 4 samples per rank done
  const std::string error = run(inside, 1, 16, 0, 1);
  INFO(error);
  CHECK_THAT(error, Catch::Contains("stopped inside epoch 1 (4 samples of this rank's share done)") &&
                        Catch::Contains("has changed since (the training set size " + std::to_string(12 * comm().size()) +
                                        " then, " + std::to_string(16 * comm().size()) + " now)"));
  CHECK(model_unchanged);  // refused before the checkpoint's weights were copied in
  CHECK(lockstep::testing::communicator_healthy());
  CHECK_THAT(run(inside, 1, 12, 0, 1, /*seed=*/9), Catch::Contains("(seed 8 then, 9 now)"));  // another shuffle
  // Another batch size keeps the order of the samples but not the steps per epoch: that is the reason.
  const std::string batched = run(inside, 1, 12, 0, 1, 8, /*batch_size=*/6);
  CHECK_THAT(batched, Catch::Contains("was written with other steps per epoch (batch_size 4 then, 6 now)") &&
                          !Catch::Contains("order of that epoch's samples"));
  CHECK(model_unchanged);
  CHECK(run(inside, 1, 12, 0, 1).empty());  // the same data resumes

  // At an epoch's start a new shuffle is fine, but not other steps per epoch: the schedule counts
  // the steps taken in epochs.
  const std::string between = shared_dir("order_between");
  CHECK(run(between, 1, 12, 0, 0).empty());  // one whole epoch; its checkpoint starts epoch 2
  const std::string larger = run(between, 2, 16, 0, 0);
  CHECK_THAT(larger, Catch::Contains("was written with other steps per epoch (the training set size"));
  CHECK(model_unchanged);
  CHECK(lockstep::testing::communicator_healthy());
  CHECK(run(between, 2, 12, 0, 0, /*seed=*/9).empty());  // epoch 2 with another shuffle
}

namespace {

// Adds a metric in on_epoch_end, as pruning (sparsity) and quantization (quant_*) do, and throws
// there in one epoch when asked (a full disk, a bug).
struct EpochEndMetric : Callback {
  int64_t throw_in_epoch = -1;
  void on_epoch_end(TrainerContext& ctx) override {
    if (ctx.epoch == throw_in_epoch) throw std::runtime_error("epoch-end failure");
    ctx.metrics["late_metric"] = 10.0 + static_cast<double>(ctx.epoch);
  }
};

}  // namespace

TEST_CASE("trainer: a callback that fails at an epoch's end leaves that epoch unsaved, so a resume trains it again",
          "[train]") {
  const std::string dir = shared_dir("epoch_end_failure");
  auto run = [&](int64_t throw_in_epoch) {
    torch::manual_seed(6);
    lockstep::testing::SmallConvNet model;
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    TrainerOptions o = lockstep::testing::resumable(lockstep::testing::quiet_trainer(3, 8), dir, 0, "auto");
    o.checkpoint.every_steps = 0;
    o.progress = true;  // metrics.jsonl
    o.log_every = 0;
    DistributedTrainer trainer(model, opt, comm_ptr(), o);
    auto late = std::make_shared<EpochEndMetric>();
    late->throw_in_epoch = throw_in_epoch;
    trainer.add_callback(late);
    return lockstep::testing::error_of([&] {
      trainer.fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 7), nullptr);
    });
  };
  CHECK_THAT(run(1), Catch::Contains("epoch-end failure"));
  CHECK(lockstep::testing::communicator_healthy());
  CHECK(metrics_lines(dir).size() == 1);
  CHECK(run(-1).empty());  // resumes at epoch 2, whose line was never written
  const std::vector<nlohmann::json> lines = metrics_lines(dir);
  REQUIRE(lines.size() == 3);
  for (size_t e = 0; e < lines.size(); ++e) {
    INFO("epoch " << e + 1);
    CHECK(lines[e]["epoch"].get<int64_t>() == static_cast<int64_t>(e + 1));
    CHECK(lines[e]["late_metric"].get<double>() == 10.0 + static_cast<double>(e));
  }
}

TEST_CASE("trainer: the same command after the run completed trains nothing and returns the last epoch's metrics",
          "[train]") {
  int64_t first_step = -1;  // of the last run (-1: it took no step)
  auto run = [&first_step](const std::string& dir, int64_t epochs) {
    torch::manual_seed(6);
    lockstep::testing::SmallConvNet model;
    auto opt = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1));
    TrainerOptions o = lockstep::testing::resumable(lockstep::testing::quiet_trainer(epochs, 8), dir, 0, "auto");
    o.checkpoint.every_steps = 0;
    DistributedTrainer trainer(model, opt, comm_ptr(), o);
    trainer.add_callback(std::make_shared<EpochEndMetric>());  // its metric is in the checkpoint too
    auto first = std::make_shared<FirstStep>();
    trainer.add_callback(first);
    const auto metrics = trainer.fit(lockstep::testing::synthetic_images(12 * comm().size(), 8, 7),
                                     lockstep::testing::synthetic_images(10, 8, 3));
    first_step = first->step;
    return metrics;
  };
  const std::string dir = shared_dir("complete");
  const auto first = run(dir, 1);
  REQUIRE(first.count("test_acc") == 1);
  CHECK(first_step == 0);
  const auto again = run(dir, 1);  // nothing left to train: Note [A finished run's metrics]
  CHECK(first_step == -1);         // and no step was taken (a deterministic retrain would match too)
  for (const std::string key :
       {"epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_count", "late_metric"}) {
    INFO(key);
    REQUIRE(again.count(key) == 1);
    CHECK(again.at(key) == first.at(key));  // bitwise: written at 17 digits
  }
  CHECK(run(dir, 2).at("epoch") == 2.0);  // more epochs train on
  CHECK(first_step == 3);  // after epoch 1's 3 steps (12 samples a rank, batches of 4)
}

TEST_CASE("trainer: the same command with stop_after_steps, resumed at that step, takes no step", "[train]") {
  const std::string dir = shared_dir("stop_again");
  const RunResult stopped = resumable_run(dir, 5, "auto");
  CHECK(stopped.first_step == 0);
  const RunResult again = resumable_run(dir, 5, "auto");  // before: it trained step 6, and 7 the next time
  CHECK(again.first_step == -1);
  CHECK(bitwise_equal(stopped.state, again.state));
  CHECK(resumable_run(dir, 7, "auto").first_step == 5);  // a later limit goes on from the checkpoint
}

TEST_CASE("trainer: resuming from an older checkpoint rewrites metrics.jsonl from that epoch on, one line each",
          "[train]") {
  const std::string dir = shared_dir("older");
  resumable_run(dir, 0, "never", /*every_steps=*/1, /*keep_last=*/0);  // every step's checkpoint kept
  const std::vector<nlohmann::json> full = metrics_lines(dir);
  REQUIRE(full.size() == 3);
  // The newest checkpoints are lost (or corrupt): the newest left is inside epoch 2.
  const int64_t keep_until = full[0]["step"].get<int64_t>() + 2;
  if (comm().rank() == 0) {
    for (const auto& path : lockstep::train::list_checkpoints(dir + "/checkpoints")) {
      const std::string name = fs::path(path).filename().string();
      if (std::stoll(name.substr(name.find("step") + 4)) > keep_until) fs::remove(path);
    }
  }
  comm().barrier()->wait();
  resumable_run(dir, 0, "auto", 1, 0);
  const std::vector<nlohmann::json> lines = metrics_lines(dir);
  REQUIRE(lines.size() == 3);
  for (size_t e = 0; e < lines.size(); ++e) {
    INFO("epoch " << e + 1);
    CHECK(lines[e]["epoch"].get<int64_t>() == static_cast<int64_t>(e + 1));
    CHECK(lines[e]["train_loss"].get<double>() == full[e]["train_loss"].get<double>());
    CHECK(lines[e]["test_loss"].get<double>() == full[e]["test_loss"].get<double>());
  }
}
