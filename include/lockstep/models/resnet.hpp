#pragma once
// ResNet-18 (He et al. 2016): BasicBlocks in four stages of [2, 2, 2, 2], channels width x [1, 2, 4, 8].
// Module names follow torchvision (conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0, fc), and so does
// the initialisation (Kaiming normal, fan_out, for convolutions; batch norm weight 1, bias 0; LibTorch's
// default for fc), so a checkpoint's parameter names read like torchvision's. Every batch norm is a
// ddp::SyncBatchNorm, which is BatchNorm2d unless DataParallelOptions::sync_batch_norm attaches it.
// Parameter counts (tested): ImageNet stem, 3 input channels, width 64: 11,689,512 with 1000 classes (as
// torchvision's resnet18), 11,181,642 with 10; small stem with 10 classes: 11,173,962 (3 channels),
// 11,172,810 (1 channel).

#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "lockstep/compress/fake_quant.hpp"
#include "lockstep/ddp/sync_batch_norm.hpp"

#include <string>

namespace lockstep {
namespace models {

enum class Stem {
  // 7x7 stride-2 convolution + 3x3 stride-2 max-pool: 224x224 inputs become 56x56 before layer1.
  ImageNet,
  // 3x3 stride-1 convolution, no max-pool: for 28x28 and 32x32 images, which the ImageNet stem would
  // shrink to 7x7 / 8x8 before the first block.
  Small,
};

// "imagenet" or "small" (case-sensitive); anything else throws naming the accepted values.
Stem parse_stem(const std::string& name);
std::string to_string(Stem stem);

struct ResNet18Options {
  int64_t num_classes = 1000;
  int64_t in_channels = 3;
  Stem stem = Stem::ImageNet;
  // Channels of the stem and layer1; layers 2-4 use 2x, 4x, 8x. 64 is the paper's network.
  int64_t width = 64;
  // Start every block's last batch norm at weight 0, so each block begins as the identity
  // (Goyal et al. 2017); helps large-batch training. Off by default, as in torchvision.
  bool zero_init_residual = false;
  // Place compress::ActivationFakeQuant points where an int8 ResNet requantizes: the input
  // ("quant_input"), after the stem ("quant_stem"), inside every block (BasicBlock) and after the
  // global average pool ("quant_pool"). They are the identity (and add no parameters) until a
  // compress::QuantizationAwareTraining callback enables them; they add buffers (the ranges).
  bool quantize_activations = false;
};

class ResNet18Impl : public torch::nn::Module {
 public:
  explicit ResNet18Impl(ResNet18Options options = {});

  // [N, in_channels, H, W] -> logits [N, num_classes]; any H, W the stem and four stride-2 stages
  // leave at least 1x1 (global average pooling follows layer4).
  torch::Tensor forward(const torch::Tensor& input);

  const ResNet18Options& options() const { return options_; }

  torch::nn::Conv2d conv1{nullptr};
  ddp::SyncBatchNorm bn1{nullptr};
  torch::nn::Sequential layer1{nullptr};
  torch::nn::Sequential layer2{nullptr};
  torch::nn::Sequential layer3{nullptr};
  torch::nn::Sequential layer4{nullptr};
  torch::nn::Linear fc{nullptr};
  // Null unless options().quantize_activations.
  compress::ActivationFakeQuant quant_input{nullptr};
  compress::ActivationFakeQuant quant_stem{nullptr};
  compress::ActivationFakeQuant quant_pool{nullptr};

 private:
  ResNet18Options options_;
};
TORCH_MODULE(ResNet18);

}  // namespace models
}  // namespace lockstep
