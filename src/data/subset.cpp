#include "lockstep/data/subset.hpp"

#include <algorithm>
#include <numeric>

#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

Subset::Subset(DatasetPtr base, std::vector<int64_t> indices) : base_(std::move(base)), indices_(std::move(indices)) {
  LOCKSTEP_CHECK(base_ != nullptr, "Subset: base dataset is null");
  LOCKSTEP_CHECK(!indices_.empty(), "Subset of ", base_->description(), ": no indices");
  const auto n = static_cast<int64_t>(base_->size());
  for (size_t i = 0; i < indices_.size(); ++i) {
    LOCKSTEP_CHECK(indices_[i] >= 0 && indices_[i] < n, "Subset of ", base_->description(), ": index ", indices_[i],
                   " (position ", i, ") is out of range; expected 0 <= index < ", n);
  }
}

std::shared_ptr<Subset> Subset::first(DatasetPtr base, size_t limit) {
  LOCKSTEP_CHECK(base != nullptr, "Subset::first: base dataset is null");
  LOCKSTEP_CHECK(limit > 0, "Subset::first of ", base->description(), ": limit must be positive");
  std::vector<int64_t> indices(std::min(limit, base->size()));
  std::iota(indices.begin(), indices.end(), int64_t{0});
  return std::make_shared<Subset>(std::move(base), std::move(indices));
}

std::string Subset::description() const {
  return base_->description() + " [subset of " + std::to_string(indices_.size()) + "]";
}

Example Subset::get_batch(const std::vector<int64_t>& indices) const {
  check_indices(indices);
  std::vector<int64_t> mapped(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) mapped[i] = indices_[static_cast<size_t>(indices[i])];
  return base_->get_batch(mapped);
}

}  // namespace data
}  // namespace lockstep
