#pragma once
// Subset: a view of some samples of another Dataset, by explicit index list or the first N (for quick
// runs and tests). Sample i of the subset is sample indices[i] of the base.

#include <cstdint>
#include <vector>

#include "lockstep/data/dataset.hpp"

namespace lockstep {
namespace data {

class Subset : public Dataset {
 public:
  // Every index must be in [0, base->size()); repeats are allowed.
  Subset(DatasetPtr base, std::vector<int64_t> indices);
  // The first min(limit, base->size()) samples: a limit is "at most", so a quick-test limit larger
  // than a small data set is not an error. limit must be positive.
  static std::shared_ptr<Subset> first(DatasetPtr base, size_t limit);

  size_t size() const override { return indices_.size(); }
  DatasetInfo info() const override { return base_->info(); }
  Example get_batch(const std::vector<int64_t>& indices) const override;
  void set_epoch(int64_t epoch) override { base_->set_epoch(epoch); }
  std::string description() const override;

  const DatasetPtr& base() const { return base_; }
  const std::vector<int64_t>& indices() const { return indices_; }

 private:
  DatasetPtr base_;
  std::vector<int64_t> indices_;
};

}  // namespace data
}  // namespace lockstep
