#include "train/metric_set.hpp"

#include <ATen/ATen.h>

#include <set>

#include "lockstep/core/error.hpp"

namespace lockstep::train {

MetricSet::MetricSet(const std::vector<std::string>& names, const std::vector<MetricPtr>& custom,
                     int64_t num_classes) {
  for (const auto& name : names) metrics_.push_back(make_metric(name, num_classes));
  for (const auto& metric : custom) {
    LOCKSTEP_CHECK(metric != nullptr, "TrainerOptions::custom_metrics holds a null metric");
    metrics_.push_back(metric);
  }
  std::set<std::string> seen_names, seen_keys;
  for (const auto& metric : metrics_) {
    LOCKSTEP_CHECK(seen_names.insert(metric->name()).second, "the trainer's metrics name '", metric->name(),
                   "' twice (TrainerOptions::metrics and custom_metrics)");
    LOCKSTEP_CHECK(metric->num_sums() >= 0, "metric ", metric->name(), ": num_sums() is negative");
    for (const auto& key : metric->keys()) {
      LOCKSTEP_CHECK(!key.empty() && key != "loss" && key != "count",
                     "metric ", metric->name(), ": '", key, "' cannot be a metric key (the trainer reports loss and count)");
      LOCKSTEP_CHECK(seen_keys.insert(key).second, "metric ", metric->name(), ": the key '", key,
                     "' is another metric's too");
    }
    num_sums_ += metric->num_sums();
  }
}

std::vector<std::string> MetricSet::names() const {
  std::vector<std::string> out;
  for (const auto& metric : metrics_) out.push_back(metric->name());
  return out;
}

at::Tensor MetricSet::zeros(const c10::Device& device) const {
  return at::zeros({num_sums_}, at::TensorOptions().dtype(at::kDouble).device(device));
}

void MetricSet::add(const at::Tensor& output, const at::Tensor& target, at::Tensor& sums) const {
  int64_t offset = 0;
  for (const auto& metric : metrics_) {
    const int64_t n = metric->num_sums();
    const at::Tensor part = metric->batch_sums(output, target);
    LOCKSTEP_CHECK(part.defined() && part.numel() == n, "metric ", metric->name(), ": batch_sums returned ",
                   part.defined() ? part.numel() : 0, " sums; num_sums() says ", n);
    sums.narrow(0, offset, n).add_(part.reshape({n}).to(sums.device(), at::kDouble));
    offset += n;
  }
}

void MetricSet::put_values(const std::vector<double>& sums, const std::string& prefix,
                           std::map<std::string, double>& out) const {
  LOCKSTEP_CHECK(static_cast<int64_t>(sums.size()) == num_sums_, "MetricSet: ", sums.size(), " sums for ",
                 num_sums_);
  int64_t offset = 0;
  for (const auto& metric : metrics_) {
    const int64_t n = metric->num_sums();
    const std::vector<double> values =
        metric->values(std::vector<double>(sums.begin() + offset, sums.begin() + offset + n));
    const std::vector<std::string> keys = metric->keys();
    LOCKSTEP_CHECK(values.size() == keys.size(), "metric ", metric->name(), ": values() returned ", values.size(),
                   " values for ", keys.size(), " keys");
    for (size_t i = 0; i < keys.size(); ++i) out[prefix + keys[i]] = values[i];
    offset += n;
  }
}

}  // namespace lockstep::train
