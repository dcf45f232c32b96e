#pragma once
// BasicBlock: the two-convolution residual block of ResNet-18/34 (He et al. 2016, Fig. 2 left), with
// torchvision's module names (conv1, bn1, conv2, bn2, downsample.0, downsample.1) so that parameter
// names in checkpoints read the same as torchvision's. Its batch norms are ddp::SyncBatchNorm: plain
// BatchNorm2d (bitwise) unless DataParallel synchronises them (DataParallelOptions::sync_batch_norm).

#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/pimpl.h>

#include "lockstep/compress/fake_quant.hpp"
#include "lockstep/ddp/sync_batch_norm.hpp"

namespace lockstep {
namespace models {

class BasicBlockImpl : public torch::nn::Module {
 public:
  // A 1x1 convolution + batch norm shortcut ("downsample") is added when stride != 1 or the channel
  // count changes; otherwise the shortcut is the identity.
  // quantize_activations places ActivationFakeQuant points where an int8 block requantizes: after
  // relu(bn1(conv1)) ("quant_relu1"), after bn2(conv2) ("quant_bn2"), after the downsample shortcut
  // ("quant_downsample") and after the final add + relu ("quant_out").
  BasicBlockImpl(int64_t in_channels, int64_t out_channels, int64_t stride, bool quantize_activations = false);

  torch::Tensor forward(const torch::Tensor& input);

  torch::nn::Conv2d conv1{nullptr};
  ddp::SyncBatchNorm bn1{nullptr};
  torch::nn::Conv2d conv2{nullptr};
  ddp::SyncBatchNorm bn2{nullptr};
  torch::nn::Sequential downsample{nullptr};  // null for an identity shortcut
  // Null unless quantize_activations (quant_downsample: also null without a downsample shortcut).
  compress::ActivationFakeQuant quant_relu1{nullptr};
  compress::ActivationFakeQuant quant_bn2{nullptr};
  compress::ActivationFakeQuant quant_downsample{nullptr};
  compress::ActivationFakeQuant quant_out{nullptr};
};
TORCH_MODULE(BasicBlock);

}  // namespace models
}  // namespace lockstep
