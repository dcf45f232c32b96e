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

// Note [Buffers that are state]: a module whose buffers are a state to carry over rather than a
// statistic to average derives from BufferState as well as from torch::nn::Module. The activation
// ranges of quantization-aware training (compress::ActivationFakeQuant) are such a state: an average
// that includes the steps before QAT set them (zeros) shrinks them, and the int8 model exported from
// the averaged ranges clips what the evaluated model did not. So:
//   - ExponentialMovingAverage copies these buffers from the model instead of averaging them;
//   - whoever writes a model's buffers from outside (the average swapped in or left at the end,
//     EarlyStopping's best weights restored) calls notify_buffers_replaced(model), and each such
//     module re-reads its buffers (a fake-quant point keeps its quantization parameters cached).
class BufferState {
 public:
  virtual ~BufferState() = default;
  // The module's buffers were overwritten from outside: re-read whatever is derived from them.
  virtual void buffers_replaced() = 0;
};

// Calls buffers_replaced() on every module of `model` (itself included) that is a BufferState.
void notify_buffers_replaced(torch::nn::Module& model);
// Per entry of parameters_and_buffers(model): whether it is a buffer of a BufferState module.
std::vector<bool> state_buffer_mask(const torch::nn::Module& model);

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
