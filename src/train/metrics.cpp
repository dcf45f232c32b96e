#include "lockstep/train/metrics.hpp"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <regex>
#include <sstream>

#include "lockstep/core/error.hpp"
#include "train/tensor_text.hpp"

namespace lockstep::train {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

using detail::shape_of;

bool is_integer(const at::Tensor& t) {
  return at::isIntegralType(t.scalar_type(), /*includeBool=*/false);
}

// Scores [B, C, d1, ...] against class indices [B, d1, ...].
void check_class_scores(const std::string& metric, const at::Tensor& output, const at::Tensor& target) {
  bool ok = output.dim() >= 2 && target.dim() == output.dim() - 1 && is_integer(target);
  for (int64_t d = 0; ok && d < target.dim(); ++d) ok = target.size(d) == output.size(d == 0 ? 0 : d + 1);
  LOCKSTEP_CHECK(ok, "metric ", metric, ": expected an output of class scores [B, C, ...] and integer class indices "
                     "[B, ...] as the target; found output ", shape_of(output), " and target ", shape_of(target),
                 " (for regression use the metrics mse, rmse or mae)");
}

void check_same_shape(const std::string& metric, const at::Tensor& output, const at::Tensor& target) {
  LOCKSTEP_CHECK(output.sizes() == target.sizes() && !at::isComplexType(output.scalar_type()),
                 "metric ", metric, ": expected an output and a target of the same shape; found output ",
                 shape_of(output), " and target ", shape_of(target));
}

// [numerator, count] as float64 on the numerator's device, without a host synchronisation.
at::Tensor pair(const at::Tensor& numerator, int64_t count) {
  const at::Tensor top = numerator.to(at::kDouble);
  return at::stack({top, at::full({}, static_cast<double>(count), top.options())});
}
at::Tensor pair(const at::Tensor& numerator, const at::Tensor& count) {
  return at::stack({numerator.to(at::kDouble), count.to(at::kDouble)});
}

double ratio(const std::vector<double>& sums) { return sums[1] > 0 ? sums[0] / sums[1] : kNaN; }

class TopKAccuracy final : public Metric {
 public:
  explicit TopKAccuracy(int64_t k) : k_(k) {}
  std::string name() const override { return k_ == 1 ? "accuracy" : "top" + std::to_string(k_) + "_accuracy"; }
  std::vector<std::string> keys() const override { return {k_ == 1 ? "acc" : "top" + std::to_string(k_) + "_acc"}; }
  int64_t num_sums() const override { return 2; }
  at::Tensor batch_sums(const at::Tensor& output, const at::Tensor& target) const override {
    check_class_scores(name(), output, target);
    // Targets outside [0, C) (an ignore label such as -100 or 255) are left out, as macro_f1 and
    // mean_iou leave them out: counted, they would read as misses. Counted on the device (no sync).
    const at::Tensor valid = target.ge(0).logical_and(target.lt(output.size(1)));
    const at::Tensor count = valid.sum();
    if (k_ == 1) return pair(output.argmax(1).eq(target).logical_and(valid).sum(), count);
    LOCKSTEP_CHECK(output.size(1) >= k_, "metric ", name(), ": the output has ", output.size(1),
                   " class scores per sample, fewer than ", k_);
    const at::Tensor top = std::get<1>(output.topk(k_, 1));  // [B, k, ...]
    return pair(top.eq(target.unsqueeze(1)).any(1).logical_and(valid).sum(), count);
  }
  std::vector<double> values(const std::vector<double>& sums) const override { return {ratio(sums)}; }
  bool higher_is_better() const override { return true; }

 private:
  int64_t k_;
};

class BinaryAccuracy final : public Metric {
 public:
  std::string name() const override { return "binary_accuracy"; }
  std::vector<std::string> keys() const override { return {"binary_acc"}; }
  int64_t num_sums() const override { return 2; }
  at::Tensor batch_sums(const at::Tensor& output, const at::Tensor& target) const override {
    check_same_shape(name(), output, target);
    return pair(output.gt(0).eq(target.ge(0.5)).sum(), target.numel());
  }
  std::vector<double> values(const std::vector<double>& sums) const override { return {ratio(sums)}; }
  bool higher_is_better() const override { return true; }
};

// mse, rmse and mae: [sum of squared (or absolute) errors, elements], in float64.
class ErrorMetric final : public Metric {
 public:
  explicit ErrorMetric(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  std::vector<std::string> keys() const override { return {name_}; }
  int64_t num_sums() const override { return 2; }
  at::Tensor batch_sums(const at::Tensor& output, const at::Tensor& target) const override {
    check_same_shape(name_, output, target);
    const at::Tensor error = output.to(at::kDouble) - target.to(at::kDouble);
    return pair(name_ == "mae" ? error.abs().sum() : error.square().sum(), target.numel());
  }
  std::vector<double> values(const std::vector<double>& sums) const override {
    const double mean = ratio(sums);
    return {name_ == "rmse" ? std::sqrt(mean) : mean};
  }
  bool higher_is_better() const override { return false; }

 private:
  std::string name_;
};

// macro_f1 and mean_iou: a C x C confusion matrix (row: the target class, column: the prediction).
// Targets outside [0, C) (an ignore label such as -100 or 255) are left out, into one extra bin, so
// the matrix has a fixed size and is filled without a host synchronisation.
class ConfusionMetric final : public Metric {
 public:
  ConfusionMetric(std::string name, int64_t classes) : name_(std::move(name)), classes_(classes) {}
  std::string name() const override { return name_; }
  std::vector<std::string> keys() const override { return {name_}; }
  int64_t num_sums() const override { return classes_ * classes_; }
  at::Tensor batch_sums(const at::Tensor& output, const at::Tensor& target) const override {
    check_class_scores(name_, output, target);
    LOCKSTEP_CHECK(output.size(1) == classes_, "metric ", name_, ": the output has ", output.size(1),
                   " class scores per sample but the data set has ", classes_, " classes");
    const at::Tensor truth = target.reshape({-1}).to(at::kLong);
    const at::Tensor predicted = output.argmax(1).reshape({-1});
    const at::Tensor valid = truth.ge(0).logical_and(truth.lt(classes_));
    const int64_t cells = classes_ * classes_;
    const at::Tensor cell = at::where(valid, truth * classes_ + predicted, at::full({}, cells, truth.options()));
    at::Tensor counts = at::zeros({cells + 1}, output.options().dtype(at::kDouble));
    counts.index_add_(0, cell, at::ones({cell.numel()}, counts.options()));
    return counts.narrow(0, 0, cells);
  }
  std::vector<double> values(const std::vector<double>& sums) const override {
    double total = 0;
    int64_t present = 0;
    for (int64_t c = 0; c < classes_; ++c) {
      double in_row = 0, in_column = 0;
      for (int64_t o = 0; o < classes_; ++o) {
        in_row += sums[c * classes_ + o];
        in_column += sums[o * classes_ + c];
      }
      if (in_row + in_column == 0) continue;  // neither a target nor a prediction: not part of the mean
      const double hits = sums[c * classes_ + c];
      const double misses = in_row + in_column - 2 * hits;  // false negatives + false positives
      total += name_ == "macro_f1" ? 2 * hits / (2 * hits + misses) : hits / (hits + misses);
      ++present;
    }
    return {present > 0 ? total / static_cast<double>(present) : kNaN};
  }
  bool higher_is_better() const override { return true; }

 private:
  std::string name_;
  int64_t classes_;
};

const std::regex& top_k_pattern() {
  static const std::regex pattern("top([0-9]{1,6})_accuracy");
  return pattern;
}

}  // namespace

const std::vector<std::string>& metric_names() {
  static const std::vector<std::string> names = {"accuracy", "topK_accuracy", "binary_accuracy", "mse",
                                                 "rmse",     "mae",           "macro_f1",        "mean_iou"};
  return names;
}

void check_metric_name(const std::string& name) {
  std::smatch match;
  if (std::regex_match(name, match, top_k_pattern())) {
    const int64_t k = std::stoll(match[1].str());
    LOCKSTEP_CHECK(k >= 2, "metric '", name, "': K must be >= 2 in topK_accuracy (top-1 is 'accuracy')");
    return;
  }
  for (const auto& known : metric_names()) {
    if (known == name && known != "topK_accuracy") return;
  }
  std::string known;
  for (const auto& n : metric_names()) known += (known.empty() ? "" : ", ") + n;
  LOCKSTEP_FAIL("unknown metric '", name, "'; expected one of ", known,
                " (topK with a number, e.g. top5_accuracy), or a Metric of your own in TrainerOptions::custom_metrics");
}

MetricPtr make_metric(const std::string& name, int64_t num_classes) {
  check_metric_name(name);
  std::smatch match;
  if (name == "accuracy") return std::make_shared<TopKAccuracy>(1);
  if (std::regex_match(name, match, top_k_pattern())) return std::make_shared<TopKAccuracy>(std::stoll(match[1].str()));
  if (name == "binary_accuracy") return std::make_shared<BinaryAccuracy>();
  if (name == "mse" || name == "rmse" || name == "mae") return std::make_shared<ErrorMetric>(name);
  LOCKSTEP_CHECK(num_classes > 0, "metric ", name, " needs the number of classes, but the data set declares ",
                 num_classes, " (DatasetInfo::num_classes)");
  LOCKSTEP_CHECK(num_classes <= 1024, "metric ", name, ": ", num_classes,
                 " classes would make a confusion matrix too large to all-reduce every epoch (at most 1024)");
  return std::make_shared<ConfusionMetric>(name, num_classes);
}

std::vector<MetricPtr> make_metrics(const std::vector<std::string>& names, int64_t num_classes,
                                    const std::vector<MetricPtr>& custom) {
  std::vector<MetricPtr> out;
  for (const auto& name : names) out.push_back(make_metric(name, num_classes));
  for (const auto& metric : custom) {
    LOCKSTEP_CHECK(metric != nullptr, "make_metrics: a custom metric is null");
    out.push_back(metric);
  }
  return out;
}

}  // namespace lockstep::train
