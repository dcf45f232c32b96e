#pragma once
// The tensors that make up a model's state, in the one order Lockstep uses for them.

#include <ATen/core/Tensor.h>

#include <cstddef>
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

// Note [Channels last]: stores every 4-D parameter and buffer of `model` in the channels_last memory
// format (NHWC order in memory, the shape still [N, C, H, W]), as PyTorch's
// `model.to(memory_format=torch.channels_last)` does; LibTorch's Module has no such call. Convolutions
// then run on NHWC kernels (on GPUs, the tensor cores' native layout: no transposes around each
// convolution) and their outputs stay channels_last, so the input batches need no conversion. The
// tensors keep their identity (their data is replaced, as Module::to does), so an optimizer built on
// them still updates them. Call it before DataParallel is built: its buckets take the parameters'
// layout then (Note [Gradient layout], src/ddp/reducer.cpp). Returns how many tensors it converted.
std::size_t to_channels_last(torch::nn::Module& model);

// Note [Names a checkpoint cannot hold]: LibTorch writes a module into a file as TorchScript code in which
// each submodule, parameter and buffer name is an attribute, and reading the file back parses that code.
// A name that is a keyword of TorchScript ("in", "is", "if", "class", "None", ...) is written without a
// complaint and then cannot be read back ("expected ident but found 'in'"): every checkpoint of such a
// model is lost, and an auto-resume takes the files for corrupt ones and starts over. This throws a
// lockstep::Error naming the first such name and its path, so `what` (e.g. "Checkpointer") fails
// before training instead of hours later.
void check_names_readable(const torch::nn::Module& model, const std::string& what);

}  // namespace lockstep::train
