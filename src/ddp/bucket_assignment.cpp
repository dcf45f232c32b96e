#include "lockstep/ddp/bucket_assignment.hpp"
#include "ddp/parameter_order.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <utility>

#include "lockstep/core/error.hpp"

namespace lockstep::ddp {

BucketAssignment assign_buckets(const std::vector<at::Tensor>& parameters, const std::vector<std::size_t>& order,
                                std::int64_t first_cap_bytes, std::int64_t cap_bytes) {
  LOCKSTEP_CHECK(order.size() == parameters.size(), "assign_buckets: the order names ", order.size(),
                 " parameters, but there are ", parameters.size());
  LOCKSTEP_CHECK(first_cap_bytes >= 0 && cap_bytes >= 0, "assign_buckets: bucket caps must not be negative (got ",
                 first_cap_bytes, " and ", cap_bytes, " bytes)");
  std::vector<std::size_t> position(parameters.size(), parameters.size());
  for (std::size_t k = 0; k < order.size(); ++k) {
    LOCKSTEP_CHECK(order[k] < parameters.size() && position[order[k]] == parameters.size(),
                   "assign_buckets: the order is not a permutation of 0..", parameters.size() - 1, " (entry ", k,
                   " is ", order[k], ")");
    position[order[k]] = k;
  }

  struct Open {
    std::vector<std::size_t> members;
    std::int64_t bytes = 0;
    bool first = true;  // still the first bucket of its dtype and device
  };
  // Keyed by text so that the grouping does not depend on enum values or pointer order.
  std::map<std::string, Open> open;
  BucketAssignment buckets;
  for (std::size_t index : order) {
    const at::Tensor& p = parameters[index];
    const std::string key = std::string(c10::toString(p.scalar_type())) + "@" + p.device().str();
    Open& bucket = open[key];
    bucket.members.push_back(index);
    bucket.bytes += static_cast<std::int64_t>(p.numel()) * static_cast<std::int64_t>(p.element_size());
    const std::int64_t cap = bucket.first ? first_cap_bytes : cap_bytes;
    if (bucket.bytes >= cap) {
      buckets.push_back(std::move(bucket.members));
      bucket.members.clear();
      bucket.bytes = 0;
      bucket.first = false;
    }
  }
  for (auto& [key, bucket] : open) {
    if (!bucket.members.empty()) buckets.push_back(std::move(bucket.members));
  }
  std::sort(buckets.begin(), buckets.end(),
            [&](const auto& a, const auto& b) { return position[a.front()] < position[b.front()]; });
  return buckets;
}

std::vector<std::size_t> reverse_order(std::size_t n) {
  std::vector<std::size_t> order(n);
  for (std::size_t k = 0; k < n; ++k) order[k] = n - 1 - k;
  return order;
}

std::int64_t cap_bytes_from_mb(double mb, const char* option) {
  // Below 2^63 bytes (8 EiB), so that the byte count is an int64.
  LOCKSTEP_CHECK(std::isfinite(mb) && mb >= 0 && mb < 8.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0, "DataParallelOptions::",
                 option, " must be a non-negative number of MiB below 2^43 (8 EiB), found ", mb);
  return static_cast<std::int64_t>(std::llround(mb * 1024.0 * 1024.0));
}

// Note [Bucket order across a resume] (reducer.cpp)
bool is_parameter_order(const std::vector<std::int64_t>& order, std::size_t n) {
  if (order.size() != n) return false;
  std::vector<char> seen(n, 0);
  for (const std::int64_t i : order) {
    if (i < 0 || static_cast<std::size_t>(i) >= n || seen[static_cast<std::size_t>(i)]) return false;
    seen[static_cast<std::size_t>(i)] = 1;
  }
  return true;
}

}  // namespace lockstep::ddp
