#include "lockstep/models/resnet.hpp"

#include <torch/nn/functional/pooling.h>
#include <torch/nn/init.h>

#include "lockstep/core/error.hpp"
#include "lockstep/models/basic_block.hpp"

namespace lockstep {
namespace models {

Stem parse_stem(const std::string& name) {
  if (name == "imagenet") return Stem::ImageNet;
  if (name == "small") return Stem::Small;
  LOCKSTEP_FAIL("unknown ResNet stem '", name, "'; expected 'imagenet' or 'small'");
}

std::string to_string(Stem stem) { return stem == Stem::ImageNet ? "imagenet" : "small"; }

namespace {
torch::nn::Sequential make_stage(int64_t in_channels, int64_t out_channels, int64_t stride, bool quantize) {
  // ResNet-18: two blocks per stage; only the first one changes resolution and channel count.
  return torch::nn::Sequential(BasicBlock(in_channels, out_channels, stride, quantize),
                               BasicBlock(out_channels, out_channels, 1, quantize));
}
}  // namespace

ResNet18Impl::ResNet18Impl(ResNet18Options options) : options_(options) {
  LOCKSTEP_CHECK(options_.num_classes > 0, "ResNet18: num_classes must be positive, got ", options_.num_classes);
  LOCKSTEP_CHECK(options_.in_channels > 0, "ResNet18: in_channels must be positive, got ", options_.in_channels);
  LOCKSTEP_CHECK(options_.width > 0, "ResNet18: width must be positive, got ", options_.width);
  const int64_t w = options_.width;
  const bool imagenet = options_.stem == Stem::ImageNet;
  const int64_t kernel = imagenet ? 7 : 3;
  conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(options_.in_channels, w, kernel)
                                                         .stride(imagenet ? 2 : 1)
                                                         .padding(kernel / 2)
                                                         .bias(false)));
  bn1 = register_module("bn1", ddp::SyncBatchNorm(w));
  const bool q = options_.quantize_activations;
  layer1 = register_module("layer1", make_stage(w, w, 1, q));
  layer2 = register_module("layer2", make_stage(w, 2 * w, 2, q));
  layer3 = register_module("layer3", make_stage(2 * w, 4 * w, 2, q));
  layer4 = register_module("layer4", make_stage(4 * w, 8 * w, 2, q));
  fc = register_module("fc", torch::nn::Linear(8 * w, options_.num_classes));
  if (q) {
    quant_input = register_module("quant_input", compress::ActivationFakeQuant());
    quant_stem = register_module("quant_stem", compress::ActivationFakeQuant());
    quant_pool = register_module("quant_pool", compress::ActivationFakeQuant());
  }

  // torchvision's initialisation; fc keeps LibTorch's default, which is the same as PyTorch's.
  for (auto& module : modules(/*include_self=*/false)) {
    if (auto* conv = module->as<torch::nn::Conv2d>()) {
      torch::nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
    } else if (auto* bn = module->as<ddp::SyncBatchNorm>()) {
      torch::nn::init::ones_(bn->weight);
      torch::nn::init::zeros_(bn->bias);
    }
  }
  if (options_.zero_init_residual) {
    for (auto& module : modules(/*include_self=*/false)) {
      if (auto* block = module->as<BasicBlock>()) torch::nn::init::zeros_(block->bn2->weight);
    }
  }
}

torch::Tensor ResNet18Impl::forward(const torch::Tensor& input) {
  LOCKSTEP_CHECK(input.dim() == 4 && input.size(1) == options_.in_channels, "ResNet18: expected input [N, ",
                 options_.in_channels, ", H, W], got ", input.sizes());
  torch::Tensor x = compress::fake_quantize_at(quant_stem, torch::relu(bn1->forward(conv1->forward(compress::fake_quantize_at(quant_input, input)))));
  if (options_.stem == Stem::ImageNet) {
    x = torch::nn::functional::max_pool2d(x, torch::nn::functional::MaxPool2dFuncOptions(3).stride(2).padding(1));
  }
  x = layer4->forward(layer3->forward(layer2->forward(layer1->forward(x))));
  x = torch::nn::functional::adaptive_avg_pool2d(x, torch::nn::functional::AdaptiveAvgPool2dFuncOptions(1));
  return fc->forward(compress::fake_quantize_at(quant_pool, x.flatten(1)));
}

}  // namespace models
}  // namespace lockstep
