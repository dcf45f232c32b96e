// load_model_weights (TrainerOptions::init_from): the weights of a model file or a checkpoint's model
// into a model with other modules for QAT or pruning, and every file that does not fit refused by name
// with the model unchanged.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "lockstep/compress/fake_quant.hpp"
#include "lockstep/compress/pruning.hpp"
#include "lockstep/train/checkpoint.hpp"
#include "support/fixtures.hpp"
#include "support/temp_dir.hpp"

using Catch::Matchers::Contains;
using lockstep::testing::SmallConvNet;
using lockstep::train::load_model_weights;

namespace {

std::vector<at::Tensor> values_of(torch::nn::Module& model) {
  std::vector<at::Tensor> out;
  for (const auto& p : model.parameters()) out.push_back(p.detach().clone());
  for (const auto& b : model.buffers()) out.push_back(b.detach().clone());
  return out;
}

bool same(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i], b[i])) return false;
  }
  return true;
}

// A trained-looking model: batch norm statistics and weights away from their initialisation.
SmallConvNet trained(uint64_t seed) {
  torch::manual_seed(static_cast<int64_t>(seed));
  SmallConvNet model(/*batch_norm=*/true);
  torch::NoGradGuard no_grad;
  for (auto& b : model->buffers()) {
    if (b.is_floating_point()) b.uniform_(0.5, 1.5);
  }
  for (auto& p : model->parameters()) p.add_(1.0);
  return model;
}

}  // namespace

TEST_CASE("load_model_weights: a model file, a checksummed one, and a checkpoint's model", "[train][init_from]") {
  lockstep::testing::TempDir dir("lockstep_init_from");
  SmallConvNet source = trained(1);
  const std::vector<at::Tensor> expected = values_of(*source);

  torch::save(source, dir / "plain.pt");
  lockstep::compress::save_model_atomically(*source, dir / "checked.pt");
  // A checkpoint holds the model under "model", beside its step and the rest.
  {
    torch::serialize::OutputArchive archive, model;
    source->save(model);
    archive.write("model", model);
    archive.write("global_step", c10::IValue(int64_t{7}));
    archive.save_to(dir / "checkpoint.pt");
  }
  for (const std::string name : {"plain.pt", "checked.pt", "checkpoint.pt"}) {
    INFO(name);
    torch::manual_seed(2);
    SmallConvNet target(/*batch_norm=*/true);
    const at::Tensor storage = target->parameters().front();
    load_model_weights(*target, dir / name);
    CHECK(same(values_of(*target), expected));
    CHECK(target->parameters().front().is_same(storage));  // copied into, not replaced
  }

  // A model with activation fake-quant points (QAT) takes a dense model's weights: the points keep
  // their unobserved ranges.
  torch::manual_seed(2);
  SmallConvNet quantized(/*batch_norm=*/true, /*quantize_activations=*/true);
  const std::vector<at::Tensor> ranges = values_of(*quantized->quant_relu);
  load_model_weights(*quantized, dir / "plain.pt");
  CHECK(torch::equal(quantized->conv->weight, source->conv->weight));
  CHECK(torch::equal(quantized->bn->running_var, source->bn->running_var));
  CHECK(same(values_of(*quantized->quant_relu), ranges));
  // And the other way: a file with more modules (the points, a pruned run's masks) gives the model
  // the weights it has.
  torch::save(quantized, dir / "quantized.pt");
  torch::manual_seed(3);
  SmallConvNet dense(/*batch_norm=*/true);
  load_model_weights(*dense, dir / "quantized.pt");
  CHECK(same(values_of(*dense), expected));
}

TEST_CASE("load_model_weights: a file that does not fit is an error naming it and the tensor, and changes nothing",
          "[train][init_from]") {
  lockstep::testing::TempDir dir("lockstep_init_from");
  torch::manual_seed(1);
  SmallConvNet without_bn;  // no batch norm
  torch::save(without_bn, dir / "no_bn.pt");
  SmallConvNet with_bn = trained(4);
  const std::vector<at::Tensor> before = values_of(*with_bn);

  CHECK_THROWS_WITH(load_model_weights(*with_bn, dir / "no_bn.pt"),
                    Contains("weights file " + (dir / "no_bn.pt") + " holds no module 'bn'") &&
                        Contains("written from another model"));
  CHECK(same(values_of(*with_bn), before));

  // A tensor of another shape: the conv of a wider model.
  struct Wide : torch::nn::Module {
    torch::nn::Conv2d conv{register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 3).padding(1)))};
    torch::nn::BatchNorm2d bn{register_module("bn", torch::nn::BatchNorm2d(16))};
    torch::nn::Linear fc{register_module("fc", torch::nn::Linear(16 * 8 * 8, 4))};
  };
  auto wide = std::make_shared<Wide>();
  torch::save(wide, dir / "wide.pt");
  CHECK_THROWS_WITH(load_model_weights(*with_bn, dir / "wide.pt"),
                    Contains("'conv.weight' has shape [16, 1, 3, 3] in weights file") &&
                        Contains("but [8, 1, 3, 3] in the model"));
  CHECK(same(values_of(*with_bn), before));

  CHECK_THROWS_WITH(load_model_weights(*with_bn, dir / "missing.pt"), Contains("does not exist"));
  // The checkpoints directory named instead of a file in it: said as such, with its newest file.
  std::filesystem::create_directories(dir / "checkpoints");
  CHECK_THROWS_WITH(load_model_weights(*with_bn, dir / "checkpoints"),
                    Contains("weights file " + (dir / "checkpoints") + " is a directory; name a checkpoint file (it "
                             "holds none)"));
  const std::string newest = dir / ("checkpoints/" + lockstep::train::checkpoint_file_name(7));
  std::ofstream(dir / ("checkpoints/" + lockstep::train::checkpoint_file_name(3))) << "x";
  std::ofstream(newest) << "x";
  CHECK_THROWS_WITH(load_model_weights(*with_bn, dir / "checkpoints"),
                    Contains("is a directory; name a checkpoint file in it (its newest is " + newest + ")") &&
                        Contains("checkpoint.resume: auto"));
  std::ofstream(dir / "text.pt") << "not an archive";
  CHECK_THROWS_WITH(load_model_weights(*with_bn, dir / "text.pt"),
                    Contains("weights file " + (dir / "text.pt") + " is neither a model file nor a Lockstep checkpoint"));
  // A checksummed file changed after it was written.
  lockstep::compress::save_model_atomically(*with_bn, dir / "changed.pt");
  {
    std::fstream f(dir / "changed.pt", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(0, std::ios::end);
    const auto size = static_cast<std::streamoff>(f.tellg());
    f.seekp(size / 2);
    char c = 0;
    f.seekg(size / 2);
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    f.seekp(size / 2);
    f.write(&c, 1);
  }
  CHECK_THROWS_WITH(load_model_weights(*with_bn, dir / "changed.pt"), Contains("is corrupt"));
  CHECK(same(values_of(*with_bn), before));
}
