#include "lockstep/train/metric_tracker.hpp"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <limits>
#include <set>

#include "lockstep/core/error.hpp"

namespace lockstep::train {

MetricTracker::MetricTracker(std::vector<MetricPtr> metrics) : metrics_(std::move(metrics)) {
  std::set<std::string> seen_names, seen_keys;
  for (const auto& metric : metrics_) {
    LOCKSTEP_CHECK(metric != nullptr, "MetricTracker: a metric is null");
    LOCKSTEP_CHECK(seen_names.insert(metric->name()).second, "the metrics name '", metric->name(),
                   "' twice (TrainerOptions::metrics and custom_metrics)");
    LOCKSTEP_CHECK(metric->num_sums() >= 0, "metric ", metric->name(), ": num_sums() is negative");
    for (const auto& key : metric->keys()) {
      LOCKSTEP_CHECK(!key.empty() && key != "loss" && key != "count", "metric ", metric->name(), ": '", key,
                     "' cannot be a metric key (the loss and the count are reported as loss and count)");
      LOCKSTEP_CHECK(seen_keys.insert(key).second, "metric ", metric->name(), ": the key '", key,
                     "' is another metric's too");
    }
    metric_sums_ += metric->num_sums();
  }
  sums_ = at::zeros({num_sums()}, at::kDouble);
}

std::vector<std::string> MetricTracker::names() const {
  std::vector<std::string> out;
  for (const auto& metric : metrics_) out.push_back(metric->name());
  return out;
}

void MetricTracker::update(const at::Tensor& output, const at::Tensor& target, const at::Tensor& loss,
                           const at::Tensor& weight) {
  LOCKSTEP_CHECK(output.defined() && target.defined() && target.dim() >= 1,
                 "MetricTracker::update: expected an output and a target with a batch dimension");
  at::NoGradGuard no_grad;
  // Note [No host sync per step]: the sums follow the batches to their device once, then stay there.
  if (sums_.device() != output.device()) sums_ = sums_.to(output.device());
  const auto samples = static_cast<double>(target.size(0));
  if (loss.defined()) {
    LOCKSTEP_CHECK(loss.numel() == 1, "MetricTracker::update: the loss must be the batch's mean, a scalar; found ",
                   loss.sizes());
    const at::Tensor value = loss.detach().reshape({1}).to(sums_.device(), at::kDouble);
    if (weight.defined()) {
      LOCKSTEP_CHECK(weight.numel() == 1, "MetricTracker::update: the loss's weight must be a scalar; found ",
                     weight.sizes());
      const at::Tensor w = weight.detach().reshape({1}).to(sums_.device(), at::kDouble);
      // A batch of weight 0 (every target ignored) adds nothing, even a NaN.
      sums_.narrow(0, kLossSum, 1).add_(at::where(w > 0, value * w, at::zeros_like(w)));
      sums_.narrow(0, kLossSamples, 1).add_(w);
      sums_.narrow(0, kSamples, 1).add_(samples);
    } else {
      sums_.narrow(0, kLossSum, 1).add_(value, samples);
      sums_.narrow(0, kLossSamples, 2).add_(samples);
    }
  } else {
    sums_.narrow(0, kSamples, 1).add_(samples);
  }
  int64_t offset = kFirstMetricSum;
  for (const auto& metric : metrics_) {
    const int64_t n = metric->num_sums();
    const at::Tensor part = metric->batch_sums(output.detach(), target);
    LOCKSTEP_CHECK(part.defined() && part.numel() == n, "metric ", metric->name(), ": batch_sums returned ",
                   part.defined() ? part.numel() : 0, " sums; num_sums() says ", n);
    sums_.narrow(0, offset, n).add_(part.reshape({n}).to(sums_.device(), at::kDouble));
    offset += n;
  }
}

std::map<std::string, double> MetricTracker::compute(comm::Communicator& comm, const std::string& prefix) const {
  at::Tensor totals = sums_.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
  comm.allreduce(totals)->wait();
  return values(std::vector<double>(totals.data_ptr<double>(), totals.data_ptr<double>() + totals.numel()), prefix);
}

std::map<std::string, double> MetricTracker::compute_local(const std::string& prefix) const {
  const at::Tensor local = sums_.to(at::kCPU).contiguous();
  return values(std::vector<double>(local.data_ptr<double>(), local.data_ptr<double>() + local.numel()), prefix);
}

void MetricTracker::reset() { sums_.zero_(); }

void MetricTracker::set_sums(const at::Tensor& sums) {
  LOCKSTEP_CHECK(sums.numel() == num_sums(), "MetricTracker::set_sums: ", sums.numel(), " sums for a tracker of ",
                 num_sums());
  sums_ = sums.reshape({num_sums()}).to(sums_.device(), at::kDouble, /*non_blocking=*/false, /*copy=*/true);
}

std::map<std::string, double> MetricTracker::values(const std::vector<double>& totals, const std::string& prefix) const {
  LOCKSTEP_CHECK(static_cast<int64_t>(totals.size()) == num_sums(), "MetricTracker::values: ", totals.size(),
                 " sums for a tracker of ", num_sums());
  std::map<std::string, double> out;
  out[prefix + "count"] = totals[kSamples];
  if (totals[kLossSamples] > 0) out[prefix + "loss"] = totals[kLossSum] / totals[kLossSamples];
  int64_t offset = kFirstMetricSum;
  for (const auto& metric : metrics_) {
    const int64_t n = metric->num_sums();
    const std::vector<double> values =
        metric->values(std::vector<double>(totals.begin() + offset, totals.begin() + offset + n));
    const std::vector<std::string> keys = metric->keys();
    LOCKSTEP_CHECK(values.size() == keys.size(), "metric ", metric->name(), ": values() returned ", values.size(),
                   " values for ", keys.size(), " keys");
    for (size_t i = 0; i < keys.size(); ++i) out[prefix + keys[i]] = values[i];
    offset += n;
  }
  return out;
}

}  // namespace lockstep::train
