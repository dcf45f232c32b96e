// model_tensors.hpp: the one order of a model's tensors, and the names a checkpoint cannot hold
// (Note [Names a checkpoint cannot hold]), the latter checked against LibTorch's own save and load.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "lockstep/core/error.hpp"
#include "lockstep/train/model_tensors.hpp"
#include "support/temp_dir.hpp"

using Catch::Matchers::Contains;

namespace {

// Whether LibTorch reads back what Module::save wrote.
bool round_trips(torch::nn::Module& model) {
  const lockstep::testing::TempDir dir("lockstep_names");
  const std::string path = dir / "model.pt";
  torch::serialize::OutputArchive out;
  model.save(out);
  out.save_to(path);
  try {
    torch::serialize::InputArchive in;
    in.load_from(path);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

// The order EarlyStopping's held weights, the EMA average and checkpointed copies rely on.
TEST_CASE("parameters_and_buffers lists the parameters then the buffers, aliasing the model's", "[train][early_stopping]") {
  struct Net : torch::nn::Module {
    torch::nn::Linear fc{register_module("fc", torch::nn::Linear(3, 2))};
    torch::nn::BatchNorm1d bn{register_module("bn", torch::nn::BatchNorm1d(2))};
    torch::nn::Linear head{register_module("head", torch::nn::Linear(2, 2))};
  };
  auto net = std::make_shared<Net>();
  const std::vector<at::Tensor> all = lockstep::train::parameters_and_buffers(*net);
  const std::vector<at::Tensor> params = net->parameters();
  const std::vector<at::Tensor> buffers = net->buffers();
  REQUIRE(all.size() == params.size() + buffers.size());
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(all[i].is_same(params[i]));
  for (std::size_t i = 0; i < buffers.size(); ++i) CHECK(all[params.size() + i].is_same(buffers[i]));
  CHECK(buffers.size() == 3);  // running_mean, running_var, num_batches_tracked
  CHECK(all.front().is_same(net->fc->weight));
  CHECK(all.back().is_same(net->bn->num_batches_tracked));
}

TEST_CASE("to_channels_last stores 4-D parameters and buffers NHWC, in place, with the same outputs", "[train]") {
  // Note [Channels last]
  struct Net : torch::nn::Module {
    torch::nn::Conv2d conv{register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3)))};
    torch::nn::BatchNorm2d bn{register_module("bn", torch::nn::BatchNorm2d(4))};
    torch::nn::Linear fc{register_module("fc", torch::nn::Linear(4, 2))};
    at::Tensor filter = register_buffer("filter", torch::randn({2, 3, 5, 5}));
    torch::Tensor forward(const torch::Tensor& x) {
      return fc(torch::relu(bn(conv(x))).mean({2, 3})) + torch::conv2d(x, filter).mean();
    }
  };
  torch::manual_seed(4);
  auto net = std::make_shared<Net>();
  net->eval();
  const torch::Tensor x = torch::randn({2, 3, 9, 9});
  const torch::Tensor before = net->forward(x);
  const at::Tensor weight = net->conv->weight;  // the same tensor object before and after
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  CHECK(lockstep::train::to_channels_last(*net) == 2);  // conv.weight and the buffer
  CHECK(weight.is_same(net->conv->weight));
  CHECK(weight.is_contiguous(at::MemoryFormat::ChannelsLast));
  CHECK_FALSE(weight.is_contiguous());
  CHECK(net->filter.is_contiguous(at::MemoryFormat::ChannelsLast));
  CHECK(net->fc->weight.is_contiguous());
  CHECK(torch::allclose(net->forward(x), before, 1e-5, 1e-6));
  // The optimizer built before the conversion updates the converted weight.
  const at::Tensor old_values = weight.clone();
  net->forward(x).sum().backward();
  sgd.step();
  CHECK_FALSE(torch::equal(weight, old_values));
  CHECK(weight.is_contiguous(at::MemoryFormat::ChannelsLast));
  CHECK(lockstep::train::to_channels_last(*net) == 2);  // again: nothing changes
  CHECK(weight.is_same(net->conv->weight));
}

TEST_CASE("check_names_readable refuses the names LibTorch saves but cannot load", "[train]") {
  // The premise, from LibTorch itself: a submodule named "in" or "is", or a parameter named "if", is
  // written without a word and cannot be read back.
  for (const std::string name : {"in", "is"}) {
    torch::nn::Module model;
    model.register_module(name, torch::nn::Linear(2, 2));
    INFO(name);
    CHECK_FALSE(round_trips(model));
    CHECK_THROWS_WITH(lockstep::train::check_names_readable(model, "Checkpointer"),
                      Contains("Checkpointer: the model's submodule '" + name + "'") && Contains("TorchScript keyword"));
  }
  torch::nn::Module outer;
  auto inner = std::make_shared<torch::nn::Module>();
  inner->register_parameter("if", torch::zeros({2}));
  outer.register_module("encoder", inner);
  CHECK_FALSE(round_trips(outer));
  CHECK_THROWS_WITH(lockstep::train::check_names_readable(outer, "save"),
                    Contains("parameter 'encoder.if'") && Contains("another name"));

  // Python keywords that TorchScript does not reserve, Sequential's numbers and ordinary names load.
  torch::nn::Module fine;
  fine.register_module("lambda", torch::nn::Linear(2, 2));
  fine.register_module("layers", torch::nn::Sequential(torch::nn::Linear(2, 2), torch::nn::ReLU()));
  fine.register_buffer("running_mean", torch::zeros({2}));
  CHECK(round_trips(fine));
  CHECK_NOTHROW(lockstep::train::check_names_readable(fine, "Checkpointer"));
}
