#pragma once
// Small models and data sets that several multi-rank test files train on.

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "lockstep/compress/fake_quant.hpp"
#include "lockstep/data/synthetic_dataset.hpp"
#include "lockstep/train/callback.hpp"
#include "lockstep/train/model_tensors.hpp"
#include "lockstep/train/trainer.hpp"

namespace lockstep::testing {

// 1-channel side x side synthetic images in 4 classes, reproducible from `seed`.
inline std::shared_ptr<data::SyntheticDataset> synthetic_images(int64_t size, int64_t side, uint64_t seed) {
  data::SyntheticOptions o;
  o.channels = 1;
  o.height = side;
  o.width = side;
  o.num_classes = 4;
  o.size = size;
  o.seed = seed;
  return std::make_shared<data::SyntheticDataset>(o);
}

// A copy of the model's parameters and buffers, to compare runs bitwise (resumed vs uninterrupted).
inline std::vector<at::Tensor> state_of(torch::nn::Module& model) {
  std::vector<at::Tensor> out;
  for (const auto& t : train::parameters_and_buffers(model)) out.push_back(t.detach().clone());
  return out;
}

// Whether two lists of tensors (state_of's) are equal to the bit.
inline bool bitwise_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i], b[i])) return false;
  }
  return true;
}

// Trainer options for short multi-rank tests: batches of 4 per rank, no progress output, no
// checkpoints, on the CPU (compared with CPU oracles; GPU training is in tests/gpu).
inline train::TrainerOptions quiet_trainer(int64_t epochs, uint64_t seed) {
  train::TrainerOptions o;
  o.epochs = epochs;
  o.batch_size = 4;
  o.eval_batch_size = 8;
  o.progress = false;
  o.checkpoints = false;
  o.prefetch = 1;
  o.seed = seed;
  o.device = "cpu";
  return o;
}

// `o` with a checkpoint every step in `dir`, resuming as `resume` says and stopping after
// `stop_after` steps (0: run to the end): the set-up of the bitwise stop-and-resume tests.
inline train::TrainerOptions resumable(train::TrainerOptions o, const std::string& dir, int64_t stop_after,
                                       const std::string& resume) {
  o.output_dir = dir;
  o.checkpoints = true;
  o.checkpoint.every_steps = 1;
  o.checkpoint.resume = resume;
  o.stop_after_steps = stop_after;
  return o;
}

// Records global_step at the run's first batch (-1: it took no step): where a resumed run went on
// from. A resume that ignored its checkpoint and started over would still end bitwise where the
// uninterrupted run ends (the runs are deterministic), so the stop-and-resume tests check this too.
struct FirstStep : train::Callback {
  int64_t step = -1;
  void on_batch_begin(train::TrainerContext& ctx) override {
    if (step < 0) step = ctx.global_step;
  }
};

// conv 3x3 (1 -> 8) [-> BatchNorm] -> ReLU -> Linear to 4 classes, for 1x8x8 inputs. With
// quantize_activations: activation fake-quant points at the input ("quant_input") and after the ReLU
// ("quant_relu"), registered last so the parameters' initialisation does not change.
struct SmallConvNetImpl : torch::nn::Module {
  explicit SmallConvNetImpl(bool batch_norm = false, bool quantize_activations = false) {
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)));
    if (batch_norm) bn = register_module("bn", torch::nn::BatchNorm2d(8));
    fc = register_module("fc", torch::nn::Linear(8 * 8 * 8, 4));
    if (quantize_activations) {
      quant_input = register_module("quant_input", compress::ActivationFakeQuant());
      quant_relu = register_module("quant_relu", compress::ActivationFakeQuant());
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h = conv(compress::fake_quantize_at(quant_input, x));
    if (bn) h = bn(h);
    return fc(compress::fake_quantize_at(quant_relu, torch::relu(h)).flatten(1));
  }
  torch::nn::Conv2d conv{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Linear fc{nullptr};
  compress::ActivationFakeQuant quant_input{nullptr};
  compress::ActivationFakeQuant quant_relu{nullptr};
};
TORCH_MODULE(SmallConvNet);

}  // namespace lockstep::testing
