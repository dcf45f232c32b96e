#include "lockstep/train/model_tensors.hpp"

#include <torch/nn/module.h>

namespace lockstep::train {

std::vector<at::Tensor> parameters_and_buffers(const torch::nn::Module& model) {
  std::vector<at::Tensor> out = model.parameters();
  for (auto& buffer : model.buffers()) out.push_back(std::move(buffer));
  return out;
}

}  // namespace lockstep::train
