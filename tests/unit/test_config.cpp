// Config: YAML onto the options structs, and every kind of error naming the key path and its place.

#include <torch/torch.h>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>
#include <limits>
#include <utility>
#include <vector>

#include "lockstep/comm/work.hpp"
#include "lockstep/config/config.hpp"
#include "lockstep/data/cifar10.hpp"
#include "lockstep/ddp/comm_hooks.hpp"
#include "lockstep/train/foreach_optim.hpp"
#include "lockstep/core/error.hpp"
#include "support/grad_buckets.hpp"
#include "support/solo_communicator.hpp"
// Catch after the LibTorch headers: glog (through c10) defines CHECK too, and Catch's must win.
#include <catch2/catch.hpp>

namespace config = lockstep::config;
using Catch::Contains;

namespace {

// `parsed` and the configuration --print-config prints for it, read back: checks that the printed one
// prints the same, and returns both, for a test to check each field in each. emit.cpp is written
// apart from the parser, and a key it forgot comes back as its default (which comparing the two
// printouts alone would miss).
std::vector<config::ExperimentConfig> parsed_and_printed(const config::ExperimentConfig& parsed) {
  config::ExperimentConfig printed = config::parse_config(config::to_yaml(parsed), "printed");
  CHECK(config::to_yaml(printed) == config::to_yaml(parsed));
  return {parsed, std::move(printed)};
}

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    config::parse_config(yaml, "test.yaml", overrides);
  } catch (const lockstep::Error& e) {
    return e.message();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("config: empty text gives the documented defaults", "[config]") {
  const config::ExperimentConfig c = config::parse_config("", "empty.yaml");
  const lockstep::train::TrainerOptions defaults;
  CHECK(c.trainer.epochs == defaults.epochs);
  CHECK(c.trainer.batch_size == defaults.batch_size);
  CHECK(c.data.dataset == "fashion-mnist");
  CHECK(c.model.width == 64);
  CHECK(c.optimizer.lr == 0.1);
}

TEST_CASE("config: values map onto the options structs", "[config]") {
  const char* yaml = R"(
runtime: {threads: 2, backend: mpi, tune_malloc: false, timeout_s: 30}
trainer:
  epochs: 5
  batch_size: 16
  eval_batch_size: 100
  seed: 42
  output_dir: runs/x
  lr_schedule: {kind: cosine, warmup_epochs: 1.5, scale_with_world_size: true}
  checkpoint: {every_steps: 10, keep_last: 2, resume: never}
ddp: {bucket_cap_mb: 4, find_unused_parameters: true}
data: {dataset: synthetic, train_subset: 100, augment: {pad: 2, hflip: true}}
model: {width: 8, stem: small, in_channels: 1, num_classes: 10}
optimizer: {lr: 0.05, momentum: 0.8, weight_decay: 1e-4, nesterov: true}
)";
  const config::ExperimentConfig parsed = config::parse_config(yaml);
  for (const config::ExperimentConfig& c : parsed_and_printed(parsed)) {
    CHECK(c.runtime.threads == 2);
    CHECK(c.runtime.backend == "mpi");
    CHECK_FALSE(c.runtime.tune_malloc);
    CHECK(c.runtime.timeout.count() == 30000);
    CHECK(c.trainer.epochs == 5);
    CHECK(c.trainer.batch_size == 16);
    CHECK(c.trainer.eval_batch_size == 100);
    CHECK(c.trainer.seed == 42);
    CHECK(c.trainer.output_dir == "runs/x");
    CHECK(c.trainer.lr.kind == lockstep::train::LrScheduleKind::Cosine);
    CHECK(c.trainer.lr.warmup_epochs == 1.5);
    CHECK(c.trainer.lr.scale_lr_with_world_size);
    CHECK(c.trainer.checkpoint.every_steps == 10);
    CHECK(c.trainer.checkpoint.keep_last == 2);
    CHECK(c.trainer.checkpoint.resume == "never");
    CHECK(c.trainer.ddp.bucket_cap_mb == 4.0);
    CHECK(c.trainer.ddp.find_unused_parameters);
    CHECK(c.data.dataset == "synthetic");
    CHECK(c.data.train_subset == 100);
    CHECK(c.data.augment.pad == 2);
    CHECK(c.data.augment.hflip);
    CHECK(c.model.width == 8);
    CHECK(c.model.stem == lockstep::models::Stem::Small);
    CHECK(c.model.in_channels == 1);
    CHECK(c.optimizer.lr == 0.05);
    CHECK(c.optimizer.momentum == 0.8);
    CHECK(c.optimizer.weight_decay == 1e-4);
    CHECK(c.optimizer.nesterov);
  }
}

TEST_CASE("config: unknown keys name the path, line and column", "[config]") {
  const std::string top = error_of("trainr:\n  epochs: 3\n");
  CHECK_THAT(top, Contains("unknown config key 'trainr'") && Contains("test.yaml:1:1"));
  const std::string nested = error_of("trainer:\n  epochs: 3\n  epoch: 4\n");
  CHECK_THAT(nested, Contains("'trainer.epoch'") && Contains("test.yaml:3:3") && Contains("epochs"));
  const std::string deep = error_of("trainer:\n  lr_schedule:\n    kindd: cosine\n");
  CHECK_THAT(deep, Contains("'trainer.lr_schedule.kindd'") && Contains("test.yaml:3:5"));
}

TEST_CASE("config: wrong types name the path, line and column", "[config]") {
  const std::string integer = error_of("trainer:\n  epochs: three\n");
  CHECK_THAT(integer, Contains("'trainer.epochs'") && Contains("test.yaml:2:11") && Contains("expected an integer"));
  const std::string fraction = error_of("trainer:\n  batch_size: 1.5\n");
  CHECK_THAT(fraction, Contains("'trainer.batch_size'") && Contains("expected an integer"));
  const std::string boolean = error_of("optimizer:\n  nesterov: maybe\n");
  CHECK_THAT(boolean, Contains("'optimizer.nesterov'") && Contains("test.yaml:2:13") && Contains("true or false"));
  const std::string number = error_of("optimizer:\n  lr: fast\n");
  CHECK_THAT(number, Contains("'optimizer.lr'") && Contains("expected a number"));
  const std::string mapping = error_of("trainer: 5\n");
  CHECK_THAT(mapping, Contains("'trainer'") && Contains("expected a mapping"));
  const std::string sequence = error_of("trainer:\n  epochs: [1, 2]\n");
  CHECK_THAT(sequence, Contains("'trainer.epochs'") && Contains("a sequence"));
  const std::string choice = error_of("model:\n  stem: tiny\n");
  CHECK_THAT(choice, Contains("'model.stem'") && Contains("imagenet, small") && Contains("test.yaml:2:9"));
}

TEST_CASE("config: out-of-range values name the path, line and column", "[config]") {
  CHECK_THAT(error_of("optimizer:\n  momentum: 1.5\n"),
             Contains("'optimizer.momentum'") && Contains("test.yaml:2:13") && Contains("[0, 1)"));
  CHECK_THAT(error_of("trainer:\n  epochs: -1\n"), Contains("'trainer.epochs'") && Contains(">= 0"));
  CHECK_THAT(error_of("trainer:\n  batch_size: 0\n"), Contains("'trainer.batch_size'") && Contains(">= 1"));
  CHECK_THAT(error_of("trainer:\n  seed: -5\n"), Contains("'trainer.seed'"));
  CHECK_THAT(error_of("optimizer:\n  lr: 0\n"), Contains("'optimizer.lr'") && Contains("(0,"));
  CHECK_THAT(error_of("optimizer:\n  momentum: 0\n  nesterov: true\n"),
             Contains("'optimizer.nesterov'") && Contains("momentum > 0"));
}

TEST_CASE("config: --set overrides, with errors naming the argument", "[config]") {
  const auto c = config::parse_config("trainer:\n  epochs: 3\n", "test.yaml",
                                      {"trainer.epochs=7", "optimizer.lr=0.5", "data.augment.pad=4"});
  CHECK(c.trainer.epochs == 7);
  CHECK(c.optimizer.lr == 0.5);
  CHECK(c.data.augment.pad == 4);
  CHECK_THAT(error_of("", {"trainer.epoks=1"}), Contains("'trainer.epoks'") && Contains("--set trainer.epoks=1"));
  CHECK_THAT(error_of("", {"trainer.epochs=x"}), Contains("'trainer.epochs'") && Contains("--set trainer.epochs=x"));
  CHECK_THAT(error_of("", {"trainer.epochs"}), Contains("key.path=value"));
  CHECK_THAT(error_of("", {"trainer.=3"}), Contains("--set trainer.=3: empty key in the path 'trainer.'"));
  CHECK_THAT(error_of("", {"trainer.output_dir="}),
             Contains("no value after '='; write trainer.output_dir=\"\" for an empty string"));
  CHECK(config::parse_config("", "empty", {"trainer.output_dir=\"\""}).trainer.output_dir.empty());
  // A dot inside a key's name is not a path (the message named 'trainer.lr_schedule.kind', which exists).
  CHECK_THAT(error_of("trainer: {lr_schedule.kind: step}\n"),
             Contains("unknown config key 'lr_schedule.kind' under 'trainer' at test.yaml:1:11: a key's name holds a "
                      "dot"));
  // Booleans are YAML 1.2's, unquoted (yaml-cpp alone took y, n, yes, no, on, off and quoted forms).
  CHECK(config::parse_config("data: {augment: {hflip: True}}\n", "test.yaml").data.augment.hflip);
  CHECK_FALSE(config::parse_config("data: {augment: {hflip: FALSE}}\n", "test.yaml", {"data.augment.hflip=false"})
                  .data.augment.hflip);
  for (const char* word : {"y", "n", "yes", "off", "On"}) {
    CHECK_THAT(error_of(std::string("data: {augment: {hflip: ") + word + "}}\n"),
               Contains("'data.augment.hflip' at test.yaml:1:25: expected true or false, found '" + std::string(word) +
                        "'"));
  }
  CHECK_THAT(error_of("ema: {enabled: \"true\"}\n"),
             Contains("expected true or false, found the quoted string 'true' (unquote it)"));
  // A scalar where the file should have a section stays the file's error: the --set made it a mapping,
  // and `lr_schedule: cosine` trained on a constant schedule, `ema: true` without an average.
  CHECK_THAT(error_of("trainer:\n  lr_schedule: cosine\n", {"trainer.lr_schedule.warmup_steps=100"}),
             Contains("--set trainer.lr_schedule.warmup_steps=100: config key 'trainer.lr_schedule' at test.yaml:2:16 "
                      "is 'cosine', not a mapping that could hold 'warmup_steps'"));
  CHECK_THAT(error_of("ema: true\n", {"ema.decay=0.999"}), Contains("'ema' at test.yaml:1:6 is 'true'"));
  CHECK_THAT(error_of("trainer:\n  metrics: [accuracy]\n", {"trainer.metrics.top=5"}),
             Contains("config key 'trainer.metrics' at test.yaml:2:12 is a list"));
  // A --set through another --set's scalar names that --set, not a place in the file.
  CHECK_THAT(error_of("", {"trainer.epochs=3", "trainer.epochs.x=1"}),
             Contains("--set trainer.epochs.x=1: config key 'trainer.epochs' (from --set trainer.epochs=3) is '3', "
                      "not a mapping"));
  // An empty section (null) takes the key.
  CHECK(config::parse_config("ema:\n", "test.yaml", {"ema.decay=0.5"}).ema.options.decay == 0.5);
  // A section the --set itself made is named by it, not by the file (it has no line there).
  CHECK_THAT(error_of("trainer: {epochs: 1}\n", {"optimiser.lr=0.05"}),
             Contains("unknown config key 'optimiser' at --set optimiser.lr=0.05"));
  CHECK_THAT(error_of("", {"trainer.lr_shedule.kind=cosine"}),
             Contains("'trainer.lr_shedule' at --set trainer.lr_shedule.kind=cosine"));
}

TEST_CASE("config: --set changes only the key it names, not the other aliases of its anchor (Note [--set and YAML "
          "aliases])",
          "[config]") {
  const std::string yaml =
      "optimizer: {lr: &lr 0.1}\n"
      "trainer:\n"
      "  batch_size: &b 64\n"
      "  eval_batch_size: *b\n"
      "  lr_schedule: {base_lr: *lr}\n"
      "  checkpoint: &ck {every_steps: 5}\n";
  const auto plain = config::parse_config(yaml, "test.yaml");
  CHECK(plain.trainer.eval_batch_size == 64);
  CHECK(plain.trainer.lr.base_lr == 0.1);
  const auto c = config::parse_config(yaml, "test.yaml",
                                      {"trainer.lr_schedule.base_lr=0.05", "trainer.eval_batch_size=128",
                                       "trainer.checkpoint.keep_last=2"});
  CHECK(c.trainer.lr.base_lr == 0.05);
  CHECK(c.optimizer.lr == 0.1);
  CHECK(c.trainer.eval_batch_size == 128);
  CHECK(c.trainer.batch_size == 64);
  CHECK(c.trainer.checkpoint.keep_last == 2);
  CHECK(c.trainer.checkpoint.every_steps == 5);
  // A new key beside others in an anchored mapping. (A mapping aliased in two places is copied before
  // it is edited, but no two sections of a config share a shape, so no valid config shows it.)
  const auto d = config::parse_config("trainer:\n  checkpoint: &ck {every_steps: 5}\n", "test.yaml",
                                      {"trainer.checkpoint.keep_last=4"});
  CHECK(d.trainer.checkpoint.keep_last == 4);
  CHECK(d.trainer.checkpoint.every_steps == 5);
  // A key given twice stays an error, --set or not.
  CHECK_THAT(error_of("trainer: {epochs: 5, epochs: 6}\n", {"trainer.epochs=7"}), Contains("epochs"));
  CHECK_THAT(error_of("trainer: {epochs: 5}\ntrainer: {seed: 1}\n", {"trainer.epochs=7"}), Contains("trainer"));
}

TEST_CASE("config: invalid YAML and missing files", "[config]") {
  CHECK_THAT(error_of("trainer: [1, 2\n"), Contains("test.yaml") && Contains("invalid YAML"));
  CHECK_THROWS_WITH(config::load_config("/nonexistent/x.yaml"), Contains("/nonexistent/x.yaml"));
  // A directory reads as nothing, which would parse as the all-defaults config.
  CHECK_THROWS_WITH(config::load_config(std::filesystem::temp_directory_path().string()),
                    Contains("is a directory"));
  // A pipe reads like a file: --config <(sed ... base.yaml), or /dev/stdin.
  const std::filesystem::path fifo =
      std::filesystem::temp_directory_path() / ("lockstep_tests_config_fifo_" + std::to_string(::getpid()));
  std::filesystem::remove(fifo);
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  auto piped_epochs = [&fifo](const std::string& text) {
    std::atomic<bool> opened{false};
    std::thread writer([&fifo, &opened, text] {
      std::ofstream out(fifo);  // waits for a reader
      opened = true;
      out << text;
    });
    std::string error;
    int64_t epochs = -1;
    try {
      epochs = config::load_config(fifo.string()).trainer.epochs;
    } catch (const std::exception& e) {
      error = e.what();
      if (!opened) {  // refused before it opened the pipe: the writer still waits for a reader
        std::ifstream drain(fifo);
        std::string rest((std::istreambuf_iterator<char>(drain)), std::istreambuf_iterator<char>());
      }
    }
    writer.join();
    return std::make_pair(epochs, error);
  };
  const auto [epochs, error] = piped_epochs("trainer: {epochs: 7}\n");
  CHECK(error.empty());
  CHECK(epochs == 7);
  // A pipe that gives nothing (as /dev/null) is not the all-defaults config.
  CHECK_THAT(piped_epochs("").second, Contains("(not a regular file) read nothing"));
  std::filesystem::remove(fifo);
}

TEST_CASE("config: command line", "[config]") {
  std::vector<std::string> args = {"prog", "--config", "a.yaml", "--set", "trainer.epochs=2", "--set=model.width=8",
                                   "--print-config"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  const auto cli = config::parse_command_line(static_cast<int>(argv.size()), argv.data());
  CHECK(cli.config_path == "a.yaml");
  CHECK((cli.overrides == std::vector<std::string>{"trainer.epochs=2", "model.width=8"}));
  CHECK(cli.print_config);
  std::vector<std::string> bad = {"prog", "--confg", "a.yaml"};
  std::vector<char*> bad_argv;
  for (auto& a : bad) bad_argv.push_back(a.data());
  CHECK_THROWS_WITH(config::parse_command_line(3, bad_argv.data()), Contains("--confg"));
}

TEST_CASE("config: the shipped configs parse", "[config]") {
  namespace fs = std::filesystem;
  const fs::path dir = LOCKSTEP_SOURCE_DIR;  // from CMake: found wherever the build directory is
  REQUIRE(fs::exists(dir / "configs" / "demo.yaml"));
  const auto demo = config::load_config((dir / "configs" / "demo.yaml").string());
  CHECK(demo.model.width == 16);
  const auto full = config::load_config((dir / "configs" / "resnet18_fashion_mnist.yaml").string());
  CHECK(full.model.width == 64);
  CHECK(full.optimizer.nesterov);
  CHECK(full.trainer.lr.kind == lockstep::train::LrScheduleKind::Cosine);
  const auto pruned = config::load_config((dir / "configs" / "resnet18_fashion_mnist_pruned.yaml").string());
  CHECK(pruned.pruning.enabled);
  CHECK(pruned.pruning.options.target_sparsity == 0.8);
  CHECK(pruned.pruning.options.exclude == std::vector<std::string>{"^conv1\\.", "^fc\\."});
  CHECK_FALSE(full.pruning.enabled);
  const auto cpu = config::load_config((dir / "configs" / "resnet18_fashion_mnist_cpu.yaml").string());
  CHECK(cpu.model.width == 64);
  CHECK(cpu.trainer.precision == "bf16");
  const auto denoise = config::load_config((dir / "configs" / "denoise_fashion_mnist.yaml").string());
  CHECK(denoise.trainer.loss.name == "mse");
  CHECK(denoise.trainer.metrics == std::vector<std::string>{"mse", "mae"});
  // Every shipped config parses, including ones added later without a check of their own.
  int parsed = 0;
  for (const auto& entry : fs::directory_iterator(dir / "configs")) {
    if (entry.path().extension() != ".yaml") continue;
    INFO(entry.path().string());
    CHECK_NOTHROW(config::load_config(entry.path().string()));
    CHECK(config::load_config(entry.path().string()).warnings.empty());  // no key its modes ignore
    ++parsed;
  }
  CHECK(parsed >= 4);
}

TEST_CASE("config: the pruning section maps onto PruningOptions, with errors naming the key", "[config]") {
  namespace compress = lockstep::compress;
  const char* yaml = R"(
pruning:
  enabled: true
  granularity: structured
  scope: global
  schedule: gradual
  initial_sparsity: 0.1
  target_sparsity: 0.6
  begin_epoch: 1
  end_epoch: 3.5
  frequency: 50
  include: ['^layer']
  exclude: '^layer1\.'
  permanent_path: out/p.pt
)";
  const config::ExperimentConfig parsed = config::parse_config(yaml);
  for (const config::ExperimentConfig& c : parsed_and_printed(parsed)) {
    CHECK(c.pruning.enabled);
    const compress::PruningOptions& p = c.pruning.options;
    CHECK(p.granularity == compress::PruneGranularity::Structured);
    CHECK(p.scope == compress::PruneScope::Global);
    CHECK(p.initial_sparsity == 0.1);
    CHECK(p.target_sparsity == 0.6);
    CHECK(p.end_epoch == 3.5);
    CHECK(p.frequency == 50);
    CHECK(p.include == std::vector<std::string>{"^layer"});
    CHECK(p.exclude == std::vector<std::string>{"^layer1\\."});
    CHECK(p.permanent_path == "out/p.pt");
  }

  CHECK_THAT(error_of("pruning: {target_sparsty: 0.5}"), Contains("unknown config key 'pruning.target_sparsty'"));
  CHECK_THAT(error_of("pruning: {target_sparsity: 1.5}"), Contains("'pruning.target_sparsity' at test.yaml:1:"));
  CHECK_THAT(error_of("pruning: {granularity: blocks}"), Contains("expected one of n:m, structured, unstructured"));
  CHECK_THAT(error_of("pruning:\n  exclude: ['(unclosed']"),
             Contains("'pruning.exclude' at test.yaml:2:") && Contains("not a valid regular expression"));
  CHECK_THAT(error_of("pruning: {include: [{a: 1}]}"), Contains("expected a list of strings"));
  CHECK_THAT(error_of("pruning: {enabled: true, granularity: n:m}"), Contains("use the one_shot schedule"));
  CHECK_THAT(error_of("pruning: {enabled: true, begin_step: 10, end_step: 5}"),
             Contains("config key 'pruning' at test.yaml:1:") && Contains("end_step > begin_step"));
  // Disabled sections are still checked for keys and types, not for consistency.
  CHECK(error_of("pruning: {enabled: false, begin_step: 10, end_step: 5}") == "(no error)");
}

TEST_CASE("config: device, precision and the loss scaler", "[config]") {
  const lockstep::train::TrainerOptions defaults;
  CHECK(defaults.device == "auto");
  CHECK(defaults.precision == "fp32");
  CHECK_FALSE(defaults.channels_last);
  CHECK(lockstep::RuntimeOptions{}.device == "auto");
  const char* yaml = R"(
runtime: {device: cuda, backend: nccl}
trainer:
  device: cuda
  precision: fp16
  channels_last: true
  grad_scaler: {init_scale: 1024, growth_interval: 100, backoff_factor: 0.25}
)";
  const config::ExperimentConfig parsed = config::parse_config(yaml);
  for (const config::ExperimentConfig& c : parsed_and_printed(parsed)) {
    CHECK(c.runtime.device == "cuda");
    CHECK(c.runtime.backend == "nccl");
    CHECK(c.trainer.device == "cuda");
    CHECK(c.trainer.precision == "fp16");
    CHECK(c.trainer.channels_last);
    CHECK(c.trainer.grad_scaler.init_scale == 1024.0);
    CHECK(c.trainer.grad_scaler.growth_interval == 100);
    CHECK(c.trainer.grad_scaler.backoff_factor == 0.25);
    CHECK(c.trainer.grad_scaler.growth_factor == 2.0);
  }
  CHECK_THAT(error_of("trainer:\n  channels_last: nhwc\n"), Contains("'trainer.channels_last'"));
}

TEST_CASE("config: seeds use all 64 bits and read back from to_yaml", "[config]") {
  config::ExperimentConfig c = config::parse_config("trainer: {seed: 18446744073709551615}\n");
  CHECK(c.trainer.seed == 18446744073709551615ull);
  c.trainer.seed = 1ull << 63;
  c.ddp_powersgd.seed = (1ull << 63) + 5;
  const config::ExperimentConfig again = config::parse_config(config::to_yaml(c), "printed");
  CHECK(again.trainer.seed == 1ull << 63);
  CHECK(again.ddp_powersgd.seed == (1ull << 63) + 5);
  CHECK_THAT(error_of("trainer: {seed: 18446744073709551616}\n"),
             Contains("'trainer.seed'") && Contains("past 18446744073709551615"));
  CHECK_THAT(error_of("trainer: {seed: -1}\n"), Contains("expected an integer >= 0, found -1"));

  CHECK_THAT(error_of("trainer:\n  precision: fp8\n"),
             Contains("'trainer.precision'") && Contains("test.yaml:2:14") && Contains("bf16, fp16, fp32"));
  CHECK_THAT(error_of("trainer:\n  device: gpu\n"),
             Contains("'trainer.device'") && Contains("test.yaml:2:11") && Contains("auto, cpu, cuda"));
  CHECK_THAT(error_of("runtime:\n  device: tpu\n"), Contains("'runtime.device'") && Contains("test.yaml:2:11"));
  // trainer.device takes what TrainerOptions::device takes, cuda:N included.
  CHECK(config::parse_config("trainer:\n  device: cuda:1\n").trainer.device == "cuda:1");
  CHECK_THAT(error_of("trainer:\n  device: cuda:one\n"), Contains("'trainer.device'") && Contains("cuda:N"));
  CHECK_THAT(error_of("trainer:\n  grad_scaler:\n    backoff_factor: 1\n"),
             Contains("'trainer.grad_scaler.backoff_factor'") && Contains("test.yaml:3:21") && Contains("(0, 1)"));
  CHECK_THAT(error_of("trainer:\n  grad_scaler:\n    growth: 2\n"),
             Contains("unknown config key 'trainer.grad_scaler.growth'") && Contains("test.yaml:3:5"));
  CHECK_THAT(error_of("", {"trainer.precision=half"}),
             Contains("'trainer.precision'") && Contains("--set trainer.precision=half"));
}

TEST_CASE("config: ddp.comm_hook picks the bucket reduction, and round-trips", "[config]") {
  const config::ExperimentConfig defaults = config::parse_config("");
  CHECK(defaults.ddp_comm_hook == "allreduce");
  CHECK_FALSE(static_cast<bool>(defaults.trainer.ddp.comm_hook));  // the reducer's float32 average
  for (const std::string hook : {"fp16", "bf16"}) {
    INFO(hook);
    const config::ExperimentConfig c = config::parse_config("ddp:\n  comm_hook: " + hook + "\n");
    CHECK(c.ddp_comm_hook == hook);
    CHECK(lockstep::ddp::describe_comm_hook(c.trainer.ddp.comm_hook) == hook + "_compress_hook");
    const config::ExperimentConfig again = config::parse_config(config::to_yaml(c), "printed");
    CHECK(again.ddp_comm_hook == hook);
    CHECK(lockstep::ddp::describe_comm_hook(again.trainer.ddp.comm_hook) == hook + "_compress_hook");
    const config::ExperimentConfig set = config::parse_config("", "empty", {"ddp.comm_hook=" + hook});
    CHECK(lockstep::ddp::describe_comm_hook(set.trainer.ddp.comm_hook) == hook + "_compress_hook");
  }
  CHECK_FALSE(static_cast<bool>(config::parse_config("ddp: {comm_hook: allreduce}").trainer.ddp.comm_hook));
  CHECK_THAT(error_of("ddp:\n  comm_hook: int8\n"),
             Contains("'ddp.comm_hook'") && Contains("test.yaml:2:14") && Contains("allreduce, bf16, fp16"));
}

TEST_CASE("config: trainer.accumulation_steps and clip_grad_norm map onto TrainerOptions, and round-trip", "[config]") {
  const config::ExperimentConfig defaults = config::parse_config("");
  CHECK(defaults.trainer.accumulation_steps == 1);
  CHECK(defaults.trainer.clip_grad_norm == 0.0);
  const config::ExperimentConfig c = config::parse_config("trainer:\n  accumulation_steps: 4\n  clip_grad_norm: 2.5\n");
  CHECK(c.trainer.accumulation_steps == 4);
  CHECK(c.trainer.clip_grad_norm == 2.5);
  const config::ExperimentConfig again = config::parse_config(config::to_yaml(c), "printed");
  CHECK(again.trainer.accumulation_steps == 4);
  CHECK(again.trainer.clip_grad_norm == 2.5);
  CHECK_THAT(error_of("trainer:\n  accumulation_steps: 0\n"),
             Contains("'trainer.accumulation_steps'") && Contains("test.yaml:2:23"));
  CHECK_THAT(error_of("trainer:\n  clip_grad_norm: -1\n"), Contains("'trainer.clip_grad_norm'"));
}

TEST_CASE("config: trainer.init_from maps onto TrainerOptions, and round-trips", "[config]") {
  CHECK(config::parse_config("").trainer.init_from.empty());
  const config::ExperimentConfig c =
      config::parse_config("trainer:\n  init_from: runs/dense/checkpoints/checkpoint-step00000314.pt\n");
  for (const auto& each : parsed_and_printed(c)) {
    CHECK(each.trainer.init_from == "runs/dense/checkpoints/checkpoint-step00000314.pt");
  }
  CHECK_THAT(error_of("trainer:\n  init_from: [a, b]\n"), Contains("'trainer.init_from'"));
}

TEST_CASE("config: optimizer adam/adamw and zero build the named optimizer, and round-trip", "[config]") {
  const config::ExperimentConfig c =
      config::parse_config("optimizer:\n  name: adamw\n  lr: 0.002\n  beta2: 0.99\n  eps: 1.0e-6\n  zero: true\n");
  CHECK(c.optimizer.name == "adamw");
  CHECK(c.optimizer.beta2 == 0.99);
  CHECK(c.optimizer.eps == 1e-6);
  CHECK(c.optimizer.zero);
  const config::ExperimentConfig again = config::parse_config(config::to_yaml(c), "printed");
  CHECK(again.optimizer.name == "adamw");
  CHECK(again.optimizer.beta2 == 0.99);
  CHECK(again.optimizer.zero);
  torch::nn::Linear layer(3, 2);
  config::OptimizerConfig adam = c.optimizer;
  adam.zero = false;
  auto built = config::make_optimizer(adam, layer->parameters());
  REQUIRE(dynamic_cast<lockstep::train::ForeachAdamW*>(built.get()) != nullptr);  // docs/training.md
  CHECK(built->param_groups()[0].options().get_lr() == 0.002);
  adam.name = "adam";
  CHECK(dynamic_cast<lockstep::train::ForeachAdam*>(config::make_optimizer(adam, layer->parameters()).get()) != nullptr);
  adam.name = "sgd";
  CHECK(dynamic_cast<lockstep::train::ForeachSGD*>(config::make_optimizer(adam, layer->parameters()).get()) != nullptr);
  // Sharding needs the communicator: a clear error without one.
  CHECK_THROWS_WITH(config::make_optimizer(c.optimizer, layer->parameters()),
                    Contains("'optimizer.zero'") && Contains("needs the communicator"));
  CHECK_THAT(error_of("optimizer:\n  name: lamb\n"), Contains("'optimizer.name'") && Contains("adam, adamw, sgd"));
  CHECK_THAT(error_of("optimizer:\n  beta1: 1.5\n"), Contains("'optimizer.beta1'"));
}

TEST_CASE("config: the ema section maps onto EmaOptions, round-trips, and refuses pruning", "[config]") {
  CHECK_FALSE(config::parse_config("").ema.enabled);
  const config::ExperimentConfig c =
      config::parse_config("ema:\n  enabled: true\n  decay: 0.995\n  warmup: false\n  every_steps: 2\n");
  CHECK(c.ema.enabled);
  CHECK(c.ema.options.decay == 0.995);
  CHECK_FALSE(c.ema.options.warmup);
  CHECK(c.ema.options.every_steps == 2);
  const config::ExperimentConfig again = config::parse_config(config::to_yaml(c), "printed");
  CHECK(again.ema.enabled);
  CHECK(again.ema.options.decay == 0.995);
  CHECK(again.ema.options.every_steps == 2);
  CHECK_THAT(error_of("ema:\n  decay: 1.0\n"), Contains("'ema.decay'"));
  CHECK_THAT(error_of("ema:\n  enabled: true\npruning:\n  enabled: true\n"),
             Contains("'ema.enabled'") && Contains("cannot be combined with pruning.enabled"));
  CHECK(config::parse_config("ema:\n  enabled: true\nquantization:\n  enabled: true\n").ema.enabled);
  // The int8 file must be the model the metrics measured: the average, evaluated, stays in at the end.
  const std::string exported = "quantization: {enabled: true, export_path: m.int8}\n";
  CHECK_THAT(error_of(exported + "ema: {enabled: true, apply_at_end: false}\n"),
             Contains("'ema.apply_at_end'") && Contains("the int8 file would hold the raw weights"));
  CHECK(config::parse_config(exported + "ema: {enabled: true, apply_at_end: false, evaluate: false}\n").ema.enabled);
  CHECK(config::parse_config("quantization: {enabled: true}\nema: {enabled: true, apply_at_end: false}\n").ema.enabled);
}

TEST_CASE("config: ddp.sync_batch_norm maps onto DataParallelOptions, and round-trips", "[config]") {
  CHECK_FALSE(config::parse_config("").trainer.ddp.sync_batch_norm);
  const config::ExperimentConfig c = config::parse_config("ddp:\n  sync_batch_norm: true\n");
  CHECK(c.trainer.ddp.sync_batch_norm);
  CHECK(config::parse_config(config::to_yaml(c), "printed").trainer.ddp.sync_batch_norm);
  CHECK(config::parse_config("", "empty", {"ddp.sync_batch_norm=true"}).trainer.ddp.sync_batch_norm);
  CHECK_THAT(error_of("ddp:\n  sync_batch_norm: maybe\n"), Contains("'ddp.sync_batch_norm'") && Contains("test.yaml:2:20"));
}

TEST_CASE("config: ddp.comm_hook powersgd takes ddp.powersgd's options, round-trips, names bad keys", "[config]") {
  const config::ExperimentConfig defaults = config::parse_config("");
  const lockstep::ddp::PowerSGDOptions d;
  CHECK(defaults.ddp_powersgd.matrix_approximation_rank == d.matrix_approximation_rank);
  CHECK(defaults.ddp_powersgd.start_iteration == d.start_iteration);
  CHECK(defaults.ddp_powersgd.min_compression_rate == d.min_compression_rate);

  const char* yaml = R"(
ddp:
  comm_hook: powersgd
  powersgd:
    matrix_approximation_rank: 4
    start_iteration: 0
    min_compression_rate: 3.5
    use_error_feedback: false
    warm_start: false
    orthogonalization_epsilon: 1e-8
    seed: 7
)";
  const config::ExperimentConfig c = config::parse_config(yaml, "test.yaml");
  for (const config::ExperimentConfig& x : {c, config::parse_config(config::to_yaml(c), "printed")}) {
    const lockstep::ddp::PowerSGDOptions& o = x.ddp_powersgd;
    CHECK(x.ddp_comm_hook == "powersgd");
    CHECK(o.matrix_approximation_rank == 4);
    CHECK(o.start_iteration == 0);
    CHECK(o.min_compression_rate == 3.5);
    CHECK_FALSE(o.use_error_feedback);
    CHECK_FALSE(o.warm_start);
    CHECK(o.orthogonalization_epsilon == 1e-8);
    CHECK(o.seed == 7);
    // The hook is PowerSGD with these options: from iteration 0, a P and a Q round for a 40 x 40 matrix.
    REQUIRE(static_cast<bool>(x.trainer.ddp.comm_hook));
    lockstep::testing::SoloCommunicator solo;
    auto bucket = lockstep::testing::make_bucket({torch::ones({40, 40})}, {"w"});
    x.trainer.ddp.comm_hook(solo, bucket)->wait();
    CHECK(solo.allreduces == 2);
    // The trainer finds the hook's state this way, to checkpoint it (PowerSGDStateCallback).
    const auto state = lockstep::ddp::powersgd_state_of(x.trainer.ddp.comm_hook);
    REQUIRE(state != nullptr);
    CHECK(state->options().matrix_approximation_rank == 4);
    CHECK(state->stats().compressed_buckets == 1);
  }
  const auto set =
      config::parse_config("", "x", {"ddp.comm_hook=powersgd", "ddp.powersgd.matrix_approximation_rank=2"});
  CHECK(set.ddp_powersgd.matrix_approximation_rank == 2);
  CHECK(static_cast<bool>(set.trainer.ddp.comm_hook));

  CHECK_THAT(error_of("ddp:\n  powersgd:\n    matrix_approximation_rank: 0\n"),
             Contains("'ddp.powersgd.matrix_approximation_rank'") && Contains("test.yaml:3:") && Contains(">= 1"));
  CHECK_THAT(error_of("ddp: {powersgd: {min_compression_rate: 0.5}}"),
             Contains("'ddp.powersgd.min_compression_rate'") && Contains("found 0.5"));
  CHECK_THAT(error_of("ddp: {powersgd: {orthogonalization_epsilon: -1}}"),
             Contains("'ddp.powersgd.orthogonalization_epsilon'"));
  CHECK_THAT(error_of("ddp: {powersgd: {rank: 2}}"),
             Contains("unknown config key 'ddp.powersgd.rank'") && Contains("matrix_approximation_rank"));
  CHECK_THAT(error_of("", {"ddp.powersgd.warm_start=maybe"}),
             Contains("'ddp.powersgd.warm_start'") && Contains("--set ddp.powersgd.warm_start=maybe"));
}

TEST_CASE("config: the quantization section maps onto QuantizationOptions, with errors naming the key", "[config]") {
  const auto defaults = config::parse_config("");
  CHECK_FALSE(defaults.quantization.enabled);
  CHECK_FALSE(defaults.model.quantize_activations);
  const auto c = config::parse_config(R"yaml(
quantization:
  enabled: true
  per_channel: false
  begin_epoch: 1.5
  freeze_epoch: 2.5
  averaging_constant: 0.05
  exclude: ['^conv1\.', '^fc\.']
  export_path: out/int8.pt
)yaml",
                                      "test.yaml");
  const lockstep::compress::QuantizationOptions& q = c.quantization.options;
  CHECK(c.quantization.enabled);
  CHECK_FALSE(q.per_channel);
  CHECK(q.activations);
  CHECK(q.begin_epoch == 1.5);
  CHECK(q.freeze_epoch == 2.5);
  CHECK(q.averaging_constant == 0.05);
  CHECK(q.exclude == std::vector<std::string>{"^conv1\\.", "^fc\\."});
  CHECK(q.export_path == "out/int8.pt");
  CHECK(c.model.quantize_activations);  // the activation points come with activation quantization
  const auto again = config::parse_config(config::to_yaml(c));
  CHECK(again.quantization.options.exclude == q.exclude);
  CHECK(again.quantization.options.freeze_epoch == q.freeze_epoch);
  CHECK(again.model.quantize_activations);
  const auto weights_only = config::parse_config("", "x", {"quantization.enabled=true", "quantization.activations=false"});
  CHECK_FALSE(weights_only.model.quantize_activations);

  CHECK_THAT(error_of("quantization: {averaging_constant: 0}"),
             Contains("'quantization.averaging_constant' at test.yaml:1:") && Contains("(0, 1]"));
  CHECK_THAT(error_of("quantization: {per_chanel: true}"), Contains("unknown config key 'quantization.per_chanel'"));
  CHECK_THAT(error_of("quantization:\n  include: ['[x']"),
             Contains("'quantization.include' at test.yaml:2:") && Contains("not a valid regular expression"));
  CHECK_THAT(error_of("quantization: {enabled: true, begin_step: 10, freeze_step: 5}"),
             Contains("config key 'quantization' at test.yaml:1:") && Contains("must come after begin_step"));
  CHECK_THAT(error_of("quantization: {freeze_step: -2}"), Contains("'quantization.freeze_step'"));
  CHECK_THAT(error_of("quantization: {enabled: true, begin_step: 500, begin_epoch: 1}"),
             Contains("config key 'quantization'") && Contains("begin_step (500) with begin_epoch (1"));
  CHECK_THAT(error_of("pruning: {enabled: true, end_step: 5000, end_epoch: 10}"),
             Contains("config key 'pruning'") && Contains("end_step (5000) with end_epoch (10"));
  // What --print-config writes for a schedule in epochs (the steps at their defaults) reads back.
  parsed_and_printed(config::parse_config("pruning: {enabled: true, end_epoch: 10}\n"
                                          "quantization: {enabled: true, begin_epoch: 1, freeze_epoch: 2}\n"));
}

TEST_CASE("config: a value just past its bound is printed so that it differs from the bound", "[config]") {
  CHECK_THAT(error_of("optimizer: {lr: 1000001}"), Contains("expected a number in (0, 1e+06], found 1000001"));
  CHECK_THAT(error_of("trainer: {epochs: 99999999999999999999}"),
             Contains("'trainer.epochs'") && Contains("past the 64-bit range"));
}

TEST_CASE("config: a subset larger than the data set is an error, not all of it", "[config]") {
  config::DataConfig data;
  data.dataset = "fashion-mnist";
  data.test_subset = 20000;  // the test split has 10000
  try {
    config::make_datasets(data, 1);
    FAIL("no error");
  } catch (const lockstep::Error& e) {
    CHECK_THAT(e.message(), Contains("config key 'data.test_subset' is 20000, but") && Contains("has 10000 samples"));
  }
  data.test_subset = 10000;
  CHECK(config::make_datasets(data, 1).second->size() == 10000);
}

TEST_CASE("config: trainer.device on a GPU with runtime.device cpu is an error naming both", "[config]") {
  CHECK_THAT(error_of("runtime: {device: cpu}\ntrainer: {device: cuda}\n"),
             Contains("'trainer.device' at test.yaml:2:") && Contains("but runtime.device is cpu"));
  CHECK_THAT(error_of("runtime: {device: cpu}", {"trainer.device=cuda:1"}), Contains("is cuda:1, but runtime.device"));
  CHECK_NOTHROW(config::parse_config("runtime: {device: cpu}\ntrainer: {device: auto}\n"));
  CHECK_NOTHROW(config::parse_config("runtime: {device: auto}\ntrainer: {device: cuda}\n"));
}

TEST_CASE("config: keys the chosen mode ignores are reported, not refused (Note [Keys the chosen mode ignores])",
          "[config]") {
  auto warnings = [](const std::string& yaml, const std::vector<std::string>& overrides = {}) {
    return config::parse_config(yaml, "test.yaml", overrides).warnings;
  };
  const auto adam = warnings("optimizer: {name: adam, momentum: 0.5, nesterov: true}");
  REQUIRE(adam.size() == 2);
  CHECK_THAT(adam[0], Contains("config key 'optimizer.momentum' at test.yaml:1:") &&
                          Contains("is ignored: optimizer.name is adam (it is sgd's)"));
  CHECK_THAT(adam[1], Contains("'optimizer.nesterov'"));
  CHECK(warnings("optimizer: {name: adam, momentum: 0.9}").empty());  // the default: nothing to say
  CHECK_THAT(warnings("optimizer: {name: sgd, beta1: 0.8}").at(0), Contains("'optimizer.beta1'"));
  CHECK_THAT(warnings("ddp: {powersgd: {matrix_approximation_rank: 4}}").at(0),
             Contains("'ddp.powersgd.matrix_approximation_rank'") && Contains("ddp.comm_hook is allreduce, not powersgd"));
  CHECK(warnings("ddp: {comm_hook: powersgd, powersgd: {matrix_approximation_rank: 4}}").empty());
  CHECK_THAT(warnings("trainer: {grad_scaler: {init_scale: 1024}}").at(0),
             Contains("'trainer.grad_scaler.init_scale'") && Contains("only with trainer.precision fp16 (it is fp32)"));
  CHECK_THAT(warnings("trainer: {lr_schedule: {kind: step, min_lr: 0.001}}").at(0), Contains("cosine schedule's"));
  CHECK_THAT(warnings("trainer: {lr_schedule: {kind: cosine, gamma: 0.5}}").at(0), Contains("step schedule's"));
  CHECK_THAT(warnings("trainer: {loss: {name: mse, beta: 0.5}}").at(0),
             Contains("'trainer.loss.beta'") && Contains("trainer.loss.name is mse (beta is smooth_l1's)"));
  CHECK(warnings("trainer: {loss: {name: smooth_l1, beta: 0.5}}").empty());
  CHECK_THAT(warnings("trainer: {progress: false, log_every: 5}").at(0),
             Contains("'trainer.log_every'") && Contains("trainer.progress is false"));
  CHECK(warnings("trainer: {progress: true, log_every: 5}").empty());
  CHECK_THAT(warnings("data: {dataset: synthetic, dir: /data/x}").at(0),
             Contains("'data.dir'") && Contains("data.dataset is synthetic"));
  CHECK(warnings("data: {dataset: mnist, dir: /data/x}").empty());
  // Pruning: the schedule's and the granularity's keys, only in a section that is on.
  const auto one_shot = warnings("pruning: {enabled: true, schedule: one_shot, end_epoch: 3, frequency: 5}");
  REQUIRE(one_shot.size() == 2);
  CHECK_THAT(one_shot[0], Contains("'pruning.end_epoch'") && Contains("pruning.schedule is one_shot, which prunes "
                                                                      "once, at begin_step or begin_epoch"));
  CHECK_THAT(one_shot[1], Contains("'pruning.frequency'"));
  CHECK(warnings("pruning: {enabled: false, schedule: one_shot, end_epoch: 3}").empty());
  CHECK(warnings("pruning: {enabled: true, schedule: gradual, end_epoch: 3, frequency: 5}").empty());
  const auto nm = warnings("pruning: {enabled: true, granularity: 'n:m', schedule: one_shot, target_sparsity: 0.9}");
  REQUIRE(nm.size() == 1);
  CHECK_THAT(nm[0], Contains("'pruning.target_sparsity'") && Contains("whose sparsity is 1 - n/m"));
  CHECK_THAT(warnings("pruning: {enabled: true, granularity: structured, m: 8}").at(0),
             Contains("'pruning.m'") && Contains("n and m are the n:m granularity's"));
  // Checkpoint keys of a run with nowhere to keep them; with an output_dir they are read.
  const auto unkept = warnings("trainer: {checkpoint: {every_steps: 10, every_epoch: false, keep_last: 1, at_end: false}}");
  REQUIRE(unkept.size() == 4);
  CHECK_THAT(unkept[0], Contains("'trainer.checkpoint.every_steps'") &&
                            Contains("this run keeps no checkpoints (trainer.output_dir and trainer.checkpoint.directory "
                                     "are empty)"));
  CHECK_THAT(unkept[1], Contains("'trainer.checkpoint.every_epoch'"));
  CHECK_THAT(unkept[2], Contains("'trainer.checkpoint.keep_last'"));
  CHECK_THAT(unkept[3], Contains("'trainer.checkpoint.at_end'"));
  // enabled: false turns them off on purpose, keys and all.
  CHECK(warnings("trainer: {output_dir: runs/a, checkpoint: {enabled: false, keep_last: 1}}").empty());
  CHECK(warnings("trainer: {output_dir: runs/a, checkpoint: {every_steps: 10, keep_last: 1}}").empty());
  // The shipped SGD config run with Adam from the command line: it runs, and says what Adam ignores.
  const auto demo = warnings("optimizer: {name: sgd, momentum: 0.9, nesterov: true}", {"optimizer.name=adam"});
  REQUIRE(demo.size() == 1);
  CHECK_THAT(demo[0], Contains("'optimizer.nesterov' at test.yaml:1:"));
  // Not part of the configuration: --print-config's text reads back the same.
  parsed_and_printed(config::parse_config("optimizer: {name: adam, nesterov: true}"));
}

TEST_CASE("config: checkpoint.resume and directory are refused where no checkpoints are kept", "[config]") {
  CHECK_THAT(error_of("trainer:\n  checkpoint:\n    resume: runs/a/checkpoints/checkpoint-step00000100.pt\n"),
             Contains("'trainer.checkpoint.resume' at test.yaml:3:") && Contains("this run keeps no checkpoints") &&
                 Contains("output_dir and trainer.checkpoint.directory are empty"));
  CHECK_THAT(error_of("trainer: {output_dir: runs/a, checkpoint: {enabled: false, resume: x.pt}}"),
             Contains("'trainer.checkpoint.resume'") && Contains("trainer.checkpoint.enabled is false"));
  CHECK_THAT(error_of("trainer: {output_dir: runs/a, checkpoint: {enabled: false, directory: /scratch/ck}}"),
             Contains("'trainer.checkpoint.directory'") && Contains("trainer.checkpoint.enabled is false"));
  // auto and never need no file; a directory alone is somewhere to keep them.
  CHECK_NOTHROW(config::parse_config("trainer: {checkpoint: {resume: never}}"));
  CHECK(config::parse_config("trainer: {checkpoint: {directory: /scratch/ck, resume: /scratch/ck/a.pt}}")
            .trainer.checkpoint.directory == "/scratch/ck");
}

TEST_CASE("config: --set with a mapping sets the keys it holds and keeps the section's others", "[config]") {
  const std::string yaml = "trainer:\n  lr_schedule:\n    kind: cosine\n    warmup_epochs: 2\n";
  const auto c = config::parse_config(yaml, "test.yaml", {"trainer.lr_schedule={warmup_steps: 100, min_lr: 0.001}"});
  CHECK(c.trainer.lr.kind == lockstep::train::LrScheduleKind::Cosine);
  CHECK(c.trainer.lr.warmup_epochs == 2.0);
  CHECK(c.trainer.lr.warmup_steps == 100);
  CHECK(c.trainer.lr.min_lr == 0.001);
  // Nested mappings merge too; an empty mapping resets the section to its defaults.
  const auto nested = config::parse_config(yaml, "test.yaml", {"trainer={epochs: 4, lr_schedule: {gamma: 0.5}}"});
  CHECK(nested.trainer.epochs == 4);
  CHECK(nested.trainer.lr.kind == lockstep::train::LrScheduleKind::Cosine);
  CHECK(nested.trainer.lr.gamma == 0.5);
  CHECK(config::parse_config(yaml, "test.yaml", {"trainer.lr_schedule={}"}).trainer.lr.kind ==
        lockstep::train::TrainerOptions{}.lr.kind);
  // Errors name the argument: an unknown key inside, a key given twice.
  CHECK_THAT(error_of(yaml, {"trainer.lr_schedule={warmup: 3}"}),
             Contains("unknown config key 'trainer.lr_schedule.warmup'") && Contains("--set trainer.lr_schedule={warmup: 3}"));
  // A bad key the file kept is the file's, at its line, not the argument's.
  CHECK_THAT(error_of("trainer:\n  lr_schedule:\n    kind: cosin\n", {"trainer.lr_schedule={warmup_steps: 100}"}),
             Contains("'trainer.lr_schedule.kind' at test.yaml:3:") && !Contains("--set"));
  CHECK_THAT(error_of(yaml, {"trainer.lr_schedule={gamma: 0.5, gamma: 0.1}"}),
             Contains("config key 'trainer.lr_schedule.gamma' is given twice in the mapping"));
}

TEST_CASE("config: stop signals and the time limit, a signal that cannot stop a run is named", "[config]") {
  const lockstep::train::TrainerOptions defaults;
  CHECK(defaults.stop_signals == std::vector<std::string>{"SIGTERM", "SIGUSR1"});
  const config::ExperimentConfig parsed = config::parse_config("trainer: {stop_signals: [usr2, SIGTERM], stop_after_seconds: 3600}\n", "test.yaml");
  for (const config::ExperimentConfig& c : parsed_and_printed(parsed)) {
    CHECK(c.trainer.stop_signals == std::vector<std::string>{"usr2", "SIGTERM"});
    CHECK(c.trainer.stop_after_seconds == 3600);
  }
  CHECK(config::parse_config("", "t", {"trainer.stop_signals=[]"}).trainer.stop_signals.empty());
  CHECK(config::parse_config("", "t", {"trainer.stop_signals=HUP"}).trainer.stop_signals ==
        std::vector<std::string>{"HUP"});
  CHECK_THAT(error_of("trainer:\n  stop_signals: [SIGTERM, SIGKILL]\n"),
             Contains("config key 'trainer.stop_signals' at test.yaml:2:") &&
                 Contains("'SIGKILL' is not a signal a run can stop on"));
  CHECK_THAT(error_of("trainer: {stop_after_seconds: -1}\n"), Contains("trainer.stop_after_seconds"));
}

TEST_CASE("config: the early_stopping section maps onto EarlyStoppingOptions, round-trips, names bad keys",
          "[config]") {
  CHECK_FALSE(config::parse_config("").early_stopping.enabled);
  const config::ExperimentConfig parsed = config::parse_config(
      "early_stopping: {enabled: true, monitor: test_acc, mode: max, patience: 2, min_delta: 0.001,\n"
      "                 restore_best_weights: true}\n",
      "test.yaml");
  for (const config::ExperimentConfig& c : parsed_and_printed(parsed)) {
    CHECK(c.early_stopping.enabled);
    CHECK(c.early_stopping.options.monitor == "test_acc");
    CHECK(c.early_stopping.options.mode == "max");
    CHECK(c.early_stopping.options.patience == 2);
    CHECK(c.early_stopping.options.min_delta == 0.001);
    CHECK(c.early_stopping.options.restore_best_weights);
  }
  CHECK_THAT(error_of("early_stopping:\n  patience: 0\n"), Contains("'early_stopping.patience'"));
  CHECK_THAT(error_of("early_stopping:\n  mode: lowest\n"), Contains("'early_stopping.mode'") && Contains("lowest"));
  CHECK_THAT(error_of("early_stopping:\n  min_delta: -1\n"), Contains("'early_stopping.min_delta'"));
  CHECK_THAT(error_of("early_stopping:\n  monitor: ''\n"), Contains("'early_stopping.monitor'"));
  CHECK_THAT(error_of("early_stopping:\n  patient: 3\n"), Contains("early_stopping.patient"));
  // Note [Best weights and compression]: the best epoch's weights can predate quantization.
  CHECK_THAT(error_of("quantization: {enabled: true}\n"
                      "early_stopping: {enabled: true, restore_best_weights: true}\n"),
             Contains("'early_stopping.restore_best_weights'") && Contains("cannot be combined with quantization.enabled"));
  CHECK_NOTHROW(config::parse_config("quantization: {enabled: true}\n"
                                     "early_stopping: {enabled: true, restore_best_weights: false}\n"));
}

TEST_CASE("config: trainer.loss and trainer.metrics map onto TrainerOptions, round-trip, and name bad values",
          "[config]") {
  const config::ExperimentConfig defaults = config::parse_config("");
  CHECK(defaults.trainer.loss.name == "cross_entropy");
  CHECK(defaults.trainer.metrics == std::vector<std::string>{"accuracy"});
  const config::ExperimentConfig parsed = config::parse_config(
      "trainer:\n  loss: {name: cross_entropy, label_smoothing: 0.1, ignore_index: 255}\n"
      "  metrics: [accuracy, top5_accuracy, macro_f1]\n");
  for (const config::ExperimentConfig& c : parsed_and_printed(parsed)) {
    CHECK(c.trainer.loss.label_smoothing == 0.1);
    CHECK(c.trainer.loss.ignore_index == 255);
    CHECK(c.trainer.metrics == std::vector<std::string>{"accuracy", "top5_accuracy", "macro_f1"});
  }
  const config::ExperimentConfig regression =
      config::parse_config("trainer:\n  loss:\n    name: smooth_l1\n    beta: 0.5\n  metrics: [mse, mae]\n");
  CHECK(regression.trainer.loss.name == "smooth_l1");
  CHECK(regression.trainer.loss.beta == 0.5);
  CHECK(config::parse_config("trainer: {metrics: []}").trainer.metrics.empty());  // the loss alone
  // Left empty (null): an error, as for a scalar key; it kept the default list.
  CHECK_THAT(error_of("trainer:\n  metrics:\n"),
             Contains("'trainer.metrics'") && Contains("expected a list of strings ([] for none)"));
  CHECK_THAT(error_of("trainer:\n  stop_signals: ~\n"), Contains("'trainer.stop_signals'"));
  CHECK(config::parse_config(config::to_yaml(config::parse_config("trainer: {metrics: []}"))).trainer.metrics.empty());

  CHECK_THAT(error_of("trainer:\n  loss:\n    name: hinge\n"),
             Contains("'trainer.loss.name'") && Contains("test.yaml:3:11") && Contains("bce_with_logits"));
  CHECK_THAT(error_of("trainer:\n  loss: {name: mse, label_smoothing: 0.1}\n"),
             Contains("'trainer.loss'") && Contains("label_smoothing applies to cross_entropy only"));
  CHECK_THAT(error_of("trainer:\n  loss: {label_smoothing: 1}\n"), Contains("'trainer.loss.label_smoothing'"));
  CHECK_THAT(error_of("trainer:\n  loss: {name: mse, ignore_index: 255}\n"),
             Contains("'trainer.loss'") && Contains("ignore_index applies to cross_entropy only"));
  CHECK_THAT(error_of("trainer:\n  loss: {smoothing: 0.1}\n"), Contains("trainer.loss.smoothing"));
  CHECK_THAT(error_of("trainer:\n  metrics: [accuracy, f1]\n"),
             Contains("'trainer.metrics'") && Contains("test.yaml:2:12") && Contains("unknown metric 'f1'"));
}

TEST_CASE("config: program_config reads the command line, handles --help and --print-config, reports errors", "[config]") {
  auto run = [](std::vector<std::string> args, const std::string& default_yaml) {
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    return config::program_config(static_cast<int>(argv.size()), argv.data(), "prog", default_yaml);
  };
  const auto plain = run({"prog", "--set", "trainer.epochs=3"}, "trainer: {epochs: 2, batch_size: 8}\n");
  CHECK_FALSE(plain.exit_status.has_value());
  CHECK(plain.config.trainer.epochs == 3);  // the default config, with the override on top
  CHECK(plain.config.trainer.batch_size == 8);
  CHECK(run({"prog", "--help"}, "").exit_status == 0);
  // --help says whether --config is needed: a program without a built-in config requires it.
  CHECK_THAT(config::usage("prog", false), Contains("usage: prog --config FILE") && Contains("(required)"));
  CHECK_THAT(config::usage("prog"), Contains("[--config FILE]") && Contains("(default: the built-in one)"));
  CHECK(run({"prog", "--print-config"}, "trainer: {epochs: 2}\n").exit_status == 0);
  CHECK(run({"prog"}, "").exit_status == 2);  // no default: --config is required (the message goes to stderr)
  CHECK(run({"prog", "--set", "trainer.epochs=three"}, "trainer: {epochs: 2}\n").exit_status == 2);
  CHECK(run({"prog", "--config", "/nonexistent/lockstep.yaml"}, "").exit_status == 2);
}

TEST_CASE("config: a key given twice is an error naming the key path and both places", "[config]") {
  // yaml-cpp keeps both entries and node[key] returns the first: the second block was silently ignored.
  const std::string top = error_of("trainer: {epochs: 3}\nmodel: {width: 8}\ntrainer: {epochs: 50, bogus: 1}\n");
  CHECK_THAT(top, Contains("config key 'trainer' is given twice") && Contains("test.yaml:1:1") &&
                      Contains("test.yaml:3:1"));
  const std::string nested = error_of("trainer:\n  epochs: 3\n  batch_size: 8\n  epochs: 50\n");
  CHECK_THAT(nested, Contains("'trainer.epochs' is given twice") && Contains("test.yaml:2:3") &&
                         Contains("test.yaml:4:3"));
  const std::string deep = error_of("trainer:\n  lr_schedule:\n    kind: cosine\n    kind: step\n");
  CHECK_THAT(deep, Contains("'trainer.lr_schedule.kind' is given twice") && Contains("test.yaml:3:5") &&
                       Contains("test.yaml:4:5"));
  CHECK_THAT(error_of("data:\n  augment: {pad: 2}\n  augment: {hflip: true}\n"),
             Contains("'data.augment' is given twice") && Contains("test.yaml:2:3") && Contains("test.yaml:3:3"));
  // --set on top of a file with a key given twice: the file's places are named.
  CHECK_THAT(error_of("trainer:\n  epochs: 3\ntrainer:\n  epochs: 5\n", {"trainer.epochs=7"}),
             Contains("'trainer' is given twice") && Contains("test.yaml:1:1") && Contains("test.yaml:3:1"));
  // A mapping given by --set is checked alike, and named by its argument.
  CHECK_THAT(error_of("", {"trainer={epochs: 1, epochs: 2}"}),
             Contains("'trainer.epochs' is given twice") && Contains("--set trainer={epochs: 1, epochs: 2}"));
  // --set itself still replaces a key, without making a second one.
  const auto c = config::parse_config("trainer:\n  epochs: 3\n", "test.yaml", {"trainer.epochs=7", "trainer.epochs=9"});
  CHECK(c.trainer.epochs == 9);
  CHECK(config::parse_config(config::to_yaml(c), "printed").trainer.epochs == 9);
}

TEST_CASE("config: the text holds one YAML document", "[config]") {
  const std::string two = error_of("trainer: {epochs: 3}\n---\ntrainer: {epochs: 50}\n");
  CHECK_THAT(two, Contains("config test.yaml") && Contains("expected one YAML document, found 2") &&
                      Contains("test.yaml:3:") && Contains("'---'"));
  CHECK_THAT(error_of("model: {width: 8}\n---\nmodel: {width: 16}\n---\nmodel: {width: 32}\n"), Contains("found 3"));
  // An explicit start of the one document is fine, and so is no document at all.
  CHECK(config::parse_config("---\ntrainer: {epochs: 3}\n").trainer.epochs == 3);
  CHECK(config::parse_config("# only a comment\n").trainer.epochs == lockstep::train::TrainerOptions{}.epochs);
  CHECK_THAT(error_of("", {"trainer.epochs=1\n---\n2"}),
             Contains("--set trainer.epochs=1") && Contains("more than one YAML document"));
}

TEST_CASE("config: integers are plain decimal, a leading zero is an error, not octal", "[config]") {
  CHECK(config::parse_config("trainer: {epochs: 10}").trainer.epochs == 10);
  CHECK(config::parse_config("trainer: {epochs: 0}").trainer.epochs == 0);
  CHECK(config::parse_config("trainer: {epochs: +7}").trainer.epochs == 7);
  CHECK(config::parse_config("quantization: {freeze_step: -1}").quantization.options.freeze_step == -1);
  // yaml-cpp alone reads 010 as 8, and 08 as an unexplained error.
  CHECK_THAT(error_of("trainer:\n  epochs: 010\n"),
             Contains("'trainer.epochs'") && Contains("test.yaml:2:11") &&
                 Contains("expected an integer, found '010'") && Contains("leading zeros are not allowed"));
  CHECK_THAT(error_of("trainer:\n  epochs: 08\n"),
             Contains("expected an integer, found '08'") && Contains("leading zeros are not allowed"));
  CHECK_THAT(error_of("quantization: {freeze_step: -01}"),
             Contains("'quantization.freeze_step'") && Contains("leading zeros are not allowed"));
  CHECK_THAT(error_of("trainer: {seed: 0x10}"), Contains("'trainer.seed'") && Contains("expected an integer, found '0x10'"));
  CHECK_THAT(error_of("trainer: {epochs: 0x10}"),
             Contains("hexadecimal is not allowed") && !Contains("octal"));
  CHECK_THAT(error_of("trainer: {epochs: 012x}"), Contains("leading zeros are not allowed"));
  CHECK_THAT(error_of("", {"trainer.epochs=007"}),
             Contains("'trainer.epochs'") && Contains("--set trainer.epochs=007") && Contains("leading zeros"));
  // Not integers at all: the error has no hint about zeros.
  const std::string fraction = error_of("trainer: {batch_size: 0.5}");
  CHECK_THAT(fraction, Contains("'trainer.batch_size'") && Contains("expected an integer, found '0.5'"));
  CHECK_THAT(fraction, !Contains("leading zeros"));
  CHECK_THAT(error_of("trainer: {epochs: 99999999999999999999}"),
             Contains("'trainer.epochs'") && Contains("expected an integer"));
}

TEST_CASE("config: runtime.timeout_s past ~100 years is the longest wait, below 1 ms an error", "[config]") {
  const long long max_ms = lockstep::comm::kMaxTimeout.count();
  // 1e18 s in milliseconds is past int64's range: the cast was undefined.
  const config::ExperimentConfig huge = config::parse_config("runtime: {timeout_s: 1e18}\n");
  CHECK(huge.runtime.timeout.count() == max_ms);
  CHECK(config::parse_config("runtime: {timeout_s: 1e300}\n").runtime.timeout.count() == max_ms);
  // --print-config's output reads back as the same configuration.
  const config::ExperimentConfig again = config::parse_config(config::to_yaml(huge), "printed");
  CHECK(again.runtime.timeout.count() == max_ms);
  CHECK(config::to_yaml(again) == config::to_yaml(huge));
  // Rounded to the nearest millisecond (1.001 * 1e3 is 1000.9999999999999 in doubles).
  CHECK(config::parse_config("runtime: {timeout_s: 1.001}").runtime.timeout.count() == 1001);
  CHECK(config::parse_config("runtime: {timeout_s: 0.001}").runtime.timeout.count() == 1);
  CHECK(config::parse_config("runtime: {timeout_s: 0}").runtime.timeout.count() == 0);  // the default
  const config::ExperimentConfig ms = config::parse_config("runtime: {timeout_s: 1.289}");
  CHECK(ms.runtime.timeout.count() == 1289);
  CHECK(config::parse_config(config::to_yaml(ms), "printed").runtime.timeout.count() == 1289);
  // Below 1 ms it would round to 0, which means the default.
  CHECK_THAT(error_of("runtime:\n  timeout_s: 0.0001\n"),
             Contains("'runtime.timeout_s'") && Contains("test.yaml:2:14") && Contains("at least 0.001") &&
                 Contains("found 0.0001"));
  // The value found is printed as written, not at 6 digits ("found 0.001" beside "at least 0.001").
  CHECK_THAT(error_of("runtime: {timeout_s: 0.0009999999}\n"), Contains("found 0.0009999999"));
  CHECK_THAT(error_of("", {"runtime.timeout_s=1e-9"}),
             Contains("'runtime.timeout_s'") && Contains("--set runtime.timeout_s=1e-9"));
  CHECK_THAT(error_of("runtime:\n  timeout_s: -1\n"), Contains("'runtime.timeout_s'"));
  // Not a number: infinity is not accepted (a large value is the longest wait).
  CHECK_THAT(error_of("runtime:\n  timeout_s: .inf\n"), Contains("'runtime.timeout_s'") && Contains("expected a number"));
}

TEST_CASE("config: the synthetic data set's sizes are bounded, naming the key, before anything is allocated",
          "[config]") {
  CHECK(config::kMaxSyntheticSamples == 2147483648LL);
  CHECK_THAT(error_of("data:\n  dataset: synthetic\n  train_subset: 100000000000\n"),
             Contains("'data.train_subset'") && Contains("test.yaml:3:17") && Contains("at most 2147483648") &&
                 Contains("found 100000000000"));
  CHECK_THAT(error_of("data: {dataset: synthetic, test_subset: 9223372036854775807}"),
             Contains("'data.test_subset'") && Contains("at most 2147483648"));
  CHECK_THAT(error_of("data: {train_subset: 100000000000}", {"data.dataset=synthetic"}),
             Contains("'data.train_subset'") && Contains("at most 2147483648"));
  // A limit on a data set from files is "at most": any size is fine there.
  CHECK(config::parse_config("data: {dataset: mnist, dir: /d, train_subset: 100000000000}").data.train_subset == 100000000000LL);
  CHECK(config::parse_config("data: {dataset: synthetic, train_subset: 2147483648}").data.train_subset == 2147483648LL);

  // make_datasets checks a DataConfig made in code alike, before the index lists are made.
  config::DataConfig data;
  data.dataset = "synthetic";
  data.train_subset = 100000000000LL;
  CHECK_THROWS_WITH(config::make_datasets(data, 0), Contains("'data.train_subset'") && Contains("at most 2147483648"));
  data.train_subset = 0;
  data.test_subset = std::numeric_limits<int64_t>::max();  // train + test overflowed int64
  CHECK_THROWS_WITH(config::make_datasets(data, 0), Contains("'data.test_subset'") && Contains("at most 2147483648"));
  data.train_subset = config::kMaxSyntheticSamples;
  data.test_subset = 0;
  const auto sets = config::make_datasets(data, 0);
  CHECK(sets.first->size() == 2147483648ULL);
  CHECK(sets.second->size() == 256);
}

TEST_CASE("config: --config must name a file, once", "[config]") {
  auto parse = [](std::vector<std::string> args) {
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    return config::parse_command_line(static_cast<int>(argv.size()), argv.data());
  };
  CHECK(parse({"prog", "--config=a.yaml"}).config_path == "a.yaml");
  CHECK_THROWS_WITH(parse({"prog", "--config="}), Contains("--config") && Contains("empty"));
  CHECK_THROWS_WITH(parse({"prog", "--config", ""}), Contains("--config") && Contains("empty"));
  CHECK_THROWS_WITH(parse({"prog", "--config", "a.yaml", "--config=b.yaml"}),
                    Contains("--config is given twice") && Contains("a.yaml") && Contains("b.yaml"));
  CHECK_THROWS_WITH(parse({"prog", "--config"}), Contains("--config needs a value"));
  // program_config: an empty --config is an error, not the built-in default.
  auto run = [](std::vector<std::string> args, const std::string& default_yaml) {
    std::vector<char*> argv;
    for (auto& arg : args) argv.push_back(arg.data());
    return config::program_config(static_cast<int>(argv.size()), argv.data(), "prog", default_yaml);
  };
  CHECK(run({"prog", "--config="}, "trainer: {epochs: 2}\n").exit_status == 2);
  CHECK(run({"prog", "--config", ""}, "trainer: {epochs: 2}\n").exit_status == 2);
  CHECK_FALSE(run({"prog"}, "trainer: {epochs: 2}\n").exit_status.has_value());
}

TEST_CASE("config: settings that cannot work together are refused at their line, before MPI starts", "[config]") {
  // Each failed later, after MPI started and the data loaded, with a message naming no place.
  CHECK_THAT(error_of("runtime:\n  device: cpu\n  backend: nccl\n"),
             Contains("config key 'runtime.backend' at test.yaml:3:12: is nccl") && Contains("runtime.device is cpu"));
  CHECK(config::parse_config("runtime: {device: cpu, backend: mpi}\n").runtime.backend == "mpi");
  CHECK(config::parse_config("runtime: {device: auto, backend: nccl}\n").runtime.backend == "nccl");
  CHECK_THAT(error_of("trainer:\n  metrics: [accuracy, top5_accuracy, accuracy]\n"),
             Contains("config key 'trainer.metrics' at test.yaml:2:12: 'accuracy' is given twice"));
  CHECK_THAT(error_of("data: {dataset: mnist}\n"),
             Contains("config key 'data.dir'") && Contains("data.dataset mnist has no default directory"));
  CHECK_THAT(error_of("", {"data.dataset=cifar10"}), Contains("data.dataset cifar10 has no default directory"));
  CHECK(config::parse_config("data: {dataset: fashion-mnist}\n").data.dir.empty());
  CHECK_THAT(error_of("optimizer: {lr: 0.1}\ntrainer:\n  lr_schedule: {kind: cosine, min_lr: 0.5}\n"),
             Contains("config key 'trainer.lr_schedule.min_lr' at test.yaml:3:39: is 0.5, above the cosine "
                      "schedule's peak 0.1 (optimizer.lr)"));
  CHECK_THAT(error_of("trainer:\n  lr_schedule: {kind: cosine, min_lr: 0.5, base_lr: 0.2}\n"),
             Contains("peak 0.2 (base_lr)"));
  // Scaled by the world size, the peak is known only at run time (the trainer checks it).
  CHECK(config::parse_config("optimizer: {lr: 0.1}\ntrainer:\n  lr_schedule: {kind: cosine, min_lr: 0.5, "
                             "scale_with_world_size: true}\n")
            .trainer.lr.min_lr == 0.5);
}

TEST_CASE("config: data.records_per_file is cifar10's, and --print-config writes it back only there", "[config]") {
  const config::ExperimentConfig own = config::parse_config("data: {dataset: cifar10, dir: /d, records_per_file: 0}\n", "t.yaml");
  CHECK(own.data.records_per_file == 0);
  CHECK(config::parse_config("data: {dataset: cifar10, dir: /d}\n", "t.yaml").data.records_per_file == 10000);
  const std::string printed = config::to_yaml(own);
  CHECK_THAT(printed, Contains("records_per_file: 0"));
  CHECK(config::parse_config(printed, "printed").data.records_per_file == 0);
  // Another data set: the key would be ignored, so it is an error; and it is not printed for it.
  CHECK_THAT(error_of("data: {dataset: mnist, records_per_file: 5}\n"),
             Contains("config key 'data.records_per_file' at test.yaml:1:42: only the cifar10 data set reads batch "
                      "files of a fixed record count, but data.dataset is 'mnist'"));
  CHECK_THAT(error_of("", {"data.records_per_file=0"}), Contains("data.dataset is 'fashion-mnist'"));
  CHECK_THAT(error_of("data: {dataset: cifar10, records_per_file: -1}\n"), Contains("data.records_per_file"));
  CHECK_THAT(config::to_yaml(config::parse_config("", "empty.yaml")), !Contains("records_per_file"));
  // The default is let through: a printed cifar10 config run with another data set.
  CHECK(config::parse_config(config::to_yaml(config::parse_config("data: {dataset: cifar10, dir: /d}\n", "t.yaml")),
                             "printed", {"data.dataset=synthetic"})
            .data.dataset == "synthetic");
  CHECK(config::DataConfig{}.records_per_file == lockstep::data::Cifar10Options{}.records_per_file);
}
