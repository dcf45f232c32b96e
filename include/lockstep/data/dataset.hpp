#pragma once
// Dataset: the interface every image data set in Lockstep implements. A data set answers a whole batch
// of indices at once (get_batch) instead of one sample at a time, so that implementations can gather and
// normalise with one tight loop and the loader builds no per-sample tensors.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lockstep {
namespace data {

enum class Split { Train, Test };

// One batch. The image data sets give data float32 [B, C, H, W] and target int64 [B] with values in
// [0, num_classes). A data set of your own may give any tensors whose first dimension is the batch: the
// trainer hands data to the model and the model's output with target to the loss and the metrics
// (train/loss.hpp, train/metrics.hpp), e.g. images as targets for a denoiser.
struct Example {
  at::Tensor data;
  at::Tensor target;
};

// What a model needs to know about the samples.
struct DatasetInfo {
  int64_t channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  int64_t num_classes = 0;
  // Per channel, the value a raw black (0) pixel has after normalisation. Augmentation pads with it, so
  // padded borders match torchvision's order (pad the raw image with 0, then normalise). Empty means 0.
  std::vector<float> pad_values;
};

class Dataset {
 public:
  virtual ~Dataset() = default;

  virtual size_t size() const = 0;
  virtual DatasetInfo info() const = 0;
  // Gathers the samples at `indices` (each in [0, size()); repeats allowed) in that order.
  // Must be safe to call from the loader's background thread while nothing else mutates the data set.
  virtual Example get_batch(const std::vector<int64_t>& indices) const = 0;
  // Epoch-dependent transforms (augmentation) reseed here. The loader calls it only while no batch is
  // being assembled, so implementations need no locking.
  virtual void set_epoch(int64_t epoch) {}
  // A short human-readable name for messages, e.g. "Fashion-MNIST train (/usr/share/...)".
  virtual std::string description() const = 0;

  int64_t channels() const { return info().channels; }
  int64_t height() const { return info().height; }
  int64_t width() const { return info().width; }
  int64_t num_classes() const { return info().num_classes; }

 protected:
  // Throws a lockstep::Error naming the data set, the offending index and the valid range.
  void check_indices(const std::vector<int64_t>& indices) const;
};

using DatasetPtr = std::shared_ptr<Dataset>;

}  // namespace data
}  // namespace lockstep
