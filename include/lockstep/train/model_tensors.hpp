#pragma once
// The tensors that make up a model's state, in the one order Lockstep uses for them.

#include <ATen/core/Tensor.h>

#include <vector>

namespace torch::nn {
class Module;
}  // namespace torch::nn

namespace lockstep::train {

// The model's parameters, then its buffers, each in registration order: what a
// weight average (ExponentialMovingAverage), a held copy of the best weights (EarlyStopping) or a
// bitwise comparison of two runs covers. The tensors alias the model's; clone them to keep a copy.
std::vector<at::Tensor> parameters_and_buffers(const torch::nn::Module& model);

}  // namespace lockstep::train
