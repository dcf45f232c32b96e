#include "lockstep/compress/quantization.hpp"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>

#include "compress/selection.hpp"
#include "core/exception_text.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/train/early_stopping.hpp"
#include "lockstep/train/ema.hpp"
#include "train/atomic_file.hpp"
#include "train/checksum.hpp"
#include "train/epoch_steps.hpp"

namespace lockstep::compress {
namespace {

constexpr const char* kFormat = "lockstep-int8";
// Version 2 adds "ties" (tied tensors stored once); a file without ties is written as version 1, so
// that an older Lockstep still reads it, and one with ties tells an older reader its version.
constexpr int64_t kVersion = 2;

std::vector<std::pair<std::string, ActivationFakeQuant>> find_points(torch::nn::Module& model) {
  std::vector<std::pair<std::string, ActivationFakeQuant>> points;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (auto impl = std::dynamic_pointer_cast<ActivationFakeQuantImpl>(item.value())) {
      points.emplace_back(item.key(), ActivationFakeQuant(impl));
    }
  }
  return points;
}

std::string format_number(const char* format, double value) {
  char text[64];
  std::snprintf(text, sizeof text, format, value);
  return text;
}

std::string shape_of(const std::vector<int64_t>& shape) {
  std::string out;
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? "x" : "") + std::to_string(shape[i]);
  return out;
}

}  // namespace

void validate(const QuantizationOptions& o) {
  LOCKSTEP_CHECK(o.begin_step >= 0, "quantization: begin_step must be >= 0, got ", o.begin_step);
  LOCKSTEP_CHECK(o.freeze_step >= -1, "quantization: freeze_step must be >= 0, or -1 for never, got ", o.freeze_step);
  LOCKSTEP_CHECK(o.begin_epoch >= 0.0 && o.freeze_epoch >= 0.0,
                 "quantization: begin_epoch and freeze_epoch must be >= 0, got ", o.begin_epoch, " and ", o.freeze_epoch);
  // Epochs take precedence: a step given beside them would be ignored without a word.
  LOCKSTEP_CHECK(o.begin_epoch == 0.0 || o.begin_step == 0, "quantization: begin_step (", o.begin_step,
                 ") with begin_epoch (", o.begin_epoch, ", which decides): give one of them");
  LOCKSTEP_CHECK(o.freeze_epoch == 0.0 || o.freeze_step == -1, "quantization: freeze_step (", o.freeze_step,
                 ") with freeze_epoch (", o.freeze_epoch, ", which decides): give one of them");
  LOCKSTEP_CHECK(o.averaging_constant > 0.0 && o.averaging_constant <= 1.0,
                 "quantization: averaging_constant must be in (0, 1], got ", o.averaging_constant);
  if (o.freeze_epoch > 0.0) {
    LOCKSTEP_CHECK(o.freeze_epoch > o.begin_epoch, "quantization: freeze_epoch (", o.freeze_epoch,
                   ") must come after begin_epoch (", o.begin_epoch, "): the ranges are observed in between");
  } else if (o.freeze_step >= 0 && o.begin_epoch == 0.0) {
    LOCKSTEP_CHECK(o.freeze_step > o.begin_step, "quantization: freeze_step (", o.freeze_step,
                   ") must come after begin_step (", o.begin_step, "): the ranges are observed in between");
  }
}

struct QuantizationAwareTraining::Layer {
  std::string name;
  at::Tensor weight;  // the parameter
  at::Tensor master;  // the float values while the parameter holds its int8 values
};

QuantizationAwareTraining::QuantizationAwareTraining(QuantizationOptions options) : options_(std::move(options)) {
  validate(options_);
}

std::string QuantizationAwareTraining::agreement() const {
  // print_table is local; the export is collective whether or not export_path is set.
  const QuantizationOptions& o = options_;
  return nlohmann::json{{"per_channel", o.per_channel},   {"activations", o.activations},
                        {"begin_step", o.begin_step},     {"freeze_step", o.freeze_step},
                        {"begin_epoch", o.begin_epoch},   {"freeze_epoch", o.freeze_epoch},
                        {"averaging_constant", o.averaging_constant}, {"include", o.include},
                        {"exclude", o.exclude}}
      .dump();
}

std::vector<std::string> QuantizationAwareTraining::layers() const {
  std::vector<std::string> names;
  for (const auto& layer : layers_) names.push_back(layer->name);
  return names;
}

std::vector<std::string> QuantizationAwareTraining::activation_points() const {
  std::vector<std::string> names;
  for (const auto& point : points_) names.push_back(point.first);
  return names;
}

void QuantizationAwareTraining::on_setup(train::TrainerContext& ctx) {
  LOCKSTEP_CHECK(ctx.model != nullptr, "QuantizationAwareTraining: the trainer gave no model");
  if (ctx.callbacks != nullptr) {
    // ema.hpp: the average goes first. After this callback, evaluation would put the float average over
    // the int8 values, and the int8 file would hold the raw weights, which were never evaluated.
    bool after_this = false;
    for (const auto& callback : *ctx.callbacks) {
      LOCKSTEP_CHECK(!after_this || dynamic_cast<const train::ExponentialMovingAverage*>(callback.get()) == nullptr,
                     "QuantizationAwareTraining: add ExponentialMovingAverage before it. After it, evaluation "
                     "would replace the int8 weights with the float average, and the exported int8 model would "
                     "be the raw weights', which were never evaluated");
      // The int8 file is promised to be what the last evaluation measured: with the average evaluated
      // and then taken out at the end, the file would be the raw weights' and the metrics another model's.
      const auto* average = dynamic_cast<const train::ExponentialMovingAverage*>(callback.get());
      LOCKSTEP_CHECK(average == nullptr || options_.export_path.empty() || !average->options().evaluate ||
                         average->options().apply_at_end,
                     "QuantizationAwareTraining: export_path with an ExponentialMovingAverage that evaluates the "
                     "average but does not leave it in the model at the end (evaluate true, apply_at_end false): "
                     "the int8 file would hold the raw weights while the test metrics were the average's. Set "
                     "apply_at_end to true (the file is then the evaluated average) or evaluate to false");
      after_this = after_this || callback.get() == this;
      // Note [Best weights and compression] (early_stopping.hpp).
      const auto* early = dynamic_cast<const train::EarlyStopping*>(callback.get());
      LOCKSTEP_CHECK(early == nullptr || !early->options().restore_best_weights,
                     "QuantizationAwareTraining: it cannot run with EarlyStopping's restore_best_weights. The best "
                     "epoch can come before quantization began, and putting its weights back at the end would "
                     "undo it: the int8 file would hold weights never trained at their int8 values and points "
                     "with no range. Set restore_best_weights to false (EarlyStopping still stops the run)");
    }
  }
  restore_weights();  // a fit() that threw mid-step left the int8 values in place
  // Note [A second fit after quantization]
  // ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
  // A fit leaves the model at its int8 values (on_train_end), and keeps the float weights they came
  // from. A second fit() with this callback (more epochs, a fine-tuning) trains on from those float
  // weights, as the first would have gone on: from the rounded ones, every weight would start up to
  // half a quantization step away, and the master copies would differ from an uninterrupted run's. A
  // layer whose weight no longer holds exactly what the fit left (the program loaded other weights, or
  // changed them) keeps what it holds.
  if (left_at_int8_) {
    torch::NoGradGuard no_grad;
    for (auto& layer : layers_) {
      if (layer->weight.sizes() == layer->master.sizes() &&
          at::equal(layer->weight, fake_quantize_weight(layer->master, options_.per_channel))) {
        layer->weight.copy_(layer->master);
      }
    }
    left_at_int8_ = false;
  }
  layers_.clear();
  for (const auto& [name, weight] :
       select_weights(*ctx.model, options_.include, options_.exclude, "QuantizationAwareTraining")) {
    // Biases and normalisation parameters stay in float (an include pattern such as "^layer1\\."
    // matches them too): the int8 kernels take them in float.
    if (weight.dim() < 2) continue;
    LOCKSTEP_CHECK(weight.numel() > 0, "QuantizationAwareTraining: '", name, "' has no elements (shape ",
                   weight.sizes(), "); exclude it");
    auto layer = std::make_shared<Layer>();
    layer->name = name;
    layer->weight = weight;
    layers_.push_back(layer);
  }
  LOCKSTEP_CHECK(!layers_.empty(), "QuantizationAwareTraining: no weights selected (include: ",
                 options_.include.size(), " patterns, exclude: ", options_.exclude.size(),
                 " patterns; parameters of fewer than 2 dimensions, biases and norms, are never quantized)");
  points_ = find_points(*ctx.model);
  if (options_.activations) {
    LOCKSTEP_CHECK(!points_.empty(), "QuantizationAwareTraining: activations is true but the model has no "
                   "ActivationFakeQuant modules; place them where the int8 model requantizes (for ResNet-18: "
                   "model.quantize_activations), or set activations to false for weight-only quantization");
  } else {
    points_.clear();  // they stay the identity
  }
  // Note [Quantization in checkpoints]: known before a checkpoint's state is checked (in a trainer's
  // fit; a loop of one's own that calls on_setup without the steps per epoch gets them at on_train_begin).
  if (ctx.steps_per_epoch > 0 || (options_.begin_epoch <= 0.0 && options_.freeze_epoch <= 0.0)) resolve_steps(ctx);
}

void QuantizationAwareTraining::resolve_steps(const train::TrainerContext& ctx) {
  begin_step_ = options_.begin_epoch > 0.0
                    ? train::steps_of_epochs(options_.begin_epoch, ctx.steps_per_epoch, "quantization begin_epoch")
                    : options_.begin_step;
  freeze_step_ = options_.freeze_epoch > 0.0
                     ? train::steps_of_epochs(options_.freeze_epoch, ctx.steps_per_epoch, "quantization freeze_epoch")
                     : options_.freeze_step;
  LOCKSTEP_CHECK(freeze_step_ < 0 || freeze_step_ > begin_step_, "QuantizationAwareTraining: the ranges would freeze at "
                 "step ", freeze_step_, ", not after quantization begins at step ", begin_step_,
                 " (", ctx.steps_per_epoch, " steps per epoch)");
}

// Note [Quantization in checkpoints]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The ranges (the points' buffers) and the weights travel with the model; what they mean depends on
// settings that live only in the options: whether scales are per channel, whether activations are
// quantized, how fast the ranges move, and at which steps quantization began and the ranges froze. A
// run resumed under other settings would go on from weights and ranges trained under the first, and
// export a model that no single configuration trained; so the checkpoint holds them (the steps as
// resolved from epochs, which the steps per epoch decide), and load_state refuses a difference before
// anything is loaded, as pruning refuses another schedule. The steps are resolved in on_setup for that,
// which runs before the Checkpointer's on_train_begin loads the file. A checkpoint without this state
// (a dense run's, or one written before it was kept) is taken as it was.

std::string QuantizationAwareTraining::save_state() const {
  return nlohmann::json{{"per_channel", options_.per_channel},
                        {"activations", options_.activations},
                        {"averaging_constant", options_.averaging_constant},
                        {"begin_step", begin_step_},
                        {"freeze_step", freeze_step_},
                        {"layers", layers()},
                        {"points", activation_points()}}
      .dump();
}

void QuantizationAwareTraining::load_state(const std::string& text) {
  nlohmann::json saved;
  try {
    saved = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    LOCKSTEP_FAIL("QuantizationAwareTraining: the checkpoint's quantization state is not valid: ", e.what());
  }
  const nlohmann::json here = nlohmann::json::parse(save_state());
  for (const auto& [key, value] : here.items()) {
    LOCKSTEP_CHECK(saved.contains(key), "QuantizationAwareTraining: the checkpoint's quantization state has no '", key,
                   "': it is not one this callback wrote");
    if (saved.at(key) == value) continue;
    const bool list = value.is_array();
    LOCKSTEP_FAIL("QuantizationAwareTraining: the checkpoint was trained with ", key, " ",
                  list ? std::to_string(saved.at(key).size()) + " entries" : saved.at(key).dump(),
                  ", this run has ", list ? std::to_string(value.size()) + " entries" : value.dump(),
                  key == "begin_step" || key == "freeze_step"
                      ? " (resolved from begin_epoch / freeze_epoch and the steps per epoch)"
                      : "",
                  "; resume with the quantization settings (and the data and batch size) it was written with, or "
                  "start a new run from its weights with trainer.init_from");
  }
}

void QuantizationAwareTraining::on_train_begin(train::TrainerContext& ctx) {
  resolve_steps(ctx);
  // The Checkpointer (first in event order) may have restored the ranges just now.
  for (auto& point : points_) point.second->sync_from_buffers();
  // The state of the last step taken: a run resumed at an epoch's end evaluates that epoch next, as
  // the run that never stopped did after that step (each step's own state is set in on_batch_begin).
  set_step_state(ctx.global_step - 1);
}

void QuantizationAwareTraining::set_step_state(int64_t step) {
  active_ = step >= begin_step_;
  frozen_ = freeze_step_ >= 0 && step >= freeze_step_;
  for (auto& point : points_) {
    point.second->set_enabled(active_);
    point.second->set_observing(active_ && !frozen_);
  }
}

// Note [Weights in place]: the parameter's storage holds the int8 values from before the forward pass
// to after backward, so autograd differentiates at the int8 values and accumulates into the same leaf
// (the straight-through estimator, exact here since symmetric scales clip nothing).
void QuantizationAwareTraining::quantize_weights() {
  if (weights_quantized_) return;
  torch::NoGradGuard no_grad;
  for (auto& layer : layers_) {
    if (!layer->master.defined()) layer->master = torch::empty_like(layer->weight);
    layer->master.copy_(layer->weight);
    layer->weight.copy_(fake_quantize_weight(layer->master, options_.per_channel));
  }
  weights_quantized_ = true;
}

void QuantizationAwareTraining::restore_weights() {
  if (!weights_quantized_) return;
  torch::NoGradGuard no_grad;
  for (auto& layer : layers_) layer->weight.copy_(layer->master);
  weights_quantized_ = false;
}

void QuantizationAwareTraining::on_batch_begin(train::TrainerContext& ctx) {
  set_step_state(ctx.global_step);
  if (active_) quantize_weights();
}

void QuantizationAwareTraining::on_after_backward(train::TrainerContext& ctx) {
  restore_weights();
  if (!active_ || frozen_ || points_.empty()) return;
  if (ctx.step_skipped) {
    // Note [Activation ranges]: a step the fp16 scaler skips had inf/nan gradients, often from
    // activations that overflowed; its batch ranges are dropped with it (the flag is the same on
    // every rank, so no rank enters the all-reduce alone).
    for (auto& point : points_) point.second->take_batch_range();
    return;
  }
  reduce_ranges(*ctx.communicator);
}

// Note [Activation ranges]: one all-reduce (MAX) over [-min_1..-min_P, max_1..max_P] gives the global
// batch's range at every point on every rank; each rank then folds it into the moving average with the
// same float operations, so the ranges are bitwise equal everywhere without a broadcast.
void QuantizationAwareTraining::reduce_ranges(comm::Communicator& comm) {
  const size_t n = points_.size();
  std::vector<at::Tensor> parts(2 * n);
  for (size_t i = 0; i < n; ++i) {
    auto [lo, hi] = points_[i].second->take_batch_range();
    parts[i] = lo.neg();
    parts[n + i] = hi;
  }
  // A NaN (a rank whose batch overflowed) goes in as +inf: what MAX does with +inf is the same on
  // every backend and rank, where a NaN's fate is the backend's (MPI_MAX keeps it or drops it by
  // argument order). Every rank then sees the +inf and leaves the point's range as it was.
  at::Tensor packed = torch::stack(parts);
  packed.masked_fill_(packed.isnan(), std::numeric_limits<double>::infinity());
  comm::AllreduceOptions max;
  max.op = comm::ReduceOp::Max;
  comm.allreduce(packed, max)->wait();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor lo = packed[static_cast<int64_t>(i)].neg();
    const at::Tensor hi = packed[static_cast<int64_t>(n + i)];
    // A point not reached this step (+inf, -inf) or one that saw an inf or nan is left as it was: one
    // inf in the moving average would make its scale inf and every later output nan.
    const at::Tensor seen = lo.le(hi).logical_and_(lo.isfinite()).logical_and_(hi.isfinite());
    points_[i].second->update_range(lo, hi, seen, options_.averaging_constant);
  }
  // A point learns that it has a range once: one read from the device, then never again.
  for (auto& point : points_) {
    if (!point.second->has_range()) point.second->sync_from_buffers();
  }
}

void QuantizationAwareTraining::on_evaluation_begin(train::TrainerContext& ctx) {
  if (active_) quantize_weights();
}

void QuantizationAwareTraining::on_evaluation_end(train::TrainerContext& ctx) { restore_weights(); }

// Every rank's ranges (min, max, updates of every point) gathered and compared with rank 0's: the same
// table on every rank, so every rank raises the same error.
void QuantizationAwareTraining::verify_ranges(comm::Communicator& comm) const {
  if (comm.size() == 1 || points_.empty()) return;
  const auto n = static_cast<int64_t>(points_.size());
  at::Tensor mine = torch::empty({3 * n}, torch::kFloat64);
  for (int64_t i = 0; i < n; ++i) {
    const auto& point = points_[static_cast<size_t>(i)].second;
    mine[3 * i] = point->min_val.item<double>();
    mine[3 * i + 1] = point->max_val.item<double>();
    mine[3 * i + 2] = static_cast<double>(point->updates.item<int64_t>());
  }
  at::Tensor all = torch::empty({comm.size() * 3 * n}, torch::kFloat64);
  comm.allgather(mine, all)->wait();
  all = all.view({comm.size(), 3 * n});
  for (int r = 1; r < comm.size(); ++r) {
    for (int64_t i = 0; i < n; ++i) {
      if (!torch::equal(all[r].narrow(0, 3 * i, 3), all[0].narrow(0, 3 * i, 3))) {
        LOCKSTEP_FAIL("QuantizationAwareTraining: the activation range of '", points_[static_cast<size_t>(i)].first,
                      "' differs between rank 0 ([", all[0][3 * i].item<double>(), ", ", all[0][3 * i + 1].item<double>(),
                      "] after ", all[0][3 * i + 2].item<double>(), " updates) and rank ", r, " ([",
                      all[r][3 * i].item<double>(), ", ", all[r][3 * i + 1].item<double>(), "] after ",
                      all[r][3 * i + 2].item<double>(), " updates)");
      }
    }
  }
}

std::vector<LayerQuantization> QuantizationAwareTraining::report() const {
  std::vector<LayerQuantization> out;
  for (const auto& layer : layers_) {
    const at::Tensor w = weights_quantized_ ? layer->master : layer->weight.detach();
    const at::Tensor scale = weight_scale(w, options_.per_channel);
    LayerQuantization row;
    row.name = layer->name;
    row.shape = w.sizes().vec();
    row.min_scale = scale.min().item<double>();
    row.max_scale = scale.max().item<double>();
    row.sqnr_db = sqnr_db(w, fake_quantize_weight(w, options_.per_channel));
    out.push_back(row);
  }
  return out;
}

std::vector<ActivationRange> QuantizationAwareTraining::ranges() const {
  std::vector<ActivationRange> out;
  for (const auto& [name, point] : points_) {
    const ActivationQParams q = point->qparams();
    ActivationRange row;
    row.name = name;
    row.min = point->min_val.item<double>();
    row.max = point->max_val.item<double>();
    row.scale = q.scale.item<double>();
    row.zero_point = q.zero_point.item<int64_t>();
    row.updates = point->updates.item<int64_t>();
    out.push_back(row);
  }
  return out;
}

void QuantizationAwareTraining::on_epoch_end(train::TrainerContext& ctx) {
  verify_ranges(*ctx.communicator);
  // The mean over the layers whose int8 values differ from the weights: one layer held exactly (all
  // zero after pruning, or weights already on the int8 grid) has an infinite SQNR, which would make the
  // mean infinite (null in metrics.jsonl) and hide every other layer's. Infinite when all are exact;
  // NaN when a layer's weights are (they count, so that the metric shows it).
  double sqnr_sum = 0.0;
  std::size_t finite = 0;
  const std::vector<LayerQuantization> layers = report();
  for (const auto& layer : layers) {
    if (std::isinf(layer.sqnr_db) && layer.sqnr_db > 0) continue;  // exact; a NaN (diverged weights) stays in
    sqnr_sum += layer.sqnr_db;
    ++finite;
  }
  ctx.metrics["quant_active"] = active_ ? 1.0 : 0.0;
  ctx.metrics["quant_weight_sqnr_db"] = layers.empty() ? 0.0
                                        : finite == 0  ? std::numeric_limits<double>::infinity()
                                                       : sqnr_sum / static_cast<double>(finite);
}

void QuantizationAwareTraining::on_train_end(train::TrainerContext& ctx) {
  restore_weights();  // the float weights, should anything have left the int8 values in place
  const bool main_rank = ctx.world.rank == 0;
  if (main_rank && options_.print_table) {
    std::printf("quantization: %zu weights int8 (%s), %zu activation points uint8%s\n%s", layers_.size(),
                options_.per_channel ? "per channel" : "per tensor", points_.size(),
                active_ ? "" : " (training ended before quantization began)",
                format_quantization_table(report(), ranges()).c_str());
    std::fflush(stdout);
  }
  if (main_rank && !options_.export_path.empty() && !active_) {
    // The file would hold weights never trained at their int8 values and activation points with no
    // range, and the model in memory stays in float: nothing that file would compute was evaluated.
    std::fprintf(stderr,
                 "lockstep: warning: quantization: no int8 model written to %s: training ended at step %lld, before "
                 "quantization began at step %lld\n",
                 options_.export_path.c_str(), static_cast<long long>(ctx.global_step),
                 static_cast<long long>(begin_step_));
    std::fflush(stderr);
  }
  if (active_) {  // collective whether or not a path is set (one set on rank 0 alone stays in step)
    train::run_on_rank0(
        ctx,
        [&] {
          if (options_.export_path.empty()) return;
          // Weight-only: the points stayed the identity, whatever ranges a resumed run's buffers hold.
          const Int8ExportReport r =
              export_int8(*ctx.model, layers(), options_.per_channel, options_.export_path, options_.activations);
          std::printf("quantization: int8 model written to %s (%.2f MB; %.2f MB in float32; %lld int8 weights)\n",
                      options_.export_path.c_str(), static_cast<double>(r.bytes) / 1e6,
                      static_cast<double>(r.float_bytes) / 1e6, static_cast<long long>(r.quantized_weights));
          std::fflush(stdout);
        },
        "quantization: could not export the int8 model");
  }
  // Leave the model as the int8 model computes: the weights at their int8 values (from the float
  // weights, so bitwise what export_int8 wrote and the last evaluation used).
  if (active_) {
    torch::NoGradGuard no_grad;
    for (auto& layer : layers_) {
      if (!layer->master.defined()) layer->master = torch::empty_like(layer->weight);
      layer->master.copy_(layer->weight);  // Note [A second fit after quantization]
      layer->weight.copy_(fake_quantize_weight(layer->master, options_.per_channel));
    }
    left_at_int8_ = true;
    for (auto& point : points_) point.second->set_observing(false);
  }
}

Int8ExportReport export_int8(torch::nn::Module& model, const std::vector<std::string>& quantized, bool per_channel,
                             const std::string& path, bool with_activations) {
  LOCKSTEP_CHECK(!path.empty(), "export_int8: empty path");
  std::set<std::string> pending(quantized.begin(), quantized.end());
  c10::Dict<std::string, at::Tensor> weights, scales, tensors, activations;
  c10::Dict<std::string, std::string> ties;
  Int8ExportReport report;
  torch::NoGradGuard no_grad;
  // A tensor registered under several names (tied weights) is stored once, under the name to be
  // quantized if one is, else its first; the others become ties to it. Stored once per name, the
  // float copy of a quantized weight would overwrite its int8 values on load.
  std::map<const void*, std::string> stored_as;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    const void* impl = item.value().unsafeGetTensorImpl();
    auto it = stored_as.find(impl);
    if (it == stored_as.end()) {
      stored_as.emplace(impl, item.key());
    } else if (pending.count(item.key()) > 0 && pending.count(it->second) == 0) {
      it->second = item.key();
    }
  }
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    const std::string& owner = stored_as.at(item.value().unsafeGetTensorImpl());
    if (owner != item.key()) {
      pending.erase(item.key());  // quantized under the owner's name
      ties.insert(item.key(), owner);
      continue;
    }
    const at::Tensor value = item.value().detach();
    report.float_bytes += value.numel() * static_cast<int64_t>(value.element_size());
    if (pending.erase(item.key()) > 0) {
      const QuantizedWeight q = quantize_weight(value, per_channel);
      weights.insert(item.key(), q.codes.cpu().contiguous());
      scales.insert(item.key(), q.scale.cpu().contiguous());
      ++report.quantized_weights;
    } else {
      tensors.insert(item.key(), value.cpu().contiguous());
      ++report.float_parameters;
    }
  }
  LOCKSTEP_CHECK(pending.empty(), "export_int8: the model has no parameter '", *pending.begin(), "'");
  for (const auto& item : model.named_buffers(/*recurse=*/true)) {
    // Pruning's masks are already in the weights (their zeros are int8 zeros): the deployed model is
    // the plain architecture, as MagnitudePruning's permanent export is.
    if (!item.value().defined() || item.key().rfind("pruning_masks.", 0) == 0) continue;
    const auto [owner, first] = stored_as.emplace(item.value().unsafeGetTensorImpl(), item.key());
    if (!first) {
      ties.insert(item.key(), owner->second);
      continue;
    }
    const at::Tensor value = item.value().detach();
    report.float_bytes += value.numel() * static_cast<int64_t>(value.element_size());
    tensors.insert(item.key(), value.cpu().contiguous());
    ++report.float_parameters;
  }
  const std::vector<std::pair<std::string, ActivationFakeQuant>> points =
      with_activations ? find_points(model) : std::vector<std::pair<std::string, ActivationFakeQuant>>{};
  for (const auto& [name, point] : points) {
    const ActivationQParams q = point->qparams();
    activations.insert(name, torch::stack({q.scale.reshape({}).to(torch::kFloat64),
                                           q.zero_point.reshape({}).to(torch::kFloat64),
                                           point->min_val.to(torch::kFloat64), point->max_val.to(torch::kFloat64)})
                                 .cpu());
  }
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert("format", std::string(kFormat));
  root.insert("version", ties.empty() ? int64_t{1} : kVersion);
  root.insert("per_channel", per_channel);
  root.insert("weights", weights);
  root.insert("scales", scales);
  root.insert("tensors", tensors);
  root.insert("activations", activations);
  root.insert("ties", ties);
  root.insert(train::kChecksumKey, std::string(train::kChecksumValue));  // Note [Checksummed files]
  const std::vector<char> bytes = torch::pickle_save(root);
  train::write_file_atomically(path, [&](const std::string& temporary) {
    train::ChecksumWriter out(temporary);
    out.write(bytes.data(), bytes.size());
    out.finish();
  });
  report.bytes = static_cast<int64_t>(bytes.size() + train::kTrailerSize);
  return report;
}

namespace {

// The entries of an unpickled int8 file, checked: the quantization parameters an export writes (scales
// finite and > 0, weight codes in [-127, 127], activation zero points in [0, 255]); the kernels would
// otherwise compute with them silently (Int8ResNet18 took a zero folded scale for 1).
Int8Model int8_model_of(const c10::impl::GenericDict& root, const std::string& path) {
  auto entry = [&](const char* key) -> c10::IValue {
    auto it = root.find(std::string(key));
    LOCKSTEP_CHECK(it != root.end(), "read_int8: '", path, "' is not a Lockstep int8 model file (no '", key, "')");
    return it->value();
  };
  LOCKSTEP_CHECK(entry("format").isString() && entry("format").toStringRef() == kFormat, "read_int8: '", path,
                 "' is not a Lockstep int8 model file");
  LOCKSTEP_CHECK(entry("version").toInt() >= 1 && entry("version").toInt() <= kVersion, "read_int8: '", path,
                 "' has format version ", entry("version").toInt(), "; this Lockstep reads versions 1 to ", kVersion);
  const auto positive_scales = [&](const at::Tensor& scale, const std::string& what) {
    LOCKSTEP_CHECK(scale.numel() > 0 && scale.isfinite().all().item<bool>() && scale.gt(0).all().item<bool>(),
                   "read_int8: '", path, "': the scale of ", what, " must be finite and > 0, found ",
                   scale.numel() == 1 ? std::to_string(scale.item<double>()) : "one that is not");
  };
  Int8Model model;
  model.per_channel = entry("per_channel").toBool();
  const c10::impl::GenericDict scales = entry("scales").toGenericDict();
  for (const auto& item : entry("weights").toGenericDict()) {
    const std::string& name = item.key().toStringRef();
    auto scale = scales.find(name);
    LOCKSTEP_CHECK(scale != scales.end(), "read_int8: '", path, "' has int8 codes but no scale for '", name, "'");
    QuantizedWeight q{item.value().toTensor(), scale->value().toTensor()};
    try {
      dequantize_weight(q.codes, q.scale);  // checks the codes' type and the scales' shape
    } catch (const Error& e) {
      LOCKSTEP_FAIL("read_int8: '", path, "': '", name, "': ", e.message());
    }
    positive_scales(q.scale, "'" + name + "'");
    LOCKSTEP_CHECK(q.codes.numel() == 0 || q.codes.min().item<int>() >= -127, "read_int8: '", path, "': '", name,
                   "' holds the code -128, outside the symmetric range [-127, 127] an export writes");
    model.weights[name] = q;
  }
  for (const auto& item : entry("tensors").toGenericDict()) model.tensors[item.key().toStringRef()] = item.value().toTensor();
  // Files of models without tied tensors, and those written before ties were, have none.
  if (auto ties = root.find(std::string("ties")); ties != root.end()) {
    for (const auto& item : ties->value().toGenericDict()) {
      const std::string& name = item.key().toStringRef();
      const std::string& owner = item.value().toStringRef();
      LOCKSTEP_CHECK(model.weights.count(owner) + model.tensors.count(owner) == 1 &&
                         model.weights.count(name) + model.tensors.count(name) == 0,
                     "read_int8: '", path, "' ties '", name, "' to '", owner, "', which it does not hold");
      model.ties[name] = owner;
    }
  }
  for (const auto& item : entry("activations").toGenericDict()) {
    const std::string& name = item.key().toStringRef();
    const at::Tensor t = item.value().toTensor();
    LOCKSTEP_CHECK(t.numel() == 4, "read_int8: '", path, "': activation '", name,
                   "' needs [scale, zero point, min, max], has ", t.numel(), " numbers");
    ActivationQParams q;
    q.scale = t[0].to(torch::kFloat).reshape({1});
    q.zero_point = t[1].to(torch::kInt).reshape({1});
    positive_scales(q.scale, "activation '" + name + "'");
    const double zero_point = t[1].item<double>();
    LOCKSTEP_CHECK(zero_point >= 0 && zero_point <= 255 && zero_point == std::floor(zero_point), "read_int8: '",
                   path, "': the zero point of activation '", name, "' must be an integer in [0, 255], found ",
                   zero_point);
    model.activations[name] = q;
  }
  return model;
}

}  // namespace

Int8Model read_int8(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  LOCKSTEP_CHECK(in.good(), "read_int8: cannot open '", path, "'");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string what = "read_int8: '" + path + "'";
  const std::optional<std::size_t> content = train::verify_checksum(bytes.data(), bytes.size(), what);
  if (content) bytes.resize(*content);
  c10::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const std::exception& e) {
    LOCKSTEP_FAIL("read_int8: '", path, "' is not a Lockstep int8 model file (it does not unpickle: ",
                  detail::exception_text(e), ")");
  }
  LOCKSTEP_CHECK(value.isGenericDict(), "read_int8: '", path, "' is not a Lockstep int8 model file");
  train::check_trailer_present(value.toGenericDict().contains(std::string(train::kChecksumKey)), content.has_value(),
                               what);
  try {
    return int8_model_of(value.toGenericDict(), path);
  } catch (const c10::Error& e) {  // an entry of another type than an export writes
    LOCKSTEP_FAIL("read_int8: '", path, "' is not a valid Lockstep int8 model file: ", e.what_without_backtrace());
  }
}

void load_int8(torch::nn::Module& model, const std::string& path) {
  const Int8Model file = read_int8(path);
  std::map<std::string, at::Tensor> values = file.tensors;
  for (const auto& [name, q] : file.weights) values[name] = dequantize_weight(q.codes, q.scale);
  for (const auto& [name, owner] : file.ties) values[name] = values.at(owner);  // read_int8 checked the owner

  torch::NoGradGuard no_grad;
  auto assign = [&](const std::string& name, at::Tensor target) {
    auto it = values.find(name);
    LOCKSTEP_CHECK(it != values.end(), "load_int8: '", path, "' has no entry for the model's '", name,
                   "' (a file of another model?)");
    LOCKSTEP_CHECK(it->second.sizes() == target.sizes(), "load_int8: '", name, "' has shape ", it->second.sizes(),
                   " in '", path, "' but ", target.sizes(), " in the model");
    target.copy_(it->second);
    values.erase(it);
  };
  for (const auto& item : model.named_parameters(/*recurse=*/true)) assign(item.key(), item.value());
  for (const auto& item : model.named_buffers(/*recurse=*/true)) {
    if (item.value().defined()) assign(item.key(), item.value());
  }
  LOCKSTEP_CHECK(values.empty(), "load_int8: '", path, "' has '", values.begin()->first,
                 "', which the model does not (a file of another model?)");
  // The points the file lists quantize; a weight-only file lists none, and its model's points stay the
  // identity, as in the training that wrote it (their buffers may hold an earlier run's ranges).
  for (auto& [name, point] : find_points(model)) {
    point->sync_from_buffers();
    point->set_observing(false);
    point->set_enabled(file.activations.count(name) > 0);
  }
}

std::string format_quantization_table(const std::vector<LayerQuantization>& layers,
                                      const std::vector<ActivationRange>& ranges) {
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof line, "%-30s %-14s %-23s %9s\n", "weight", "shape", "scale (min..max)", "SQNR dB");
  out << line;
  for (const auto& l : layers) {
    std::snprintf(line, sizeof line, "%-30s %-14s %-23s %9s\n", l.name.c_str(), shape_of(l.shape).c_str(),
                  (format_number("%.3g", l.min_scale) + ".." + format_number("%.3g", l.max_scale)).c_str(),
                  format_number("%.2f", l.sqnr_db).c_str());
    out << line;
  }
  if (!ranges.empty()) {
    std::snprintf(line, sizeof line, "%-30s %10s %10s %11s %5s %8s\n", "activation", "min", "max", "scale", "zp",
                  "updates");
    out << line;
    for (const auto& r : ranges) {
      std::snprintf(line, sizeof line, "%-30s %10.4g %10.4g %11.4g %5lld %8lld\n", r.name.c_str(), r.min, r.max,
                    r.scale, static_cast<long long>(r.zero_point), static_cast<long long>(r.updates));
      out << line;
    }
  }
  return out.str();
}

}  // namespace lockstep::compress
