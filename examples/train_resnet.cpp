// Trains ResNet-18 with the DistributedTrainer from a YAML configuration.
//
//   mpirun -np 8 ./train_resnet --config configs/resnet18_fashion_mnist.yaml
//   mpirun -np 2 ./train_resnet --config configs/demo.yaml --set trainer.epochs=1
//   ./train_resnet --print-config            # the built-in default (configs/resnet18_fashion_mnist.yaml)
//
// Rank 0 prints progress, one summary line per epoch and, at the end, "final test accuracy: XX.XX%".
// Re-running the same command continues from the newest checkpoint in trainer.output_dir.
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <vector>
#include <string>

#include "lockstep/compress/pruning.hpp"
#include "lockstep/compress/quantization.hpp"
#include "lockstep/config/config.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/core/stop_signals.hpp"
#include "lockstep/core/world.hpp"
#include "lockstep/ddp/zero_optimizer.hpp"
#include "lockstep/models/int8_resnet.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/runtime.hpp"
#include "lockstep/train/early_stopping.hpp"
#include "lockstep/train/ema.hpp"
#include "lockstep/train/trainer.hpp"

namespace {

// The default when no --config is given: a copy of configs/resnet18_fashion_mnist.yaml.
const char* const kDefaultConfig = R"yaml(
# ResNet-18 (width 64, small-image stem) on Fashion-MNIST, data parallel.
#   mpirun -np 8 ./train_resnet --config configs/resnet18_fashion_mnist.yaml
# 8 ranks x 64 = 512 images per step; lr 0.2 = 0.1 x 512 / 256 (the linear scaling rule, applied by
# hand here so the lr does not depend on the rank count: set lr_schedule.scale_with_world_size to
# scale it with the ranks instead). Keys and defaults: docs/training.md.
trainer:
  epochs: 20
  batch_size: 64          # per rank
  eval_batch_size: 500    # per rank
  seed: 1
  output_dir: runs/resnet18_fashion_mnist
  log_every: 20
  lr_schedule:
    kind: cosine
    warmup_epochs: 2
  checkpoint:
    every_steps: 200
    every_epoch: true
    keep_last: 3
    resume: auto
data:
  dataset: fashion-mnist
  dir: /usr/share/datasets/fashion-mnist
  augment:
    pad: 2
    hflip: true
model:
  name: resnet18
  width: 64
  stem: small
  in_channels: 1
  num_classes: 10
optimizer:
  name: sgd
  lr: 0.2
  momentum: 0.9
  weight_decay: 5.0e-4
  nesterov: true
)yaml";

// The exported int8 file run on LibTorch's quantized CPU kernels over the whole test set: what a
// deployment of the file gets (benchmarks/int8_bench also times it).
double int8_accuracy(const std::string& path, const lockstep::config::ExperimentConfig& cfg,
                     const lockstep::data::Dataset& test_set) {
  const lockstep::models::Int8ResNet18 int8(path, cfg.model);
  int64_t correct = 0;
  const auto n = static_cast<int64_t>(test_set.size());
  for (int64_t begin = 0; begin < n; begin += 500) {
    std::vector<int64_t> indices;
    for (int64_t i = begin; i < std::min(n, begin + 500); ++i) indices.push_back(i);
    const lockstep::data::Example batch = test_set.get_batch(indices);
    correct += int8.forward(batch.data).argmax(1).eq(batch.target).sum().item<int64_t>();
  }
  return static_cast<double>(correct) / static_cast<double>(n);
}

}  // namespace

int main(int argc, char** argv) {
  namespace config = lockstep::config;
  // The configuration is read before MPI starts: it holds the runtime options.
  config::ProgramConfig program = config::program_config(argc, argv, "train_resnet", kDefaultConfig);
  if (program.exit_status) return *program.exit_status;
  config::ExperimentConfig& cfg = program.config;

  lockstep::Runtime runtime(argc, argv, cfg.runtime);
  config::check_same_on_all_ranks(cfg, *runtime.communicator());  // one file, one command line, every rank
  // trainer.device "auto" follows the runtime's choice (runtime.device: cpu keeps a GPU machine on the CPU).
  if (cfg.trainer.device == "auto") cfg.trainer.device = runtime.world().device.str();
  auto [train_set, test_set] = config::make_datasets(cfg.data, cfg.trainer.seed);
  LOCKSTEP_CHECK(train_set->channels() == cfg.model.in_channels, "model.in_channels is ", cfg.model.in_channels,
                 " but ", train_set->description(), " has ", train_set->channels(), " channels");
  LOCKSTEP_CHECK(train_set->num_classes() == cfg.model.num_classes, "model.num_classes is ", cfg.model.num_classes,
                 " but ", train_set->description(), " has ", train_set->num_classes(), " classes");

  torch::manual_seed(cfg.trainer.seed);  // rank 0's initialisation is the one DataParallel broadcasts
  lockstep::models::ResNet18 model(cfg.model);
  auto optimizer = config::make_optimizer(cfg.optimizer, model->parameters(), runtime.communicator());
  if (runtime.rank() == 0) {
    int64_t parameters = 0;
    for (const auto& p : model->parameters()) parameters += p.numel();
    const auto accumulation = static_cast<size_t>(cfg.trainer.accumulation_steps);
    const std::string micro = accumulation > 1 ? " x " + std::to_string(accumulation) + " micro-batches" : "";
    std::printf("ResNet-18 width %lld (%lld parameters) on %s: %zu train / %zu test images, %d ranks x %zu%s = %zu "
                "images per step; device %s, backend %s (%s), precision %s\n",
                static_cast<long long>(cfg.model.width), static_cast<long long>(parameters),
                train_set->description().c_str(), train_set->size(), test_set->size(), runtime.size(),
                cfg.trainer.batch_size, micro.c_str(),
                cfg.trainer.batch_size * accumulation * static_cast<size_t>(runtime.size()),
                cfg.trainer.device.c_str(), runtime.backend().c_str(), runtime.backend_reason().c_str(),
                cfg.trainer.precision.c_str());
    if (auto* zero = dynamic_cast<lockstep::ddp::ZeroRedundancyOptimizer*>(optimizer.get())) {
      // Every rank knows the partition: the largest share bounds any rank's optimizer state.
      std::vector<int64_t> share(static_cast<size_t>(runtime.size()), 0);
      const auto parameters_list = model->parameters();
      for (size_t i = 0; i < parameters_list.size(); ++i) {
        share[static_cast<size_t>(zero->owners()[i])] += parameters_list[i].numel();
      }
      const int64_t largest = *std::max_element(share.begin(), share.end());
      std::printf("%s state sharded over %d ranks (ZeRO): at most %lld of %lld parameters' state per rank (%.1f%%)\n",
                  cfg.optimizer.name.c_str(), runtime.size(), static_cast<long long>(largest),
                  static_cast<long long>(parameters), 100.0 * static_cast<double>(largest) / static_cast<double>(parameters));
    }
    std::fflush(stdout);
  }

  lockstep::train::DistributedTrainer trainer(model, optimizer, runtime.communicator(), cfg.trainer);
  if (cfg.ema.enabled) trainer.add_callback(std::make_shared<lockstep::train::ExponentialMovingAverage>(cfg.ema.options));
  std::shared_ptr<lockstep::train::EarlyStopping> early_stopping;
  if (cfg.early_stopping.enabled) {  // after the average: restore_best_weights keeps the evaluated weights
    early_stopping = std::make_shared<lockstep::train::EarlyStopping>(cfg.early_stopping.options);
    trainer.add_callback(early_stopping);
  }
  if (cfg.pruning.enabled) {
    trainer.add_callback(std::make_shared<lockstep::compress::MagnitudePruning>(cfg.pruning.options));
  }
  // After pruning: the int8 values are taken of the weights that pruning has just masked (and a
  // symmetric quantization keeps pruned zeros at zero).
  std::shared_ptr<lockstep::compress::QuantizationAwareTraining> qat;
  if (cfg.quantization.enabled) {
    qat = std::make_shared<lockstep::compress::QuantizationAwareTraining>(cfg.quantization.options);
    trainer.add_callback(qat);
  }
  std::map<std::string, double> metrics = trainer.fit(train_set, test_set);
  // Stopped by a signal (a scheduler's SIGTERM, `kill -USR1` to mpirun): the checkpoint is written, so
  // end as the signal asked, with the exit status a shell gives a process it killed (128 + signal),
  // and without the int8 evaluation that would only delay the scheduler.
  if (const int signal = trainer.caught_signal()) {
    if (runtime.rank() == 0) {
      std::printf("train_resnet: %s; exiting with status %d\n",
                  trainer.stop_reason().empty()
                      ? ("caught " + lockstep::signal_name(signal) + " after training had finished").c_str()
                      : ("stopped early by " + trainer.stop_reason()).c_str(),
                  128 + signal);
      std::fflush(stdout);
    }
    return 128 + signal;
  }
  if (runtime.rank() == 0) {
    auto acc = metrics.find("test_acc");
    if (acc != metrics.end()) {
      const auto epoch = static_cast<int64_t>(metrics.count("epoch") ? metrics.at("epoch") : 0);
      if (early_stopping && early_stopping->options().restore_best_weights && early_stopping->best_epoch() > 0 &&
          early_stopping->best_epoch() != epoch) {
        std::printf("final test accuracy: %.2f%% (epoch %lld's; the model holds epoch %lld's weights: %s %.6g)\n",
                    100.0 * acc->second, static_cast<long long>(epoch),
                    static_cast<long long>(early_stopping->best_epoch()),
                    early_stopping->options().monitor.c_str(), early_stopping->best());
      } else {
        std::printf("final test accuracy: %.2f%%\n", 100.0 * acc->second);
      }
    } else if (metrics.count("epoch") > 0 && metrics.count("test_loss") == 0 && !trainer.stop_reason().empty()) {
      // A stop inside an epoch (stop_after_steps, a signal, a time limit): fit() returns that epoch's
      // training metrics; its evaluation runs when the run resumes.
      std::printf("final test accuracy: n/a (the run stopped before epoch %lld's evaluation: %s)\n",
                  static_cast<long long>(metrics.at("epoch")), trainer.stop_reason().c_str());
    } else if (metrics.count("epoch") > 0) {
      std::printf("final test accuracy: n/a (epoch %lld ended without test_acc: no test set, or accuracy is not "
                  "among trainer.metrics)\n",
                  static_cast<long long>(metrics.at("epoch")));
    } else {
      std::printf("final test accuracy: n/a (no epoch ended in this run%s%s)\n",
                  trainer.stop_reason().empty() ? "" : ": ", trainer.stop_reason().c_str());
    }
    // Only a file this run wrote: training that ended before quantization began writes none (and
    // leaves an earlier run's file, which says nothing about this run's model).
    const std::string& int8_path = cfg.quantization.options.export_path;
    if (qat && qat->active() && !int8_path.empty() && acc != metrics.end()) {
      // Int8ResNet18 runs whole-model int8 only: every convolution int8 and the activations quantized.
      // A weight-only export (quantization.activations false) or one that kept a convolution in float
      // is a valid file that these kernels cannot run: said, and the run still succeeded. Any other
      // failure to run the file is an error.
      const std::vector<std::string> quantized = qat->layers();
      std::string float_conv;
      for (const auto& item : model->named_parameters()) {
        if (item.value().dim() == 4 && std::find(quantized.begin(), quantized.end(), item.key()) == quantized.end()) {
          float_conv = item.key();
          break;
        }
      }
      if (!cfg.quantization.options.activations) {
        std::printf("int8 model on the quantized kernels: n/a (a weight-only export, quantization.activations false: "
                    "Int8ResNet18 needs the activation ranges)\n");
      } else if (!float_conv.empty()) {
        std::printf("int8 model on the quantized kernels: n/a (convolution '%s' was kept in float: Int8ResNet18 "
                    "needs every convolution int8)\n", float_conv.c_str());
      } else {
        std::printf("int8 model on the quantized kernels: test accuracy %.2f%%\n",
                    100.0 * int8_accuracy(int8_path, cfg, *test_set));
      }
    }
  }
  return 0;
}
