#include "lockstep/models/basic_block.hpp"

#include <torch/nn/functional/activation.h>

#include "lockstep/core/error.hpp"

namespace lockstep {
namespace models {

namespace {
torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t kernel, int64_t stride) {
  // No bias: every convolution is followed by batch norm, whose shift makes a bias redundant.
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in, out, kernel).stride(stride).padding(kernel / 2).bias(false));
}
}  // namespace

BasicBlockImpl::BasicBlockImpl(int64_t in_channels, int64_t out_channels, int64_t stride, bool quantize_activations) {
  LOCKSTEP_CHECK(in_channels > 0 && out_channels > 0 && stride > 0, "BasicBlock: channels and stride must be positive, got ",
                 in_channels, " -> ", out_channels, ", stride ", stride);
  conv1 = register_module("conv1", conv(in_channels, out_channels, 3, stride));
  bn1 = register_module("bn1", ddp::SyncBatchNorm(out_channels));
  conv2 = register_module("conv2", conv(out_channels, out_channels, 3, 1));
  bn2 = register_module("bn2", ddp::SyncBatchNorm(out_channels));
  if (stride != 1 || in_channels != out_channels) {
    downsample = register_module(
        "downsample", torch::nn::Sequential(conv(in_channels, out_channels, 1, stride), ddp::SyncBatchNorm(out_channels)));
  }
  if (quantize_activations) {
    quant_relu1 = register_module("quant_relu1", compress::ActivationFakeQuant());
    quant_bn2 = register_module("quant_bn2", compress::ActivationFakeQuant());
    if (downsample) quant_downsample = register_module("quant_downsample", compress::ActivationFakeQuant());
    quant_out = register_module("quant_out", compress::ActivationFakeQuant());
  }
}


torch::Tensor BasicBlockImpl::forward(const torch::Tensor& input) {
  torch::Tensor out = compress::fake_quantize_at(quant_relu1, torch::relu(bn1->forward(conv1->forward(input))));
  out = compress::fake_quantize_at(quant_bn2, bn2->forward(conv2->forward(out)));
  out += downsample ? compress::fake_quantize_at(quant_downsample, downsample->forward(input)) : input;
  return compress::fake_quantize_at(quant_out, torch::relu(out));
}

}  // namespace models
}  // namespace lockstep
