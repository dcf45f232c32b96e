#pragma once
// Int8ResNet18: runs an int8 ResNet-18 file (compress::export_int8 of a ResNet18 trained with
// quantization-aware training and quantize_activations) on LibTorch's quantized CPU kernels: uint8
// activations, int8 per-channel weights, int32 accumulation (quantized::conv2d, conv2d_relu, add_relu).
//
//   lockstep::models::Int8ResNet18 int8("runs/x/model_int8.pt", model_options);
//   at::Tensor logits = int8.forward(images);   // float in, float out
//
// Note [Folding batch norm]: each convolution's batch norm (eval statistics) is folded into it when
// the file is read: w' = w * gamma / sqrt(var + eps), bias = beta - mean * gamma / sqrt(var + eps). With
// symmetric per-channel scales the int8 codes stay those the model trained with (Note [Symmetric
// weights]); only the scales change. The activations are quantized where the trained model's
// ActivationFakeQuant points were, with their scales and zero points, so this computes what the
// fake-quantized model computed, up to the rounding of intermediate sums. The classifier runs in
// float on the dequantized pooled features (10 outputs: nothing to gain from int8 there), with the
// weight the trained model used: its int8 values, or its float ones when fc was excluded from
// quantization. A convolution the file holds in float (excluded) is an error: quantized here, it would
// compute what the evaluated model never did.

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <string>
#include <vector>

#include "lockstep/models/resnet.hpp"

namespace lockstep::models {

struct Int8Options {
  // The quantized kernels' engine: "auto" (x86, else oneDNN, else FBGEMM, else QNNPACK: whichever
  // this LibTorch has), "onednn", "fbgemm", "x86" or "qnnpack". An engine this LibTorch lacks is an
  // error listing the ones it has.
  std::string engine = "auto";
};

// The engines this LibTorch has, of x86, onednn, fbgemm and qnnpack, in "auto"'s order of preference.
std::vector<std::string> int8_engines();

class Int8ResNet18 {
 public:
  // `options` must describe the exported model (stem, width, channels, classes); quantize_activations
  // is implied. Errors name the file and the missing or mismatched entry.
  Int8ResNet18(const std::string& path, ResNet18Options options, Int8Options int8 = {});

  // [N, in_channels, H, W] float -> [N, num_classes] float logits. CPU only. Not differentiable.
  at::Tensor forward(const at::Tensor& input) const;

  const std::string& engine() const { return engine_name_; }

 private:
  struct Conv {
    c10::IValue packed;  // the engine's prepacked weight and bias
    double scale = 1.0;  // the output's uint8 quantization
    int64_t zero_point = 0;
  };
  struct Block {
    Conv conv1, conv2, downsample;
    bool has_downsample = false;
    double out_scale = 1.0;
    int64_t out_zero_point = 0;
  };

  ResNet18Options options_;
  std::string engine_name_;
  int engine_ = 0;  // at::QEngine
  double input_scale_ = 1.0;
  int64_t input_zero_point_ = 0;
  Conv stem_;
  std::vector<Block> blocks_;
  double pool_scale_ = 1.0;
  int64_t pool_zero_point_ = 0;
  at::Tensor fc_weight_;
  at::Tensor fc_bias_;
};

}  // namespace lockstep::models
