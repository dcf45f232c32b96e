#include "lockstep/data/augment.hpp"

#include <torch/types.h>

#include "data/splitmix.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

Augment::Augment(DatasetPtr base, AugmentOptions options) : base_(std::move(base)), options_(options) {
  LOCKSTEP_CHECK(base_ != nullptr, "Augment: base dataset is null");
  const DatasetInfo info = base_->info();
  LOCKSTEP_CHECK(options_.pad >= 0, "Augment over ", base_->description(), ": pad must be >= 0, got ", options_.pad);
  LOCKSTEP_CHECK(options_.pad <= info.height && options_.pad <= info.width, "Augment over ", base_->description(),
                 ": pad ", options_.pad, " exceeds the image size ", info.height, "x", info.width);
}

void Augment::set_epoch(int64_t epoch) {
  LOCKSTEP_CHECK(epoch >= 0, "Augment: epoch must be >= 0, got ", epoch);
  epoch_ = epoch;
  base_->set_epoch(epoch);
}

std::string Augment::description() const {
  return base_->description() + " + augment(pad " + std::to_string(options_.pad) +
         (options_.hflip ? ", hflip)" : ")");
}

Example Augment::get_batch(const std::vector<int64_t>& indices) const {
  Example example = base_->get_batch(indices);
  if (options_.pad == 0 && !options_.hflip) return example;

  at::Tensor input = example.data.contiguous();
  LOCKSTEP_CHECK(input.scalar_type() == torch::kFloat && input.dim() == 4, "Augment over ", base_->description(),
                 ": expected float [B, C, H, W] data, got ", input.scalar_type(), " ", input.sizes());
  // It moves pixels through host pointers, on the loader's thread.
  LOCKSTEP_CHECK(input.device().is_cpu(), "Augment over ", base_->description(), ": the data is on ",
                 input.device(), "; Augment crops and flips images in host memory (the loader moves batches to "
                 "the device afterwards): give it a data set that returns CPU tensors");
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  // Each sample's crop and flip are drawn from its index: one row per index (the Dataset contract).
  LOCKSTEP_CHECK(batch == static_cast<int64_t>(indices.size()), "Augment over ", base_->description(), ": asked for ",
                 indices.size(), " samples, the data set returned ", batch, " rows");
  // A target laid out over the image's pixels (a clean image, a mask; [B, H, W], [B, C, H, W], or
  // flattened to [B, H*W] or [B, C*H*W], or channels-last [B, H, W, C]) would stay where it was while
  // the data moved: pairs out of register, and no error. Refuse it.
  const at::Tensor& target = example.target;
  const int64_t target_per_sample = target.defined() && target.dim() >= 1 && target.size(0) == batch && batch > 0
                                        ? target.numel() / batch
                                        : 0;
  const bool pixel_shaped = target.defined() && target.dim() >= 3 &&
                            ((target.size(-2) == height && target.size(-1) == width) ||
                             (target.dim() >= 4 && target.size(-3) == height && target.size(-2) == width));
  const bool pixel_sized = height * width > 1 &&
                           (target_per_sample == height * width || target_per_sample == channels * height * width);
  LOCKSTEP_CHECK(!pixel_shaped && !pixel_sized,
                 "Augment over ", base_->description(), ": the target is ", target.sizes(),
                 ", laid out over the images' ", height, "x", width,
                 " pixels, and Augment crops and flips the data alone, which would leave the target out of "
                 "register. Augment the images beneath the data set that makes the target (as "
                 "examples/denoise_images.cpp does: the noisy images wrap the augmented clean ones)");
  const int64_t pad = options_.pad;
  std::vector<float> fill = base_->info().pad_values;
  fill.resize(static_cast<size_t>(channels), fill.empty() ? 0.0f : fill.back());

  at::Tensor output = torch::empty_like(input);
  const float* in = input.data_ptr<float>();
  float* out = output.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    detail::SplitMix64 rng(detail::stream_seed(detail::Domain::Augment, options_.seed, static_cast<uint64_t>(epoch_),
                                               static_cast<uint64_t>(indices[b])));
    // Draw in a fixed order (rows, columns, flip) whatever the options, so turning one augmentation
    // off does not change the other's choices.
    const int64_t dy = static_cast<int64_t>(rng.below(static_cast<uint64_t>(2 * pad + 1))) - pad;
    const int64_t dx = static_cast<int64_t>(rng.below(static_cast<uint64_t>(2 * pad + 1))) - pad;
    const bool flip = options_.hflip && (rng.next() >> 63);
    for (int64_t c = 0; c < channels; ++c) {
      const float* src = in + (b * channels + c) * height * width;
      float* dst = out + (b * channels + c) * height * width;
      // Crop then flip, as torchvision composes them: out(y, x) = padded(y + dy, x' + dx) where
      // x' = W-1-x when flipped.
      for (int64_t y = 0; y < height; ++y) {
        const int64_t sy = y + dy;
        float* row = dst + y * width;
        if (sy < 0 || sy >= height) {
          for (int64_t x = 0; x < width; ++x) row[x] = fill[c];
          continue;
        }
        const float* src_row = src + sy * width;
        for (int64_t x = 0; x < width; ++x) {
          const int64_t sx = (flip ? width - 1 - x : x) + dx;
          row[x] = (sx >= 0 && sx < width) ? src_row[sx] : fill[c];
        }
      }
    }
  }
  example.data = output;
  return example;
}

}  // namespace data
}  // namespace lockstep
