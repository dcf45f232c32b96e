#pragma once
// Fake quantization: int8 arithmetic simulated in floating point, so that a model trains (and is
// evaluated) with the rounding and clipping it meets as an int8 model (quantization-aware training).
//
// Weights: signed 8-bit codes in [-127, 127], zero point 0 (symmetric), one scale per output channel
// (dim 0) or one per tensor:  scale = max|w| / 127,  code = clamp(round(w / scale), -127, 127),
// value = code * scale. The largest weight of a channel gets code +-127, zero stays exactly zero
// (pruned weights stay pruned), and nothing is clipped, so the straight-through gradient is the identity.
//
// Note [Symmetric weights]: with symmetric per-channel scales, multiplying a channel by any factor
// a != 0 multiplies its scale by |a| and its codes by sign(a), and leaves them otherwise unchanged. Folding
// batch norm into the preceding convolution (w'_c = w_c * gamma_c / sigma_c) is such a scaling, so the
// codes learned with an unfolded batch norm are the codes of the folded int8 convolution (tested).
//
// Activations: unsigned 8-bit codes in [0, 255] over a range [min, max] widened to contain 0 (so that
// zero padding and ReLU's zeros are exact):  scale = (max - min) / 255,  zero_point = round(-min / scale).
// ActivationFakeQuant is the module that a model places where its int8 version would requantize
// (the input, after each conv + bn (+ relu), after each residual add). It does nothing until a
// QuantizationAwareTraining callback (compress/quantization.hpp) turns it on; the callback keeps its
// range identical on every rank (Note [Activation ranges]).

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <utility>

#include "lockstep/train/model_tensors.hpp"

namespace lockstep::compress {

constexpr int64_t kWeightCodeMax = 127;      // weight codes in [-127, 127]
constexpr int64_t kActivationCodeMax = 255;  // activation codes in [0, 255]

struct QuantizedWeight {
  at::Tensor codes;  // int8, the weight's shape
  at::Tensor scale;  // the weight's floating-point type: [out_channels] per channel, [1] per tensor
};

// max|w| / 127 per output channel (per_channel) or over the whole tensor; a channel that is all zero
// gets scale 1 (its codes are 0 whatever the scale).
at::Tensor weight_scale(const at::Tensor& weight, bool per_channel);
QuantizedWeight quantize_weight(const at::Tensor& weight, bool per_channel);
// codes * scale in `scale`'s type; scale has one entry per output channel or one in all.
at::Tensor dequantize_weight(const at::Tensor& codes, const at::Tensor& scale);
// dequantize_weight(quantize_weight(w)): the values the int8 weight stands for. No autograd.
at::Tensor fake_quantize_weight(const at::Tensor& weight, bool per_channel);
// Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - q|^2) (infinite when q == x).
double sqnr_db(const at::Tensor& reference, const at::Tensor& approximation);

struct ActivationQParams {
  at::Tensor scale;       // float32 [1]
  at::Tensor zero_point;  // int32 [1], in [0, 255]
};
// The uint8 parameters for the range [min, max] (float scalars; min <= max), widened to contain 0.
ActivationQParams activation_qparams(const at::Tensor& min, const at::Tensor& max);

// Fake-quantizes a float32 tensor to uint8 with host-side parameters: (clamp(round(x / scale) + zp,
// 0, 255) - zp) * scale, bitwise what torch::fake_quantize_per_tensor_affine computes, and the same
// straight-through gradient (passed where the code before clamping is in [0, 255], zero elsewhere).
// Note [Fast fake quantization]: on the CPU this is four vectorised passes with scalar operands,
// about 18x faster than LibTorch's fake_quantize kernel there (0.23 vs 4.2 ms for 800k floats).
at::Tensor fake_quantize_activation(const at::Tensor& x, double scale, int64_t zero_point);

// A point where activations are fake-quantized to uint8. Identity (and free) until enabled.
// Buffers (checkpointed with the model, exported with the int8 model): min_val and max_val, the
// range (float32 scalars), and updates, how many range updates it has had (int64 scalar).
// Its range is a train::BufferState (Note [Buffers that are state]): a weight average copies it rather
// than averaging it, and writing the buffers from outside re-reads them (buffers_replaced).
class ActivationFakeQuantImpl : public torch::nn::Module, public train::BufferState {
 public:
  ActivationFakeQuantImpl();
  void buffers_replaced() override { sync_from_buffers(); }

  // In training mode while observing: records the batch's min and max (for take_batch_range).
  // While enabled and the range has been set at least once: fake-quantizes with the range's
  // parameters (gradient: straight through inside the range, zero outside). Otherwise the identity.
  at::Tensor forward(const at::Tensor& input);

  // Whether forward() records batch ranges (QAT's calibration, until the ranges freeze) and whether
  // it fake-quantizes (once quantization began); QuantizationAwareTraining sets both.
  void set_observing(bool observing) { observing_ = observing; }
  bool observing() const { return observing_; }
  void set_enabled(bool enabled) { enabled_ = enabled; }
  bool enabled() const { return enabled_; }
  // Whether the range has been set (updates > 0), as last read from the buffers by sync_from_buffers
  // (update_range does not read the device; the callback syncs a point once, after its first update).
  bool has_range() const { return has_range_; }

  // The min and max (float32 scalars) of everything forward observed since the last call, then
  // forgets them; +inf and -inf when it observed nothing.
  std::pair<at::Tensor, at::Tensor> take_batch_range();
  // Folds a batch range agreed by every rank into the range: the first update takes it as it is,
  // later ones move towards it by `averaging_constant` (an exponential moving average, as PyTorch's
  // MovingAverageMinMaxObserver). `seen` (bool scalar): whether any rank observed anything; when
  // false the range stays. Runs on the device, without reading anything back to the host.
  void update_range(const at::Tensor& batch_min, const at::Tensor& batch_max, const at::Tensor& seen,
                    double averaging_constant);
  // Re-reads the buffers (after they were loaded or changed from outside): has_range and the cached
  // quantization parameters. One read from the device.
  void sync_from_buffers();
  ActivationQParams qparams() const;

  void pretty_print(std::ostream& stream) const override;

  at::Tensor min_val;
  at::Tensor max_val;
  at::Tensor updates;

 private:
  void refresh_qparams();

  bool observing_ = false;
  bool enabled_ = false;
  bool has_range_ = false;
  // The parameters on the host, for the CPU path (Note [Fast fake quantization]); a CUDA module
  // keeps them on the device only, so that no forward pass waits for the GPU.
  bool host_qparams_ = false;
  double host_scale_ = 1.0;
  int64_t host_zero_point_ = 0;
  at::Tensor batch_min_;
  at::Tensor batch_max_;
  ActivationQParams qparams_;
};
TORCH_MODULE(ActivationFakeQuant);

// `point`'s forward, or `x` itself where the model has no point there (a null holder).
inline at::Tensor fake_quantize_at(ActivationFakeQuant& point, const at::Tensor& x) { return point ? point->forward(x) : x; }

}  // namespace lockstep::compress
