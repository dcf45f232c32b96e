#include "lockstep/data/dataset.hpp"

#include "lockstep/core/error.hpp"

namespace lockstep {
namespace data {

void Dataset::check_indices(const std::vector<int64_t>& indices) const {
  const auto n = static_cast<int64_t>(size());
  for (size_t i = 0; i < indices.size(); ++i) {
    LOCKSTEP_CHECK(indices[i] >= 0 && indices[i] < n, description(), ": index ", indices[i], " (batch position ", i,
                   ") is out of range; expected 0 <= index < ", n);
  }
}

}  // namespace data
}  // namespace lockstep
