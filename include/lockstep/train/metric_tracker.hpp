#pragma once
// MetricTracker: exact metrics over ranks (metrics.hpp) for a training or evaluation loop of your own,
// the same sums DistributedTrainer keeps (Note [Exact metrics] in src/train/trainer.cpp).
//
//   lockstep::train::MetricTracker tracker(lockstep::train::make_metrics({"mse", "mae"}));
//   for (auto& batch : my_batches) {
//     auto output = model->forward(batch.data);
//     auto loss = torch::mse_loss(output, batch.target);
//     ...
//     tracker.update(output, batch.target, loss);       // on the device, no host synchronisation
//   }
//   auto values = tracker.compute(*comm);               // collective: {"loss", "count", "mse", "mae"}
//   tracker.reset();
//
// Shards of any size (uneven ones under a ddp::Join too) give the values over the union of every
// rank's samples: a loss or an accuracy weighted by samples, a macro F1 from the summed confusion
// matrix, never an average of per-rank values.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/train/metrics.hpp"

namespace lockstep::train {

class MetricTracker {
 public:
  // Loss and count only.
  MetricTracker() : MetricTracker(std::vector<MetricPtr>{}) {}
  // Metric names and keys must not repeat (an error names the repeat), nor may a key be "loss" or "count".
  explicit MetricTracker(std::vector<MetricPtr> metrics);

  // Adds one batch: every metric's sums, the sample count (target.size(0)) and, when `loss` (the batch's
  // mean loss, a scalar) is given, loss x weight, where `weight` is how many samples the mean stands
  // for: target.size(0) when undefined; a scalar tensor such as loss_weight()'s otherwise (a batch of
  // weight 0 adds nothing to the loss, whatever its value). The sums move to the output's device at the
  // first update and stay there: nothing here waits for the device.
  void update(const at::Tensor& output, const at::Tensor& target, const at::Tensor& loss = at::Tensor(),
              const at::Tensor& weight = at::Tensor());
  // Collective: one all-reduce of every sum, then the values over all ranks' samples: `prefix` + "count",
  // + "loss" (when some rank gave losses), + each metric's keys. Every rank gets the same values.
  std::map<std::string, double> compute(comm::Communicator& comm, const std::string& prefix = "") const;
  // The same from this rank's sums alone (no communication).
  std::map<std::string, double> compute_local(const std::string& prefix = "") const;
  // Zeroes the sums (they stay on their device).
  void reset();

  const std::vector<MetricPtr>& metrics() const { return metrics_; }
  std::vector<std::string> names() const;

  // The sums behind the values, for checkpoints and for reductions combined with other numbers:
  // float64 [num_sums()] = (loss x weight, the weights of the losses, samples, each metric's sums).
  static constexpr int64_t kLossSum = 0, kLossSamples = 1, kSamples = 2, kFirstMetricSum = 3;
  int64_t num_sums() const { return kFirstMetricSum + metric_sums_; }
  const at::Tensor& sums() const { return sums_; }
  // Replaces the sums (num_sums() values, any device).
  void set_sums(const at::Tensor& sums);
  // The values from totals laid out as sums() (e.g. summed over ranks with other numbers).
  std::map<std::string, double> values(const std::vector<double>& totals, const std::string& prefix = "") const;

 private:
  std::vector<MetricPtr> metrics_;
  int64_t metric_sums_ = 0;
  at::Tensor sums_;
};

}  // namespace lockstep::train
