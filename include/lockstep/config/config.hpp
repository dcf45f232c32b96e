#pragma once
// Config: YAML files (yaml-cpp) mapped one to one onto the options structs of the other layers.
//
//   auto cli = lockstep::config::parse_command_line(argc, argv);   // --config F, --set a.b=v, --print-config
//   auto cfg = lockstep::config::load_config(cli.config_path, cli.overrides);
//
// Every key is checked: an unknown key (a misspelling), a wrong type or an out-of-range value is a
// lockstep::Error naming the full key path and where it came from (file:line:column, or the --set
// argument), never a silent default. Keys left out keep the options structs' documented defaults.
// The keys are listed in docs/training.md; to_yaml() prints the effective configuration.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/compress/pruning.hpp"
#include "lockstep/compress/quantization.hpp"
#include "lockstep/data/dataset.hpp"
#include "lockstep/ddp/powersgd.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/train/early_stopping.hpp"
#include "lockstep/train/ema.hpp"
#include "lockstep/runtime.hpp"
#include "lockstep/train/trainer.hpp"

namespace torch::optim {
class Optimizer;
}

namespace lockstep::config {

struct AugmentConfig {
  int64_t pad = 0;     // random crop after padding this many pixels per side; 0 = no crop
  bool hflip = false;  // random horizontal flip
};

struct DataConfig {
  // "fashion-mnist", "mnist", "cifar10" or "synthetic" (1x28x28, 10 classes, learnable).
  std::string dataset = "fashion-mnist";
  // Directory of the files; empty = Fashion-MNIST's default (data::kFashionMnistRoot); mnist and cifar10
  // need one.
  std::string dir;
  // Use only the first N samples; 0 = all (for synthetic: the size, default 1024 / 256, at most
  // kMaxSyntheticSamples).
  int64_t train_subset = 0;
  int64_t test_subset = 0;
  // cifar10 only: the records each batch file must hold (data::Cifar10Options::records_per_file);
  // 0 accepts any count (a data set of its own in CIFAR-10's format). Set for another data set, an error.
  int64_t records_per_file = 10000;
  AugmentConfig augment;  // train set only; seeded with trainer.seed
};
// The largest train_subset or test_subset the synthetic data set takes (2^31): parse_config and
// make_datasets reject more, naming the key.
inline constexpr int64_t kMaxSyntheticSamples = int64_t{1} << 31;

struct OptimizerConfig {
  std::string name = "sgd";  // "sgd", "adam" or "adamw"
  double lr = 0.1;           // the base lr (trainer.lr_schedule.base_lr = 0 takes this)
  double momentum = 0.9;     // sgd
  double weight_decay = 5e-4;
  bool nesterov = false;     // sgd
  double beta1 = 0.9;        // adam, adamw
  double beta2 = 0.999;      // adam, adamw
  double eps = 1e-8;         // adam, adamw
  // Shard the optimizer's state over ranks (ddp::ZeroRedundancyOptimizer, ZeRO stage 1).
  bool zero = false;
};

// The pruning section: the keys of compress::PruningOptions, plus `enabled` (train_resnet adds a
// compress::MagnitudePruning callback when it is true).
struct PruningConfig {
  bool enabled = false;
  compress::PruningOptions options;
};

// The quantization section: the keys of compress::QuantizationOptions, plus `enabled` (train_resnet adds
// a compress::QuantizationAwareTraining callback when it is true). When enabled with activations,
// parse_config also sets model.quantize_activations, which places the fake-quant points.
struct QuantizationConfig {
  bool enabled = false;
  compress::QuantizationOptions options;
};

// The ema section: the keys of train::EmaOptions, plus `enabled` (train_resnet adds a
// train::ExponentialMovingAverage callback when it is true, before pruning and quantization). Not
// combined with pruning.
struct EmaConfig {
  bool enabled = false;
  train::EmaOptions options;
};

// The early_stopping section: the keys of train::EarlyStoppingOptions, plus `enabled` (train_resnet
// adds a train::EarlyStopping callback when it is true).
struct EarlyStoppingConfig {
  bool enabled = false;
  train::EarlyStoppingOptions options;
};

// One experiment. YAML sections: runtime, trainer (with lr_schedule and checkpoint), ddp (maps to
// trainer.ddp), data, model (ResNet-18), optimizer, pruning, quantization, ema, early_stopping.
struct ExperimentConfig {
  RuntimeOptions runtime;
  train::TrainerOptions trainer;
  DataConfig data;
  models::ResNet18Options model;
  OptimizerConfig optimizer;
  PruningConfig pruning;
  QuantizationConfig quantization;
  EmaConfig ema;
  EarlyStoppingConfig early_stopping;
  // ddp.comm_hook: how gradient buckets are all-reduced: "allreduce" (float32, the default), "fp16" or
  // "bf16" (compressed to 16 bits on the wire, half the bytes; ddp/comm_hooks.hpp), or "powersgd"
  // (low-rank, ddp/powersgd.hpp). parse_config also sets trainer.ddp.comm_hook to the matching hook.
  std::string ddp_comm_hook = "allreduce";
  // ddp.powersgd: the keys of ddp::PowerSGDOptions, used when ddp.comm_hook is "powersgd". The hook
  // parse_config makes holds PowerSGD's state: build one trainer per parsed config. The trainer
  // checkpoints that state by itself (train::PowerSGDStateCallback; ddp::powersgd_state_of finds it).
  ddp::PowerSGDOptions ddp_powersgd;
  // Keys written with a value of their own that the chosen mode ignores (optimizer.momentum under
  // adam, grad_scaler without fp16, ...): "config key '<path>' at <place> is ignored: <why>", in
  // document order. Not an error (Note [Keys the chosen mode ignores], config.cpp); program_config
  // prints them once (rank 0). Not part of the configuration (to_yaml leaves them out).
  std::vector<std::string> warnings;
};

// Parses YAML text; `source` names it in error messages. `overrides` are "key.path=value" strings
// applied on top (value parsed as YAML), as --set does.
ExperimentConfig parse_config(const std::string& yaml, const std::string& source = "<string>",
                              const std::vector<std::string>& overrides = {});
// Reads and parses a file (errors name the file).
ExperimentConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The effective configuration as YAML, every key included; parse_config(to_yaml(c)) gives c back.
std::string to_yaml(const ExperimentConfig& config);
// Collective: checks that every rank holds the same configuration (every key to_yaml prints). When
// they differ (a stale copy of the config file on one node, different --set arguments), every rank
// raises the same lockstep::Error naming the first key that differs and each rank's value of it.
// Call it before filling in per-rank values (trainer.device "auto" resolved to "cuda:<local rank>").
void check_same_on_all_ranks(const ExperimentConfig& config, comm::Communicator& comm);

struct CommandLine {
  std::string config_path;             // --config FILE (empty: none given)
  std::vector<std::string> overrides;  // --set key.path=value, in order
  bool print_config = false;           // --print-config
  bool help = false;                   // --help / -h
};
// Accepts "--config F", "--config=F", "--set K=V", "--set=K=V", "--print-config", "--help";
// anything else is an error naming it, and so are an empty --config value and a second --config.
CommandLine parse_command_line(int argc, char** argv);
// The --help text; `built_in_default`: the program runs a configuration of its own without --config.
std::string usage(const std::string& program, bool built_in_default = true);

// A program's start, before the Runtime (the config holds the runtime options): parses the command
// line and loads --config (or `default_yaml`, named "<built-in default config>", when no --config is
// given; empty: --config is required). --help and --print-config print and set exit_status 0. An
// error sets exit_status 2 after rank 0 printed "program: message" to stderr. Under a launcher of
// several processes (launcher_size() > 1) this is collective: it starts MPI and the ranks agree, so
// that a rank whose config fails alone fails every rank, and rank 0 prints its message too ("...
// (on rank 2; every rank stops)"); the Runtime made next adopts that MPI (Note [A config one rank
// cannot read], config/builders.cpp). Call it once per process: a second call after an exit status
// would find MPI finalized.
struct ProgramConfig {
  ExperimentConfig config;
  std::optional<int> exit_status;  // set: end the program with it
};
ProgramConfig program_config(int argc, char** argv, const std::string& program, const std::string& default_yaml = "");

// Builders: the train and test sets the data section describes (subset, then augmentation on the
// train set), and the optimizer over `parameters` (with `zero`, a ddp::ZeroRedundancyOptimizer over
// `comm`, which it then needs; construction is then collective).
std::pair<data::DatasetPtr, data::DatasetPtr> make_datasets(const DataConfig& config, uint64_t seed);
std::shared_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerConfig& config,
                                                        std::vector<at::Tensor> parameters,
                                                        comm::CommunicatorPtr comm = nullptr);

}  // namespace lockstep::config
