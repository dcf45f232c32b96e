#pragma once
// The tensors that make up a model's state, in the one order Lockstep uses for them.

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace torch::nn {
class Module;
}  // namespace torch::nn

namespace lockstep::train {

// The model's parameters, then its buffers, each in registration order: what a
// weight average (ExponentialMovingAverage), a held copy of the best weights (EarlyStopping) or a
// bitwise comparison of two runs covers. The tensors alias the model's; clone them to keep a copy.
std::vector<at::Tensor> parameters_and_buffers(const torch::nn::Module& model);

// Note [Names a checkpoint cannot hold]: LibTorch writes a module into a file as TorchScript code in which
// each submodule, parameter and buffer name is an attribute, and reading the file back parses that code.
// A name that is a keyword of TorchScript ("in", "is", "if", "class", "None", ...) is written without a
// complaint and then cannot be read back ("expected ident but found 'in'"): every checkpoint of such a
// model is lost, and an auto-resume takes the files for corrupt ones and starts over. This throws a
// lockstep::Error naming the first such name and its path, so `what` (e.g. "Checkpointer") fails
// before training instead of hours later.
void check_names_readable(const torch::nn::Module& model, const std::string& what);

}  // namespace lockstep::train
