#include "lockstep/models/int8_resnet.hpp"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>

#include "lockstep/compress/quantization.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::models {
namespace {

constexpr double kBatchNormEps = 1e-5;  // torch::nn::BatchNorm2d's default, which ResNet18 uses

struct EngineName {
  const char* name;
  at::QEngine engine;
};
constexpr EngineName kEngines[] = {{"x86", at::QEngine::X86},
                                   {"onednn", at::QEngine::ONEDNN},
                                   {"fbgemm", at::QEngine::FBGEMM},
                                   {"qnnpack", at::QEngine::QNNPACK}};

bool supported(at::QEngine engine) {
  for (at::QEngine e : at::globalContext().supportedQEngines()) {
    if (e == engine) return true;
  }
  return false;
}

std::string supported_names() {
  std::string out;
  for (const auto& name : int8_engines()) out += (out.empty() ? "" : ", ") + name;
  return out.empty() ? "none" : out;
}

// "auto" takes the first of kEngines this LibTorch has: x86 and oneDNN are the fast ones on x86 CPUs.
EngineName pick_engine(const std::string& name) {
  for (const auto& e : kEngines) {
    if ((name == "auto" || name == e.name) && supported(e.engine)) return e;
  }
  LOCKSTEP_FAIL("Int8ResNet18: quantized engine '", name, "' is not in this LibTorch (it has: ", supported_names(), ")");
}

c10::IValue call(const char* op, const char* overload, std::vector<c10::IValue> stack) {
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, overload);
  handle.callBoxed(&stack);
  return stack.at(0);
}

// Looks entries up in the file, naming what is missing.
class Entries {
 public:
  Entries(const compress::Int8Model& file, const std::string& path) : file_(file), path_(path) {}

  at::Tensor tensor(const std::string& name) const {
    auto it = file_.tensors.find(name);
    LOCKSTEP_CHECK(it != file_.tensors.end(), "Int8ResNet18: '", path_, "' has no '", name,
                   "' (not a ResNet-18 of these options?)");
    return it->second;
  }
  // A convolution's int8 weight. One that training kept in float (excluded from quantization) is an
  // error: quantized here, it would compute what the evaluated model never did.
  compress::QuantizedWeight weight(const std::string& name, at::IntArrayRef shape) const {
    auto it = file_.weights.find(name);
    if (it == file_.weights.end()) {
      // In float (in the file's float tensors), or not there at all: a file of another model.
      LOCKSTEP_CHECK(file_.tensors.count(name) + file_.ties.count(name) > 0, "Int8ResNet18: '", path_,
                     "' has no entry '", name, "' (not a ResNet-18 of these options?)");
      LOCKSTEP_FAIL("Int8ResNet18: '", name, "' in '", path_,
                    "' was kept in float by quantization-aware training (an exclude pattern?); the int8 convolutions "
                    "need every convolution trained with fake quantization (only fc may stay in float)");
    }
    check_shape(name, it->second.codes, shape);
    return it->second;
  }
  // The classifier's weight as the trained model used it: dequantized int8, or the float one.
  at::Tensor float_weight(const std::string& name, at::IntArrayRef shape) const {
    auto it = file_.weights.find(name);
    const at::Tensor w =
        it != file_.weights.end() ? compress::dequantize_weight(it->second.codes, it->second.scale) : tensor(name);
    check_shape(name, w, shape);
    return w.to(at::kFloat);
  }
  std::pair<double, int64_t> point(const std::string& name) const {
    auto it = file_.activations.find(name);
    LOCKSTEP_CHECK(it != file_.activations.end(), "Int8ResNet18: '", path_, "' has no activation point '", name,
                   "' (train with model.quantize_activations and quantization.activations)");
    const double scale = it->second.scale.item<double>();
    // A point never observed has the floor scale: every value would be 0. Its update count (a buffer)
    // tells; a point that observed only zeros (a dead ReLU) is fine. Older files: the scale tells.
    auto updates = file_.tensors.find(name + ".updates");
    const bool observed = updates != file_.tensors.end() ? updates->second.item<int64_t>() > 0
                                                         : scale > std::numeric_limits<float>::epsilon();
    LOCKSTEP_CHECK(observed, "Int8ResNet18: activation point '", name, "' in '", path_,
                   "' has no observed range (did training end before quantization began?)");
    return {scale, static_cast<int64_t>(it->second.zero_point.item<int>())};
  }

 private:
  void check_shape(const std::string& name, const at::Tensor& value, at::IntArrayRef shape) const {
    LOCKSTEP_CHECK(value.sizes() == shape, "Int8ResNet18: '", name, "' in '", path_, "' has shape ", value.sizes(),
                   ", the options give ", shape);
  }

  const compress::Int8Model& file_;
  const std::string& path_;
};

// Note [Folding batch norm]. Returns the engine's prepacked convolution.
c10::IValue fold_and_pack(const Entries& entries, const std::string& conv, const std::string& bn, int64_t in,
                          int64_t out, int64_t kernel, int64_t stride) {
  const compress::QuantizedWeight w = entries.weight(conv + ".weight", {out, in, kernel, kernel});
  const at::Tensor gamma = entries.tensor(bn + ".weight").to(at::kDouble);
  const at::Tensor beta = entries.tensor(bn + ".bias").to(at::kDouble);
  const at::Tensor mean = entries.tensor(bn + ".running_mean").to(at::kDouble);
  const at::Tensor var = entries.tensor(bn + ".running_var").to(at::kDouble);
  LOCKSTEP_CHECK(gamma.numel() == out && var.numel() == out, "Int8ResNet18: '", bn, "' has ", gamma.numel(),
                 " channels, '", conv, "' has ", out);
  const at::Tensor factor = gamma / (var + kBatchNormEps).sqrt();
  const at::Tensor scale = w.scale.to(at::kDouble).expand({out}) * factor.abs();
  const at::Tensor sign = factor.sign().to(at::kChar).view({out, 1, 1, 1});
  const at::Tensor codes = w.codes.mul(sign).to(at::kChar);  // |code| <= 127: negation stays in range
  const at::Tensor qweight = at::_make_per_channel_quantized_tensor(
      codes.contiguous(), at::where(scale.gt(0), scale, at::ones_like(scale)), at::zeros({out}, at::kLong), 0);
  const at::Tensor bias = (beta - mean * factor).to(at::kFloat);
  const std::vector<int64_t> strides{stride, stride}, padding{kernel / 2, kernel / 2}, dilation{1, 1};
  return call("quantized::conv2d_prepack", "", {qweight, bias, strides, padding, dilation, int64_t{1}});
}

at::Tensor run_conv(const at::Tensor& input, const c10::IValue& packed, double scale, int64_t zero_point, bool relu) {
  return call(relu ? "quantized::conv2d_relu" : "quantized::conv2d", "new", {input, packed, scale, zero_point}).toTensor();
}

}  // namespace

std::vector<std::string> int8_engines() {
  std::vector<std::string> out;
  for (const auto& e : kEngines) {
    if (supported(e.engine)) out.emplace_back(e.name);
  }
  return out;
}

Int8ResNet18::Int8ResNet18(const std::string& path, ResNet18Options options, Int8Options int8)
    : options_(options) {
  const EngineName engine = pick_engine(int8.engine);
  engine_name_ = engine.name;
  engine_ = static_cast<int>(engine.engine);
  at::globalContext().setQEngine(engine.engine);  // prepacking is per engine

  const compress::Int8Model file = compress::read_int8(path);
  const Entries entries(file, path);
  const int64_t w = options_.width;
  const bool imagenet = options_.stem == Stem::ImageNet;
  std::tie(input_scale_, input_zero_point_) = entries.point("quant_input");
  std::tie(stem_.scale, stem_.zero_point) = entries.point("quant_stem");
  stem_.packed = fold_and_pack(entries, "conv1", "bn1", options_.in_channels, w, imagenet ? 7 : 3, imagenet ? 2 : 1);

  int64_t in = w;
  for (int64_t stage = 0; stage < 4; ++stage) {
    const int64_t out = w << stage;
    for (int64_t b = 0; b < 2; ++b) {
      const std::string prefix = "layer" + std::to_string(stage + 1) + "." + std::to_string(b) + ".";
      const int64_t stride = (stage > 0 && b == 0) ? 2 : 1;
      Block block;
      std::tie(block.conv1.scale, block.conv1.zero_point) = entries.point(prefix + "quant_relu1");
      block.conv1.packed = fold_and_pack(entries, prefix + "conv1", prefix + "bn1", in, out, 3, stride);
      std::tie(block.conv2.scale, block.conv2.zero_point) = entries.point(prefix + "quant_bn2");
      block.conv2.packed = fold_and_pack(entries, prefix + "conv2", prefix + "bn2", out, out, 3, 1);
      block.has_downsample = stride != 1 || in != out;
      if (block.has_downsample) {
        std::tie(block.downsample.scale, block.downsample.zero_point) = entries.point(prefix + "quant_downsample");
        block.downsample.packed =
            fold_and_pack(entries, prefix + "downsample.0", prefix + "downsample.1", in, out, 1, stride);
      }
      std::tie(block.out_scale, block.out_zero_point) = entries.point(prefix + "quant_out");
      blocks_.push_back(block);
      in = out;
    }
  }
  std::tie(pool_scale_, pool_zero_point_) = entries.point("quant_pool");
  fc_weight_ = entries.float_weight("fc.weight", {options_.num_classes, 8 * w});
  fc_bias_ = entries.tensor("fc.bias").to(at::kFloat);
}

at::Tensor Int8ResNet18::forward(const at::Tensor& input) const {
  LOCKSTEP_CHECK(input.device().is_cpu(), "Int8ResNet18: the quantized kernels run on the CPU; got a tensor on ",
                 input.device());
  LOCKSTEP_CHECK(input.dim() == 4 && input.size(1) == options_.in_channels, "Int8ResNet18: expected input [N, ",
                 options_.in_channels, ", H, W], got ", input.sizes());
  // The engine is process-wide state: the weights were packed for this one.
  at::globalContext().setQEngine(static_cast<at::QEngine>(engine_));
  at::NoGradGuard no_grad;
  at::Tensor x = at::quantize_per_tensor(input.to(at::kFloat).contiguous(), input_scale_, input_zero_point_, at::kQUInt8);
  x = run_conv(x, stem_.packed, stem_.scale, stem_.zero_point, /*relu=*/true);
  if (options_.stem == Stem::ImageNet) x = at::max_pool2d(x, {3, 3}, {2, 2}, {1, 1});
  for (const Block& b : blocks_) {
    at::Tensor out = run_conv(x, b.conv1.packed, b.conv1.scale, b.conv1.zero_point, true);
    out = run_conv(out, b.conv2.packed, b.conv2.scale, b.conv2.zero_point, false);
    const at::Tensor shortcut =
        b.has_downsample ? run_conv(x, b.downsample.packed, b.downsample.scale, b.downsample.zero_point, false) : x;
    x = call("quantized::add_relu", "", {out, shortcut, b.out_scale, b.out_zero_point}).toTensor();
  }
  // As the trained model: average in float, then the pool point's fake quantization, then fc in float.
  at::Tensor features = at::adaptive_avg_pool2d(x.dequantize(), {1, 1}).flatten(1);
  features = compress::fake_quantize_activation(features, pool_scale_, pool_zero_point_);
  return at::linear(features, fc_weight_, fc_bias_);
}

}  // namespace lockstep::models
