#include "lockstep/compress/fake_quant.hpp"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <ostream>

#include "lockstep/core/error.hpp"

namespace lockstep::compress {
namespace {

void check_weight(const at::Tensor& weight, const char* what) {
  LOCKSTEP_CHECK(weight.defined() && weight.is_floating_point() && weight.dim() >= 1, what,
                 ": needs a floating-point weight with at least one dimension, got ",
                 weight.defined() ? std::string(c10::toString(weight.scalar_type())) : std::string("undefined"),
                 weight.defined() ? " of shape " : "", weight.defined() ? weight.sizes() : at::IntArrayRef{});
}

// `scale` ([C] or [1]) shaped to broadcast over a weight of `dim` dimensions along dim 0.
at::Tensor broadcastable(const at::Tensor& scale, int64_t dim) {
  std::vector<int64_t> shape(static_cast<size_t>(dim), 1);
  shape[0] = scale.numel();
  return scale.view(shape);
}

// Scales and codes are computed in float32 at least: in bfloat16 (8 bits of mantissa) w / scale
// would round before it is rounded to a code, off by one code and past half a step.
at::Tensor at_least_float(const at::Tensor& weight) {
  const c10::ScalarType type = at::promote_types(weight.scalar_type(), torch::kFloat);
  return weight.scalar_type() == type ? weight : weight.to(type);
}

// Rounds to the nearest code (ties to even, as torch.round and the int8 kernels do).
at::Tensor codes_of(const at::Tensor& weight, const at::Tensor& scale) {
  return at_least_float(weight).div(broadcastable(scale, weight.dim())).round_().clamp_(-kWeightCodeMax, kWeightCodeMax);
}

}  // namespace

at::Tensor weight_scale(const at::Tensor& weight, bool per_channel) {
  check_weight(weight, "weight_scale");
  torch::NoGradGuard no_grad;
  const at::Tensor w = at_least_float(weight.detach());
  at::Tensor max_abs = per_channel ? w.abs().reshape({w.size(0), -1}).amax(1) : w.abs().max().reshape({1});
  return at::where(max_abs.gt(0), max_abs.div(static_cast<double>(kWeightCodeMax)), at::ones_like(max_abs));
}

QuantizedWeight quantize_weight(const at::Tensor& weight, bool per_channel) {
  QuantizedWeight out;
  out.scale = weight_scale(weight, per_channel);
  torch::NoGradGuard no_grad;
  out.codes = codes_of(weight.detach(), out.scale).to(torch::kInt8);
  return out;
}

at::Tensor dequantize_weight(const at::Tensor& codes, const at::Tensor& scale) {
  LOCKSTEP_CHECK(codes.defined() && codes.scalar_type() == torch::kInt8 && codes.dim() >= 1,
                 "dequantize_weight: needs int8 codes with at least one dimension");
  LOCKSTEP_CHECK(scale.defined() && scale.is_floating_point() && scale.dim() == 1 &&
                     (scale.numel() == 1 || scale.numel() == codes.size(0)),
                 "dequantize_weight: needs one scale per output channel (", codes.size(0), ") or one in all, got ",
                 scale.defined() ? scale.sizes() : at::IntArrayRef{});
  torch::NoGradGuard no_grad;
  return codes.to(scale.scalar_type()).mul_(broadcastable(scale, codes.dim()));
}

at::Tensor fake_quantize_weight(const at::Tensor& weight, bool per_channel) {
  const at::Tensor scale = weight_scale(weight, per_channel);
  torch::NoGradGuard no_grad;
  // The same float operations as dequantize_weight(quantize_weight(w)): codes are small integers, exact
  // in any floating-point type, so both give bitwise the same values (the int8 export relies on it).
  const at::Tensor values = codes_of(weight.detach(), scale).mul_(broadcastable(scale, weight.dim()));
  return values.scalar_type() == weight.scalar_type() ? values : values.to(weight.scalar_type());
}

double sqnr_db(const at::Tensor& reference, const at::Tensor& approximation) {
  torch::NoGradGuard no_grad;
  const at::Tensor x = reference.detach().to(torch::kFloat64);
  const double signal = x.pow(2).sum().item<double>();
  const double noise = (x - approximation.detach().to(torch::kFloat64)).pow(2).sum().item<double>();
  if (noise == 0.0) return std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(signal / noise);
}

ActivationQParams activation_qparams(const at::Tensor& min, const at::Tensor& max) {
  torch::NoGradGuard no_grad;
  const at::Tensor lo = min.detach().to(torch::kFloat).reshape({1}).clamp_max(0.0);
  const at::Tensor hi = max.detach().to(torch::kFloat).reshape({1}).clamp_min(0.0);
  ActivationQParams q;
  // A range of width 0 (all zeros seen) still needs a usable scale: the smallest normal float's
  // neighbourhood is pointless, so PyTorch's choice (float epsilon) is kept.
  q.scale = (hi - lo).div_(static_cast<double>(kActivationCodeMax)).clamp_min_(std::numeric_limits<float>::epsilon());
  q.zero_point = lo.neg().div(q.scale).round_().clamp_(0, kActivationCodeMax).to(torch::kInt);
  return q;
}

namespace {

// The straight-through estimator with the clipping mask, as LibTorch's fake_quantize defines it.
class FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double scale,
                            int64_t zero_point) {
    const double lo = static_cast<double>(-zero_point), hi = static_cast<double>(kActivationCodeMax - zero_point);
    at::Tensor codes = x.mul(static_cast<double>(1.0f / static_cast<float>(scale))).round_();
    ctx->save_for_backward({codes.ge(lo).logical_and_(codes.le(hi))});
    return codes.clamp_(lo, hi).mul_(scale);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const at::Tensor inside = ctx->get_saved_variables()[0];
    return {grad[0] * inside, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor fake_quantize_activation(const at::Tensor& x, double scale, int64_t zero_point) {
  LOCKSTEP_CHECK(x.scalar_type() == torch::kFloat, "fake_quantize_activation: needs float32, got ", x.scalar_type());
  LOCKSTEP_CHECK(scale > 0 && zero_point >= 0 && zero_point <= kActivationCodeMax,
                 "fake_quantize_activation: needs scale > 0 and a zero point in [0, 255], got ", scale, " and ",
                 zero_point);
  if (torch::GradMode::is_enabled() && x.requires_grad()) return FakeQuantizeFunction::apply(x, scale, zero_point);
  // 1 / scale in float, as LibTorch's kernel computes it, so the codes are bitwise the same.
  const double lo = static_cast<double>(-zero_point), hi = static_cast<double>(kActivationCodeMax - zero_point);
  return x.mul(static_cast<double>(1.0f / static_cast<float>(scale))).round_().clamp_(lo, hi).mul_(scale);
}

ActivationFakeQuantImpl::ActivationFakeQuantImpl() {
  min_val = register_buffer("min_val", torch::zeros({}, torch::kFloat));
  max_val = register_buffer("max_val", torch::zeros({}, torch::kFloat));
  updates = register_buffer("updates", torch::zeros({}, torch::kLong));
}

at::Tensor ActivationFakeQuantImpl::forward(const at::Tensor& input) {
  if (is_training() && observing_ && input.numel() > 0) {  // an empty batch has no range
    torch::NoGradGuard no_grad;
    auto [lo, hi] = at::aminmax(input.detach());
    lo = lo.to(torch::kFloat);
    hi = hi.to(torch::kFloat);
    batch_min_ = batch_min_.defined() ? at::minimum(batch_min_, lo) : lo;
    batch_max_ = batch_max_.defined() ? at::maximum(batch_max_, hi) : hi;
  }
  if (!enabled_ || !has_range_) return input;
  if (!qparams_.scale.defined() || qparams_.scale.device() != input.device()) refresh_qparams();
  // Fake quantization runs in float32 (16-bit floats under autocast cannot hold 256 levels exactly
  // over every range); the result goes back to the input's type.
  const at::Tensor x = input.scalar_type() == torch::kFloat ? input : input.to(torch::kFloat);
  at::Tensor y = host_qparams_ && x.is_cpu()
                     ? fake_quantize_activation(x, host_scale_, host_zero_point_)
                     : torch::fake_quantize_per_tensor_affine(x, qparams_.scale, qparams_.zero_point, 0, kActivationCodeMax);
  return y.scalar_type() == input.scalar_type() ? y : y.to(input.scalar_type());
}

std::pair<at::Tensor, at::Tensor> ActivationFakeQuantImpl::take_batch_range() {
  const auto options = min_val.options();
  const double inf = std::numeric_limits<double>::infinity();
  std::pair<at::Tensor, at::Tensor> out{batch_min_.defined() ? batch_min_ : torch::full({}, inf, options),
                                        batch_max_.defined() ? batch_max_ : torch::full({}, -inf, options)};
  batch_min_ = at::Tensor();
  batch_max_ = at::Tensor();
  return out;
}

void ActivationFakeQuantImpl::update_range(const at::Tensor& batch_min, const at::Tensor& batch_max,
                                           const at::Tensor& seen, double averaging_constant) {
  LOCKSTEP_CHECK(averaging_constant > 0.0 && averaging_constant <= 1.0,
                 "ActivationFakeQuant: averaging_constant must be in (0, 1], got ", averaging_constant);
  torch::NoGradGuard no_grad;
  const at::Tensor first = updates.eq(0);
  const at::Tensor lo = batch_min.to(min_val.device(), torch::kFloat).reshape({});
  const at::Tensor hi = batch_max.to(max_val.device(), torch::kFloat).reshape({});
  const at::Tensor ok = seen.to(min_val.device(), torch::kBool).reshape({});
  const at::Tensor new_min = at::where(first, lo, min_val + (lo - min_val) * averaging_constant);
  const at::Tensor new_max = at::where(first, hi, max_val + (hi - max_val) * averaging_constant);
  min_val.copy_(at::where(ok, new_min, min_val));
  max_val.copy_(at::where(ok, new_max, max_val));
  updates.add_(ok.to(torch::kLong));
  refresh_qparams();
}

void ActivationFakeQuantImpl::sync_from_buffers() {
  has_range_ = updates.item<int64_t>() > 0;
  LOCKSTEP_CHECK(!has_range_ || min_val.item<float>() <= max_val.item<float>(),
                 "ActivationFakeQuant: the stored range is empty (min_val ", min_val.item<float>(), " > max_val ",
                 max_val.item<float>(), ")");
  refresh_qparams();
}

void ActivationFakeQuantImpl::refresh_qparams() {
  qparams_ = activation_qparams(min_val, max_val);
  host_qparams_ = qparams_.scale.is_cpu();  // reading a CPU tensor costs nothing
  if (host_qparams_) {
    host_scale_ = qparams_.scale.item<double>();
    host_zero_point_ = qparams_.zero_point.item<int>();
  }
}

ActivationQParams ActivationFakeQuantImpl::qparams() const { return activation_qparams(min_val, max_val); }

void ActivationFakeQuantImpl::pretty_print(std::ostream& stream) const {
  stream << "lockstep::compress::ActivationFakeQuant(uint8" << (enabled_ ? ", enabled" : "")
         << (observing_ ? ", observing" : "") << ")";
}

}  // namespace lockstep::compress
