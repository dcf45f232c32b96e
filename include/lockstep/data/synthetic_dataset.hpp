#pragma once
// SyntheticDataset: images computed from (seed, index) alone, for benchmarks and tests that must not
// depend on files. Sample i is the same whichever batch asks for it and whichever rank asks.
// Each sample is unit-variance noise plus `signal` times a fixed +-1 pattern of its class, so a model
// can learn it (signal > 0) or not (signal = 0).

#include <cstdint>

#include "lockstep/data/dataset.hpp"

namespace lockstep {
namespace data {

struct SyntheticOptions {
  int64_t channels = 3;
  int64_t height = 32;
  int64_t width = 32;
  int64_t num_classes = 10;
  int64_t size = 1024;
  uint64_t seed = 0;
  double signal = 1.0;
};

class SyntheticDataset : public Dataset {
 public:
  explicit SyntheticDataset(SyntheticOptions options = {});

  size_t size() const override { return static_cast<size_t>(options_.size); }
  DatasetInfo info() const override;
  Example get_batch(const std::vector<int64_t>& indices) const override;
  std::string description() const override;

  // The label of sample `index` without generating its pixels.
  int64_t label(int64_t index) const;

 private:
  SyntheticOptions options_;
};

}  // namespace data
}  // namespace lockstep
