#include "lockstep/data/image_dataset.hpp"

#include <torch/types.h>

#include <cmath>
#include <cstring>

#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

namespace {
std::vector<double> per_channel(const std::vector<double>& values, int64_t channels, const char* name,
                                const std::string& description) {
  LOCKSTEP_CHECK(values.size() == 1 || static_cast<int64_t>(values.size()) == channels, description, ": ", name,
                 " has ", values.size(), " values; expected 1 or one per channel (", channels, ")");
  return values.size() == 1 ? std::vector<double>(static_cast<size_t>(channels), values[0]) : values;
}
}  // namespace

ImageDataset::ImageDataset(ImageData data) : data_(std::move(data)) {
  const std::string& name = data_.description;
  LOCKSTEP_CHECK(data_.images.defined() && data_.images.dim() == 4, name, ": images must be a [N, C, H, W] tensor, got ",
                 data_.images.defined() ? data_.images.sizes() : at::IntArrayRef{});
  LOCKSTEP_CHECK(data_.images.scalar_type() == torch::kUInt8, name, ": images must be uint8, got ",
                 data_.images.scalar_type());
  LOCKSTEP_CHECK(data_.labels.defined() && data_.labels.dim() == 1 && data_.labels.scalar_type() == torch::kLong, name,
                 ": labels must be an int64 [N] tensor");
  // get_batch reads both through host pointers, on the loader's thread.
  LOCKSTEP_CHECK(data_.images.device().is_cpu() && data_.labels.device().is_cpu(), name,
                 ": images and labels must be CPU tensors (the loader copies each batch to the training device), "
                 "got images on ", data_.images.device(), " and labels on ", data_.labels.device());
  LOCKSTEP_CHECK(data_.labels.size(0) == data_.images.size(0), name, ": ", data_.images.size(0), " images but ",
                 data_.labels.size(0), " labels");
  LOCKSTEP_CHECK(data_.images.size(0) > 0, name, ": no samples");
  LOCKSTEP_CHECK(data_.num_classes > 0, name, ": num_classes must be positive, got ", data_.num_classes);
  data_.images = data_.images.contiguous();
  data_.labels = data_.labels.contiguous();
  const int64_t min_label = data_.labels.min().item<int64_t>();
  const int64_t max_label = data_.labels.max().item<int64_t>();
  LOCKSTEP_CHECK(min_label >= 0 && max_label < data_.num_classes, name, ": labels range over [", min_label, ", ",
                 max_label, "]; expected values in [0, ", data_.num_classes, ")");

  const int64_t channels = data_.images.size(1);
  data_.mean = per_channel(data_.mean, channels, "mean", name);
  data_.std = per_channel(data_.std, channels, "std", name);
  lookup_.resize(static_cast<size_t>(channels) * 256);
  for (int64_t c = 0; c < channels; ++c) {
    const double mean = data_.mean[c], std = data_.std[c];
    LOCKSTEP_CHECK(std::isfinite(mean) && std::isfinite(std) && std > 0, name, ": channel ", c,
                   " needs a finite mean and a positive std, got mean ", mean, ", std ", std);
    for (int v = 0; v < 256; ++v) lookup_[c * 256 + v] = static_cast<float>((v / 255.0 - mean) / std);
  }
}

size_t ImageDataset::size() const { return static_cast<size_t>(data_.images.size(0)); }

DatasetInfo ImageDataset::info() const {
  DatasetInfo info;
  info.channels = data_.images.size(1);
  info.height = data_.images.size(2);
  info.width = data_.images.size(3);
  info.num_classes = data_.num_classes;
  for (int64_t c = 0; c < info.channels; ++c) info.pad_values.push_back(lookup_[c * 256]);
  return info;
}

Example ImageDataset::get_batch(const std::vector<int64_t>& indices) const {
  check_indices(indices);
  const int64_t batch = static_cast<int64_t>(indices.size());
  const int64_t channels = data_.images.size(1);
  const int64_t plane = data_.images.size(2) * data_.images.size(3);
  at::Tensor data = torch::empty({batch, channels, data_.images.size(2), data_.images.size(3)}, torch::kFloat);
  at::Tensor target = torch::empty({batch}, torch::kLong);
  const uint8_t* pixels = data_.images.data_ptr<uint8_t>();
  const int64_t* labels = data_.labels.data_ptr<int64_t>();
  float* out = data.data_ptr<float>();
  int64_t* out_target = target.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const uint8_t* sample = pixels + indices[b] * channels * plane;
    for (int64_t c = 0; c < channels; ++c) {
      const float* table = lookup_.data() + c * 256;
      const uint8_t* in = sample + c * plane;
      float* dst = out + (b * channels + c) * plane;
      for (int64_t p = 0; p < plane; ++p) dst[p] = table[in[p]];
    }
    out_target[b] = labels[indices[b]];
  }
  return {data, target};
}

}  // namespace data
}  // namespace lockstep
