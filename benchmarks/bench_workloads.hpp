#pragma once
// The models the training benchmarks time (ddp_bench, scaling_bench), so that one row name means one
// model in every table: ResNet-18 on 28x28 single-channel images and a wide MLP, both with 10 classes.

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lockstep/models/resnet.hpp"

namespace bench {

// in -> hidden_layers x (Linear(width), ReLU) -> Linear(classes), on flattened inputs.
struct WideMlpImpl : torch::nn::Module {
  WideMlpImpl(std::int64_t in, std::int64_t width, int hidden_layers, std::int64_t classes) {
    std::int64_t from = in;
    for (int l = 0; l < hidden_layers; ++l) {
      layers.push_back(register_module("fc" + std::to_string(l), torch::nn::Linear(from, width)));
      from = width;
    }
    head = register_module("head", torch::nn::Linear(from, classes));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = x.flatten(1);
    for (auto& layer : layers) x = torch::relu(layer(x));
    return head(x);
  }
  std::vector<torch::nn::Linear> layers;
  torch::nn::Linear head{nullptr};
};

// A model to time: its row name, a factory (each call a new model from the global RNG), its forward.
struct Model {
  std::string name;
  std::function<std::shared_ptr<torch::nn::Module>()> make;
  std::function<torch::Tensor(torch::nn::Module&, const torch::Tensor&)> forward;
};

// "resnet18-w<width> 28x28": the small-image stem, 1 input channel.
inline Model resnet_model(std::int64_t width) {
  lockstep::models::ResNet18Options options;
  options.num_classes = 10;
  options.in_channels = 1;
  options.stem = lockstep::models::Stem::Small;
  options.width = width;
  return {"resnet18-w" + std::to_string(width) + " 28x28",
          [options] { return std::static_pointer_cast<torch::nn::Module>(lockstep::models::ResNet18(options).ptr()); },
          [](torch::nn::Module& m, const torch::Tensor& x) {
            return static_cast<lockstep::models::ResNet18Impl&>(m).forward(x);
          }};
}

// "mlp 784-4x<width>-10": four hidden layers.
inline Model mlp_model(std::int64_t width) {
  return {"mlp 784-4x" + std::to_string(width) + "-10",
          [width] { return std::make_shared<WideMlpImpl>(784, width, 4, 10); },
          [](torch::nn::Module& m, const torch::Tensor& x) { return static_cast<WideMlpImpl&>(m).forward(x); }};
}

}  // namespace bench
