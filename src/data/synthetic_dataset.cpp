#include "lockstep/data/synthetic_dataset.hpp"

#include <torch/types.h>

#include <cmath>

#include "data/splitmix.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

namespace {
// Distinct stream tags so labels, noise and class patterns never share random numbers.
constexpr uint64_t kLabelStream = 1;
constexpr uint64_t kNoiseStream = 2;
constexpr uint64_t kPatternStream = 3;
// A uniform variable on [-1, 1) has variance 1/3; scaling by sqrt(3) gives unit variance.
constexpr float kUnitScale = 1.7320508f / 2147483648.0f;
}  // namespace

SyntheticDataset::SyntheticDataset(SyntheticOptions options) : options_(options) {
  LOCKSTEP_CHECK(options_.channels > 0 && options_.height > 0 && options_.width > 0, "SyntheticDataset: image shape ",
                 options_.channels, "x", options_.height, "x", options_.width, " must be positive in every dimension");
  LOCKSTEP_CHECK(options_.num_classes > 0, "SyntheticDataset: num_classes must be positive, got ", options_.num_classes);
  LOCKSTEP_CHECK(options_.size > 0, "SyntheticDataset: size must be positive, got ", options_.size);
  LOCKSTEP_CHECK(std::isfinite(options_.signal), "SyntheticDataset: signal must be finite, got ", options_.signal);
}

DatasetInfo SyntheticDataset::info() const {
  DatasetInfo info;
  info.channels = options_.channels;
  info.height = options_.height;
  info.width = options_.width;
  info.num_classes = options_.num_classes;
  return info;
}

std::string SyntheticDataset::description() const {
  return "synthetic " + std::to_string(options_.size) + " x " + std::to_string(options_.channels) + "x" +
         std::to_string(options_.height) + "x" + std::to_string(options_.width) + " (seed " +
         std::to_string(options_.seed) + ")";
}

int64_t SyntheticDataset::label(int64_t index) const {
  LOCKSTEP_CHECK(index >= 0 && index < options_.size, description(), ": index ", index,
                 " is out of range; expected 0 <= index < ", options_.size);
  detail::SplitMix64 rng(
      detail::stream_seed(detail::Domain::Synthetic, options_.seed, kLabelStream, static_cast<uint64_t>(index)));
  return static_cast<int64_t>(rng.below(static_cast<uint64_t>(options_.num_classes)));
}

Example SyntheticDataset::get_batch(const std::vector<int64_t>& indices) const {
  check_indices(indices);
  const int64_t batch = static_cast<int64_t>(indices.size());
  const int64_t numel = options_.channels * options_.height * options_.width;
  at::Tensor data = torch::empty({batch, options_.channels, options_.height, options_.width}, torch::kFloat);
  at::Tensor target = torch::empty({batch}, torch::kLong);
  float* out = data.data_ptr<float>();
  int64_t* out_target = target.data_ptr<int64_t>();
  const float signal = static_cast<float>(options_.signal);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t label = this->label(indices[b]);
    out_target[b] = label;
    detail::SplitMix64 noise(
        detail::stream_seed(detail::Domain::Synthetic, options_.seed, kNoiseStream, static_cast<uint64_t>(indices[b])));
    detail::SplitMix64 pattern(
        detail::stream_seed(detail::Domain::Synthetic, options_.seed, kPatternStream, static_cast<uint64_t>(label)));
    float* dst = out + b * numel;
    uint64_t bits = 0;
    for (int64_t p = 0; p < numel; p += 2) {
      // One 64-bit draw gives two 32-bit noise values; one pattern word covers 64 pixels.
      const uint64_t r = noise.next();
      for (int64_t k = 0; k < 2 && p + k < numel; ++k) {
        if ((p + k) % 64 == 0) bits = pattern.next();
        const auto u = static_cast<int32_t>(static_cast<uint32_t>(r >> (32 * k)));
        const float sign = ((bits >> ((p + k) % 64)) & 1) ? 1.0f : -1.0f;
        dst[p + k] = static_cast<float>(u) * kUnitScale + signal * sign;
      }
    }
  }
  return {data, target};
}

}  // namespace data
}  // namespace lockstep
