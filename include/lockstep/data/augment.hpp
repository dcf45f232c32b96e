#pragma once
// Augment: random crop with zero padding and random horizontal flip, applied per sample on top of any
// Dataset (the standard CIFAR/Fashion-MNIST recipe: RandomCrop(side, padding=pad), RandomHorizontalFlip).
// The data moves and the target does not: a target over the image's pixels ([.., H, W]: a clean
// image, a mask) is refused, and belongs in a data set that wraps the Augment instead.
// Note [Augmentation seeding]: each sample's crop offset and flip come from a generator seeded by
// (seed, epoch, index), never from shared state, so a run is reproducible whatever the batch size,
// world size, prefetch timing or resume point, and a sample is augmented differently every epoch.

#include <cstdint>

#include "lockstep/data/dataset.hpp"

namespace lockstep {
namespace data {

struct AugmentOptions {
  // Pixels of padding on each side before cropping back to the original size (4 for 32x32 CIFAR,
  // 2 to 4 for 28x28); 0 = no crop.
  int64_t pad = 0;
  // Flip left-right with probability 1/2.
  bool hflip = false;
  uint64_t seed = 0;
};

class Augment : public Dataset {
 public:
  Augment(DatasetPtr base, AugmentOptions options);

  size_t size() const override { return base_->size(); }
  DatasetInfo info() const override { return base_->info(); }
  Example get_batch(const std::vector<int64_t>& indices) const override;
  void set_epoch(int64_t epoch) override;
  std::string description() const override;

  int64_t epoch() const { return epoch_; }
  const DatasetPtr& base() const { return base_; }

 private:
  DatasetPtr base_;
  AugmentOptions options_;
  int64_t epoch_ = 0;
};

}  // namespace data
}  // namespace lockstep
