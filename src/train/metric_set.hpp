#pragma once
// The trainer's metrics as one block of sums (Note [Exact metrics] in trainer.cpp): each metric owns a
// slice of one float64 tensor on the training device, every batch adds to it there, and one all-reduce
// of the whole block per epoch (or evaluation) gives every metric its totals over all ranks.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lockstep/train/metrics.hpp"

namespace lockstep::train {

class MetricSet {
 public:
  MetricSet() = default;
  // The built-ins `names` (make_metric with `num_classes`), then `custom`. Metric names and keys must
  // not repeat; an error names the repeat.
  MetricSet(const std::vector<std::string>& names, const std::vector<MetricPtr>& custom, int64_t num_classes);

  const std::vector<MetricPtr>& metrics() const { return metrics_; }
  // The metrics' names in order, e.g. {"accuracy", "macro_f1"}: what a checkpoint's sums belong to.
  std::vector<std::string> names() const;
  int64_t num_sums() const { return num_sums_; }
  // Zeroed sums for one epoch or evaluation: float64 [num_sums()] on `device`.
  at::Tensor zeros(const c10::Device& device) const;
  // Adds every metric's sums for this batch to `sums`, without a host synchronisation.
  void add(const at::Tensor& output, const at::Tensor& target, at::Tensor& sums) const;
  // Every metric's values from the totals, keyed `prefix` + key.
  void put_values(const std::vector<double>& sums, const std::string& prefix,
                  std::map<std::string, double>& out) const;

 private:
  std::vector<MetricPtr> metrics_;
  int64_t num_sums_ = 0;
};

}  // namespace lockstep::train
