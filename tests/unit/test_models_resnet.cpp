// ResNet-18: parameter counts against closed forms and torchvision's published count, module names,
// output shapes for both stems, initialisation.
#include <torch/torch.h>
#include <catch2/catch.hpp>

#include "lockstep/core/error.hpp"
#include "lockstep/models/resnet.hpp"

using Catch::Matchers::Contains;
using lockstep::models::ResNet18;
using lockstep::models::ResNet18Options;
using lockstep::models::Stem;

namespace {

int64_t count_parameters(torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

// Independent closed form: conv weights (no bias), batch norm weight + bias, fc weight + bias.
int64_t expected_parameters(int64_t classes, int64_t in_channels, Stem stem, int64_t w) {
  const int64_t k = stem == Stem::ImageNet ? 7 : 3;
  int64_t total = in_channels * w * k * k + 2 * w;  // stem conv + bn
  int64_t in = w;
  for (int64_t out : {w, 2 * w, 4 * w, 8 * w}) {
    // Block 0: conv3x3 in->out, conv3x3 out->out, two bn; a 1x1 shortcut + bn when the shape changes.
    total += in * out * 9 + out * out * 9 + 4 * out;
    if (in != out) total += in * out + 2 * out;
    // Block 1: conv3x3 out->out twice, two bn.
    total += 2 * out * out * 9 + 4 * out;
    in = out;
  }
  return total + 8 * w * classes + classes;
}

ResNet18Options make(int64_t classes, int64_t in_channels, Stem stem, int64_t width) {
  ResNet18Options o;
  o.num_classes = classes;
  o.in_channels = in_channels;
  o.stem = stem;
  o.width = width;
  return o;
}

}  // namespace

TEST_CASE("ResNet18: parameter counts match torchvision and the closed form", "[models]") {
  ResNet18 imagenet(make(1000, 3, Stem::ImageNet, 64));
  CHECK(count_parameters(*imagenet) == 11689512);  // torchvision.models.resnet18()
  ResNet18 imagenet10(make(10, 3, Stem::ImageNet, 64));
  CHECK(count_parameters(*imagenet10) == 11181642);  // 11689512 - 513 * 990
  ResNet18 small10(make(10, 3, Stem::Small, 64));
  CHECK(count_parameters(*small10) == 11173962);  // 7x7 -> 3x3 stem: 64 * 3 * (49 - 9) fewer
  ResNet18 small_gray(make(10, 1, Stem::Small, 64));
  CHECK(count_parameters(*small_gray) == 11172810);  // 2 * 9 * 64 fewer than 3 channels
  for (int64_t width : {8, 16, 64}) {
    for (Stem stem : {Stem::ImageNet, Stem::Small}) {
      ResNet18 net(make(7, 2, stem, width));
      CHECK(count_parameters(*net) == expected_parameters(7, 2, stem, width));
    }
  }
  CHECK(expected_parameters(1000, 3, Stem::ImageNet, 64) == 11689512);  // the closed form itself is right
}

TEST_CASE("ResNet18: torchvision's parameter and buffer names", "[models]") {
  ResNet18 net(make(10, 3, Stem::ImageNet, 8));
  const auto params = net->named_parameters();
  for (const char* name : {"conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
                           "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer4.1.conv2.weight",
                           "fc.weight", "fc.bias"}) {
    CAPTURE(name);
    CHECK(params.contains(name));
  }
  CHECK_FALSE(params.contains("layer1.0.downsample.0.weight"));  // identity shortcut
  CHECK_FALSE(params.contains("conv1.bias"));
  CHECK(params.size() == 62);  // torchvision resnet18 has 62 parameter tensors
  const auto buffers = net->named_buffers();
  CHECK(buffers.contains("layer3.0.downsample.1.running_mean"));
  CHECK(buffers.contains("bn1.num_batches_tracked"));
  CHECK(params["layer2.0.conv1.weight"].sizes() == torch::IntArrayRef({16, 8, 3, 3}));
  CHECK(params["conv1.weight"].sizes() == torch::IntArrayRef({8, 3, 7, 7}));
}

TEST_CASE("ResNet18: output shapes for both stems and odd input sizes", "[models]") {
  torch::manual_seed(0);
  ResNet18 small(make(10, 1, Stem::Small, 8));
  CHECK(small->forward(torch::randn({3, 1, 28, 28})).sizes() == torch::IntArrayRef({3, 10}));
  CHECK(small->forward(torch::randn({2, 1, 32, 32})).sizes() == torch::IntArrayRef({2, 10}));
  ResNet18 imagenet(make(5, 3, Stem::ImageNet, 8));
  CHECK(imagenet->forward(torch::randn({2, 3, 64, 64})).sizes() == torch::IntArrayRef({2, 5}));
  CHECK(imagenet->forward(torch::randn({1, 3, 45, 37})).sizes() == torch::IntArrayRef({1, 5}));
  imagenet->eval();
  CHECK(imagenet->forward(torch::randn({1, 3, 224, 224})).sizes() == torch::IntArrayRef({1, 5}));
  CHECK_THROWS_WITH(small->forward(torch::randn({2, 3, 28, 28})), Contains("expected input [N, 1, H, W]"));
}

TEST_CASE("ResNet18: trains (loss falls on a fixed batch) and the backward reaches every parameter", "[models]") {
  torch::manual_seed(1);
  ResNet18 net(make(4, 1, Stem::Small, 8));
  const torch::Tensor x = torch::randn({16, 1, 12, 12});
  const torch::Tensor y = torch::arange(16) % 4;
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(net->forward(x), y);
    loss.backward();
    if (step == 0) {
      first = loss.item<double>();
      for (const auto& p : net->named_parameters()) {
        CAPTURE(p.key());
        CHECK(p.value().grad().defined());
        CHECK(p.value().grad().abs().sum().item<double>() > 0);
      }
    }
    last = loss.item<double>();
    opt.step();
  }
  CHECK(last < 0.5 * first);
}

TEST_CASE("ResNet18: initialisation like torchvision, options validated", "[models]") {
  torch::manual_seed(2);
  ResNet18 net(make(10, 3, Stem::Small, 64));
  // Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
  const auto w = net->named_parameters()["layer3.0.conv2.weight"];
  CHECK(w.std().item<double>() == Approx(std::sqrt(2.0 / (256 * 9))).epsilon(0.02));
  // Where fan-in and fan-out differ, fan-out's (fan-in's would be sqrt(2 / (128 * 9)) and sqrt(2 / 64)),
  // the 1x1 downsampling convolution included.
  const auto widening = net->named_parameters()["layer3.0.conv1.weight"];
  REQUIRE(widening.sizes() == torch::IntArrayRef({256, 128, 3, 3}));
  CHECK(widening.std().item<double>() == Approx(std::sqrt(2.0 / (256 * 9))).epsilon(0.02));
  const auto downsample = net->named_parameters()["layer2.0.downsample.0.weight"];
  REQUIRE(downsample.sizes() == torch::IntArrayRef({128, 64, 1, 1}));
  CHECK(downsample.std().item<double>() == Approx(std::sqrt(2.0 / 128)).epsilon(0.04));
  CHECK(torch::all(net->named_parameters()["layer1.0.bn2.weight"] == 1).item<bool>());
  CHECK(torch::all(net->named_parameters()["layer1.0.bn2.bias"] == 0).item<bool>());

  ResNet18Options zero = make(10, 3, Stem::Small, 8);
  zero.zero_init_residual = true;
  ResNet18 zeroed(zero);
  CHECK(torch::all(zeroed->named_parameters()["layer4.1.bn2.weight"] == 0).item<bool>());
  CHECK(torch::all(zeroed->named_parameters()["layer4.1.bn1.weight"] == 1).item<bool>());

  CHECK(lockstep::models::parse_stem("small") == Stem::Small);
  CHECK(lockstep::models::to_string(Stem::ImageNet) == "imagenet");
  CHECK_THROWS_WITH(lockstep::models::parse_stem("big"), Contains("unknown ResNet stem 'big'"));
  CHECK_THROWS_WITH(ResNet18(make(0, 3, Stem::Small, 8)), Contains("num_classes must be positive"));
  CHECK_THROWS_WITH(ResNet18(make(10, 3, Stem::Small, 0)), Contains("width must be positive"));
}
