#pragma once
// Metrics that DistributedTrainer computes over the training batches (train_<key>) and the evaluation
// (test_<key>), exact over ranks: a metric keeps a fixed number of sums, every batch adds to them on
// the device (no host synchronisation), the trainer all-reduces the sums once an epoch, and the values
// come from the totals (Note [Exact metrics] in src/train/trainer.cpp). So an accuracy, a mean squared
// error or a macro F1 is the one over every sample, never an average of per-rank or per-batch values.
//
// Built-ins by name (TrainerOptions::metrics, YAML trainer.metrics):
//   accuracy         key acc:        argmax over dim 1 == target; output [B, C, ...], target [B, ...]
//   topK_accuracy    key topK_acc:   target among the K largest scores (K >= 2, e.g. top5_accuracy)
//   binary_accuracy  key binary_acc: multi-label: (logit > 0) == (target >= 0.5), element by element
//   mse, rmse, mae   keys alike:     regression, over every element; output and target of one shape
//   macro_f1         key macro_f1:   F1 per class, averaged over the classes present in the targets or
//                                    predictions (a C x C confusion matrix; C from the data set)
//   mean_iou         key mean_iou:   intersection over union per class (segmentation: output
//                                    [B, C, H, W], target [B, H, W]), averaged like macro_f1
// A metric of the program's own derives from Metric (TrainerOptions::custom_metrics). For a loop of your
// own, MetricTracker (metric_tracker.hpp) keeps the sums and reduces them over ranks.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lockstep::train {

class Metric {
 public:
  virtual ~Metric() = default;

  // Unique among a trainer's metrics, e.g. "accuracy": in messages and the ranks' agreement check.
  virtual std::string name() const = 0;
  // The values' names, without the train_/test_ prefix (unique among a trainer's metrics).
  virtual std::vector<std::string> keys() const = 0;
  // How many sums the metric keeps.
  virtual int64_t num_sums() const = 0;
  // This batch's contribution: a float64 tensor [num_sums()] (on any device; the trainer adds it to
  // the epoch's sums on the training device, so the result should stay there). Called without
  // gradients, with the model's output and the batch's target (in an evaluation, only the rows that
  // count: Note [Exact evaluation]). Checks shapes and throws a lockstep::Error naming the metric.
  virtual at::Tensor batch_sums(const at::Tensor& output, const at::Tensor& target) const = 0;
  // The values, one per key, from the sums over every batch and rank. Sums of no samples give NaN.
  virtual std::vector<double> values(const std::vector<double>& sums) const = 0;
  // Whether a larger value is better (EarlyStopping's mode "auto").
  virtual bool higher_is_better() const = 0;
};

using MetricPtr = std::shared_ptr<const Metric>;

// The built-in names (topK_accuracy stands for every K), for messages.
const std::vector<std::string>& metric_names();
// Throws a lockstep::Error naming the metric when `name` is not a built-in.
void check_metric_name(const std::string& name);
// The built-in `name`; `num_classes` (the data set's) sizes macro_f1's and mean_iou's confusion
// matrix, and is checked against the scores' size at every batch.
MetricPtr make_metric(const std::string& name, int64_t num_classes);
// The built-ins `names` (make_metric), then `custom`: what a MetricTracker takes.
std::vector<MetricPtr> make_metrics(const std::vector<std::string>& names, int64_t num_classes = 0,
                                    const std::vector<MetricPtr>& custom = {});

}  // namespace lockstep::train
