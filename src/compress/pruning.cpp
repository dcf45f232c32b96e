#include "lockstep/compress/pruning.hpp"

#include <unistd.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <sstream>

#include "lockstep/compress/quantization.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/train/early_stopping.hpp"
#include "lockstep/train/ema.hpp"
#include "lockstep/train/model_tensors.hpp"
#include "lockstep/train/trainer.hpp"
#include "compress/selection.hpp"
#include "train/atomic_file.hpp"
#include "train/checksum.hpp"
#include "train/epoch_steps.hpp"

namespace lockstep::compress {
namespace {

constexpr const char* kMasksChild = "pruning_masks";

// Buffer names may not contain dots: "layer1.0.conv1.weight" is stored as "layer1__0__conv1__weight".
// The encoding is not invertible ("block_.weight" and "block._weight" both give "block___weight"), so
// a mask is never decoded: make_pruning_permanent encodes the model's parameter names and matches,
// and on_setup refuses two selected parameters whose names encode alike.
std::string buffer_name(const std::string& parameter) {
  std::string out;
  for (char c : parameter) out += c == '.' ? std::string("__") : std::string(1, c);
  return out;
}

std::string percent(double fraction) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f%%", 100.0 * fraction);
  return text;
}

LayerSparsity measure(const std::string& name, const at::Tensor& weight) {
  LayerSparsity layer;
  layer.name = name;
  layer.shape = weight.sizes().vec();
  layer.numel = weight.numel();
  layer.nonzeros = weight.count_nonzero().item<int64_t>();
  layer.channels = weight.dim() >= 1 ? weight.size(0) : 0;
  layer.zero_channels = zero_channels(weight);
  return layer;
}

}  // namespace

PruneSchedule parse_prune_schedule(const std::string& name) {
  if (name == "one_shot") return PruneSchedule::OneShot;
  if (name == "gradual") return PruneSchedule::Gradual;
  LOCKSTEP_FAIL("unknown pruning schedule '", name, "' (expected one_shot or gradual)");
}

std::string to_string(PruneSchedule schedule) { return schedule == PruneSchedule::OneShot ? "one_shot" : "gradual"; }

void validate(const PruningOptions& o) {
  LOCKSTEP_CHECK(o.target_sparsity >= 0.0 && o.target_sparsity < 1.0,
                 "pruning: target_sparsity must be in [0, 1), got ", o.target_sparsity);
  LOCKSTEP_CHECK(o.initial_sparsity >= 0.0 && o.initial_sparsity <= o.target_sparsity,
                 "pruning: initial_sparsity must be in [0, target_sparsity = ", o.target_sparsity, "], got ",
                 o.initial_sparsity);
  LOCKSTEP_CHECK(o.begin_step >= 0, "pruning: begin_step must be >= 0, got ", o.begin_step);
  LOCKSTEP_CHECK(o.begin_epoch >= 0.0 && o.end_epoch >= 0.0, "pruning: begin_epoch and end_epoch must be >= 0, got ",
                 o.begin_epoch, " and ", o.end_epoch);
  LOCKSTEP_CHECK(o.begin_step == 0 || (o.begin_epoch == 0.0 && o.end_epoch == 0.0), "pruning: begin_step (",
                 o.begin_step, ") with a schedule in epochs (begin_epoch ", o.begin_epoch, ", end_epoch ", o.end_epoch,
                 ", which decide): epochs and steps do not mix; use begin_epoch");
  LOCKSTEP_CHECK(o.end_epoch == 0.0 || o.end_step == PruningOptions{}.end_step, "pruning: end_step (", o.end_step,
                 ") with end_epoch (", o.end_epoch, ", which decides): epochs and steps do not mix; use end_epoch");
  if (o.schedule == PruneSchedule::Gradual) {
    LOCKSTEP_CHECK(o.frequency >= 1, "pruning: frequency must be >= 1 step, got ", o.frequency);
    if (o.end_epoch > 0) {
      LOCKSTEP_CHECK(o.end_epoch > o.begin_epoch, "pruning: a gradual schedule needs end_epoch > begin_epoch, got ",
                     o.begin_epoch, " and ", o.end_epoch);
    } else {
      LOCKSTEP_CHECK(o.begin_epoch == 0.0, "pruning: a gradual schedule given begin_epoch (", o.begin_epoch,
                     ") needs end_epoch too (epochs and steps do not mix)");
      LOCKSTEP_CHECK(o.end_step > o.begin_step, "pruning: a gradual schedule needs end_step > begin_step, got ",
                     o.begin_step, " and ", o.end_step);
    }
  }
  if (o.granularity == PruneGranularity::NM) {
    LOCKSTEP_CHECK(o.m >= 2 && o.n >= 1 && o.n < o.m, "pruning: N:M needs 1 <= n < m, got ", o.n, ":", o.m);
    LOCKSTEP_CHECK(o.scope == PruneScope::Layer, "pruning: N:M holds within every group of every layer; scope must be "
                   "'layer', not 'global'");
    LOCKSTEP_CHECK(o.schedule == PruneSchedule::OneShot, "pruning: N:M has the fixed sparsity 1 - n/m; use the "
                   "one_shot schedule");
  }
}

double scheduled_sparsity(const PruningOptions& o, int64_t step) {
  if (o.granularity == PruneGranularity::NM) {
    return step < o.begin_step ? 0.0 : 1.0 - static_cast<double>(o.n) / static_cast<double>(o.m);
  }
  if (step < o.begin_step) return 0.0;
  if (o.schedule == PruneSchedule::OneShot || step >= o.end_step) return o.target_sparsity;
  const double progress = static_cast<double>(step - o.begin_step) / static_cast<double>(o.end_step - o.begin_step);
  return o.target_sparsity + (o.initial_sparsity - o.target_sparsity) * std::pow(1.0 - progress, 3);
}

bool is_pruning_step(const PruningOptions& o, int64_t step) {
  if (step < o.begin_step) return false;
  if (o.schedule == PruneSchedule::OneShot) return step == o.begin_step;
  return step <= o.end_step && ((step - o.begin_step) % o.frequency == 0 || step == o.end_step);
}

struct MagnitudePruning::Layer {
  std::string name;
  at::Tensor weight;  // the parameter
  at::Tensor mask;    // the buffer in the "pruning_masks" child (Note [Masks as state])
};

MagnitudePruning::MagnitudePruning(PruningOptions options) : options_(std::move(options)) {
  validate(options_);
  configured_ = options_;
}

std::vector<std::string> MagnitudePruning::layers() const {
  std::vector<std::string> names;
  for (const auto& layer : layers_) names.push_back(layer->name);
  return names;
}

namespace {

// Whether the schedule prunes in steps from begin_step to end_step (N:M patterns are one-shot).
bool gradual_schedule(const PruningOptions& o) {
  return o.schedule == PruneSchedule::Gradual && o.granularity != PruneGranularity::NM;
}

// The step at which the schedule reaches its target: a gradual schedule's end step, else its one
// pruning step.
int64_t final_pruning_step(const PruningOptions& o) { return gradual_schedule(o) ? o.end_step : o.begin_step; }

// The schedule in steps, for this fit (the steps per epoch may differ from fit to fit), checked
// against the run's length: a schedule that ends after the last step would stop short of its target
// while the startup line and permanent_path's model claimed it.
PruningOptions resolved_schedule(const PruningOptions& configured, const train::TrainerContext& ctx) {
  PruningOptions o = configured;
  if (o.end_epoch > 0 || o.begin_epoch > 0) {
    o.begin_step = train::steps_of_epochs(o.begin_epoch, ctx.steps_per_epoch, "pruning begin_epoch");
    if (o.end_epoch > 0) {
      o.end_step = std::max(o.begin_step + 1,
                            train::steps_of_epochs(o.end_epoch, ctx.steps_per_epoch, "pruning end_epoch"));
    }
    o.begin_epoch = o.end_epoch = 0.0;  // resolved
  }
  if (ctx.total_steps <= 0) return o;  // not in a trainer's fit, or a fit of no steps
  const int64_t last_step = ctx.total_steps - 1;
  const bool gradual = gradual_schedule(o);
  const int64_t target_step = final_pruning_step(o);
  if (target_step <= last_step) return o;
  int64_t reached_at = -1;  // the schedule's last pruning step within the run
  if (gradual && o.begin_step <= last_step) {
    reached_at = o.begin_step + (last_step - o.begin_step) / o.frequency * o.frequency;
  }
  const double epoch_setting = gradual ? configured.end_epoch : configured.begin_epoch;
  LOCKSTEP_FAIL("MagnitudePruning: the schedule reaches its target sparsity ",
                percent(scheduled_sparsity(o, target_step)), " at step ", target_step,
                epoch_setting > 0 ? detail::str_cat(" (", gradual ? "end_epoch " : "begin_epoch ", epoch_setting, ")")
                                  : std::string(),
                ", but the run's last step is ", last_step, " (", ctx.total_steps / ctx.steps_per_epoch,
                " epochs of ", ctx.steps_per_epoch, " steps), so the run would end at ",
                percent(reached_at < 0 ? 0.0 : scheduled_sparsity(o, reached_at)), ". End the schedule by step ",
                last_step, " (epoch ", static_cast<double>(last_step) / static_cast<double>(ctx.steps_per_epoch),
                "), or train longer.");
}

// skipped()'s reason for a Linear weight under structured pruning with an empty include.
constexpr const char* kLinearSkipped =
    "structured pruning would remove a Linear's output rows (a classifier's classes); it takes Linear layers "
    "only where include names them";
// skipped()'s reason for a ConvTranspose weight under structured pruning.
constexpr const char* kTransposedSkipped =
    "a ConvTranspose weight is stored (in, out / groups, ...): structured pruning removes dimension 0, which would "
    "be its input channels, not its output channels";
// skipped()'s reason for a parameter of fewer than 2 dimensions under unstructured or N:M pruning.
constexpr const char* kFlatSkipped =
    "pruning takes weights of 2 or more dimensions (biases and normalisation parameters stay dense)";

// The schedule, resolved into steps: a resumed run must follow the one its masks were made by.
// A one-shot schedule has no end step, frequency or initial sparsity: they are left out, so that their
// unused values are not compared (files that hold them still load: only this run's keys are compared).
nlohmann::json schedule_state(const PruningOptions& o) {
  nlohmann::json state = {
      {"begin_step", o.begin_step}, {"schedule", to_string(o.schedule)}, {"target_sparsity", o.target_sparsity}};
  if (o.schedule == PruneSchedule::Gradual) {
    state["end_step"] = o.end_step;
    state["frequency"] = o.frequency;
    state["initial_sparsity"] = o.initial_sparsity;
  }
  return state;
}

// "steps 0..1000 every 100" (gradual) or "step 300" (one-shot), for messages: of a saved state (whose
// keys depend on its schedule and version), or of schedule_state(options).
std::string describe_steps(const nlohmann::json& state) {
  const auto at = [&state](const char* key) { return state.contains(key) ? state.at(key).dump() : std::string("?"); };
  if (state.contains("schedule") && state.at("schedule") == to_string(PruneSchedule::OneShot)) {
    return "step " + at("begin_step");
  }
  return "steps " + at("begin_step") + ".." + at("end_step") + (state.contains("frequency") ? " every " + at("frequency") : "");
}

}  // namespace

void MagnitudePruning::on_setup(train::TrainerContext& ctx) {
  LOCKSTEP_CHECK(ctx.model != nullptr, "MagnitudePruning: the trainer gave no model");
  const train::EarlyStopping* restoring = nullptr;  // one that puts the best epoch's weights back
  if (ctx.callbacks != nullptr) {
    bool before_this = true;
    for (const auto& callback : *ctx.callbacks) {
      before_this = before_this && callback.get() != this;
      LOCKSTEP_CHECK(!before_this || dynamic_cast<const QuantizationAwareTraining*>(callback.get()) == nullptr,
                     "MagnitudePruning: add it before QuantizationAwareTraining. After it, the masks would rank "
                     "the weights' int8 values, in which the small weights tie at 0 and are pruned by position, "
                     "not by magnitude");
      // Note [EMA and pruning] (config.cpp), for programs that add both callbacks themselves.
      LOCKSTEP_CHECK(dynamic_cast<const train::ExponentialMovingAverage*>(callback.get()) == nullptr,
                     "MagnitudePruning: it cannot run with ExponentialMovingAverage. The average would let the "
                     "pruned weights decay instead of staying zero: the evaluated model, and the one left at the "
                     "end, would not be sparse");
      const auto* early = dynamic_cast<const train::EarlyStopping*>(callback.get());
      if (early != nullptr && early->options().restore_best_weights) restoring = early;
    }
  }
  options_ = resolved_schedule(configured_, ctx);
  // Note [Best weights and compression] (early_stopping.hpp): EarlyStopping's best weights are taken at
  // an epoch's evaluation and put back at the end, masks included. Where the schedule's last pruning
  // step comes after the first epoch's evaluation, the best epoch can be one before it, and the model
  // would end less sparse than the target that the startup line and permanent_path promise.
  const int64_t final_step = final_pruning_step(options_);
  LOCKSTEP_CHECK(restoring == nullptr || final_step < ctx.steps_per_epoch,
                 "MagnitudePruning: it cannot run with EarlyStopping's restore_best_weights when its schedule "
                 "prunes after the first epoch (last pruning step ", final_step, ", ", ctx.steps_per_epoch,
                 " steps per epoch): the best epoch can be one before that step, and putting its weights and "
                 "masks back at the end would leave the model less sparse than the target. Set "
                 "restore_best_weights to false (EarlyStopping still stops the run), or prune within the first "
                 "epoch (a model trained before, given by trainer.init_from)");
  torch::nn::Module& model = *ctx.model;
  std::shared_ptr<torch::nn::Module> existing;
  for (const auto& child : model.named_children()) {
    if (child.key() == kMasksChild) existing = child.value();
  }
  // This callback's own masks from an earlier fit() of the same model stay in force (and are kept),
  // if they still fit the weights this fit selects.
  const bool again = existing != nullptr && existing == masks_ && model_ == &model;
  LOCKSTEP_CHECK(existing == nullptr || again, "MagnitudePruning: the model already has a '", kMasksChild,
                 "' child (two pruning callbacks on one model, or a model saved with its masks?)");
  layers_.clear();
  skipped_.clear();
  last_pruning_step_ = -1;  // a fit runs the schedule from its start (a resume restores it)
  // Mask names must identify their parameters among all of the model's (make_pruning_permanent finds
  // a mask's parameter by encoding every name), not only among the selected ones.
  std::map<std::string, std::vector<std::string>> by_mask_name;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) by_mask_name[buffer_name(item.key())].push_back(item.key());
  // Note [Structured pruning and Linear layers]: a Linear's output channels are its rows, and for the
  // classifier those are the classes: pruning them leaves classes that only the bias can predict. The
  // default selection (an empty include) therefore gives structured pruning convolutions only; a Linear
  // is pruned by rows where include names it.
  // A ConvTranspose (taken only where include names it) keeps its output channels in dimension 1, and
  // with groups they are split across dimension 0's groups: structured pruning skips it, saying so.
  std::set<std::string> linear_weights, transposed_weights;
  if (options_.granularity == PruneGranularity::Structured) {
    for (const auto& item : model.named_modules("", /*include_self=*/true)) {
      torch::nn::Module* m = item.value().get();
      const std::string weight_name = item.key().empty() ? "weight" : item.key() + ".weight";
      if (options_.include.empty() && dynamic_cast<torch::nn::LinearImpl*>(m) != nullptr) {
        linear_weights.insert(weight_name);
      }
      if (dynamic_cast<torch::nn::ConvTranspose1dImpl*>(m) != nullptr ||
          dynamic_cast<torch::nn::ConvTranspose2dImpl*>(m) != nullptr ||
          dynamic_cast<torch::nn::ConvTranspose3dImpl*>(m) != nullptr) {
        transposed_weights.insert(weight_name);
      }
    }
  }
  for (const auto& [name, weight] : select_weights(model, options_.include, options_.exclude, "MagnitudePruning")) {
    const std::string mask_name = buffer_name(name);
    const std::vector<std::string>& sharing = by_mask_name[mask_name];
    LOCKSTEP_CHECK(sharing.size() == 1, "MagnitudePruning: parameters '", sharing[0], "' and '", sharing[1],
                   "' would share the mask name '", mask_name, "' (a dot is stored as '__'); rename one");
    if (weight.numel() == 0) {
      skipped_.emplace_back(name, "it has no elements");
      continue;
    }
    if (linear_weights.count(name) > 0) {
      skipped_.emplace_back(name, kLinearSkipped);
      continue;
    }
    if (transposed_weights.count(name) > 0) {
      skipped_.emplace_back(name, kTransposedSkipped);
      continue;
    }
    if (weight.dim() < 2) {
      // An include pattern such as "^layer1\\." or "\\.weight$" matches the biases and the norms'
      // parameters too. Pruned, 80% of a batch norm's scales at 0 would switch 80% of its channels off,
      // and under a global scope the small biases would go first. Left dense, as quantization leaves them.
      skipped_.emplace_back(name, options_.granularity == PruneGranularity::Structured
                                      ? "structured pruning takes weights with output channels (2 or more dimensions)"
                                      : kFlatSkipped);
      continue;
    }
    if (options_.granularity == PruneGranularity::NM && !nm_applies(weight, options_.m)) {
      std::ostringstream why;
      why << "rows of " << (weight.dim() >= 2 ? weight.numel() / weight.size(0) : weight.numel())
          << " weights are not a multiple of M = " << options_.m;
      skipped_.emplace_back(name, why.str());
      continue;
    }
    auto layer = std::make_shared<Layer>();
    layer->name = name;
    layer->weight = weight;
    layers_.push_back(layer);
  }
  if (layers_.empty() && !linear_weights.empty()) {
    LOCKSTEP_FAIL("MagnitudePruning: structured pruning with an empty include selects convolution weights, and none "
                  "is left to prune (the model has none, or exclude removed them). Linear layers are pruned by output "
                  "rows only where include names them (leave out the classifier: its rows are the classes)");
  }
  if (layers_.empty() && !skipped_.empty()) {
    std::ostringstream why;
    for (const auto& [name, reason] : skipped_) why << "\n  " << name << ": " << reason;
    if (options_.granularity == PruneGranularity::NM) {
      LOCKSTEP_FAIL("MagnitudePruning: N:M (", options_.n, ":", options_.m, ") applies to none of the ",
                    skipped_.size(), " selected weights:", why.str(), "\nChoose an M that divides their rows, or "
                    "exclude them");
    }
    LOCKSTEP_FAIL("MagnitudePruning: none of the ", skipped_.size(), " selected parameters can be pruned:", why.str());
  }
  LOCKSTEP_CHECK(!layers_.empty(), "MagnitudePruning: no weights selected for pruning (include: ",
                 options_.include.size(), " patterns, exclude: ", options_.exclude.size(), " patterns)");
  // The earlier fit's masks are kept only when they are exactly this selection's, in shape too (the
  // model may have been changed between the fits: a new head); otherwise they start over at all ones.
  if (again) {
    const auto kept = existing->named_buffers(/*recurse=*/false);
    bool keep = kept.size() == layers_.size();
    for (const auto& layer : layers_) {
      const at::Tensor* mask = kept.find(buffer_name(layer->name));
      keep = keep && mask != nullptr && mask->sizes() == layer->weight.sizes();
      if (keep) layer->mask = *mask;
    }
    if (keep) return;  // `again`: model_ is this model and masks_ its child already
    model.unregister_module(kMasksChild);
  }
  masks_ = std::make_shared<torch::nn::Module>("PruningMasks");
  for (auto& layer : layers_) {
    layer->mask = masks_->register_buffer(buffer_name(layer->name),
                                          torch::ones(layer->weight.sizes(), layer->weight.options().dtype(torch::kBool)));
  }
  model.register_module(kMasksChild, masks_);
  model_ = &model;
}

void MagnitudePruning::on_train_begin(train::TrainerContext& ctx) {
  // Masks restored by the Checkpointer (or all ones on a fresh start) are in force from here on.
  apply_to_weights();
  current_sparsity_ = mask_sparsity();
  if (ctx.world.rank == 0 && ctx.options != nullptr && ctx.options->progress) {
    std::printf("pruning: %s %s magnitude pruning of %zu weights (%zu skipped), %s to %s, %s\n",
                to_string(options_.granularity).c_str(), to_string(options_.scope).c_str(), layers_.size(),
                skipped_.size(), to_string(options_.schedule).c_str(),
                percent(scheduled_sparsity(options_, options_.schedule == PruneSchedule::OneShot ? options_.begin_step
                                                                                                 : options_.end_step))
                    .c_str(),
                describe_steps(schedule_state(options_)).c_str());
    for (const auto& [name, why] : skipped_) std::printf("pruning: skipping %s: %s\n", name.c_str(), why.c_str());
    std::fflush(stdout);
  }
}

void MagnitudePruning::on_batch_begin(train::TrainerContext& ctx) {
  if (!is_pruning_step(options_, ctx.global_step) || ctx.global_step == last_pruning_step_) return;
  update_masks(ctx, scheduled_sparsity(options_, ctx.global_step));
}

void MagnitudePruning::on_after_backward(train::TrainerContext&) {
  torch::NoGradGuard no_grad;
  for (const auto& layer : layers_) {
    at::Tensor grad = layer->weight.grad();
    if (grad.defined()) grad.mul_(layer->mask);
  }
}

void MagnitudePruning::on_after_optimizer_step(train::TrainerContext&) { apply_to_weights(); }

double MagnitudePruning::mask_sparsity() const {
  int64_t kept = 0, total = 0;
  for (const auto& layer : layers_) {
    kept += layer->mask.count_nonzero().item<int64_t>();
    total += layer->mask.numel();
  }
  return total > 0 ? 1.0 - static_cast<double>(kept) / static_cast<double>(total) : 0.0;
}

void MagnitudePruning::apply_to_weights() {
  torch::NoGradGuard no_grad;
  for (const auto& layer : layers_) layer->weight.mul_(layer->mask);
}

void MagnitudePruning::update_masks(train::TrainerContext& ctx, double sparsity) {
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> weights;
  for (const auto& layer : layers_) weights.push_back(layer->weight);
  std::vector<at::Tensor> masks;
  if (options_.granularity == PruneGranularity::NM) {
    for (const auto& w : weights) masks.push_back(nm_mask(w, options_.n, options_.m));
  } else if (options_.granularity == PruneGranularity::Structured) {
    if (options_.scope == PruneScope::Global) {
      masks = global_channel_masks(weights, sparsity);
    } else {
      for (const auto& w : weights) masks.push_back(channel_mask(w, sparsity));
    }
  } else if (options_.scope == PruneScope::Global) {
    masks = global_unstructured_masks(weights, sparsity);
  } else {
    for (const auto& w : weights) masks.push_back(unstructured_mask(w, sparsity));
  }
  for (size_t i = 0; i < layers_.size(); ++i) layers_[i]->mask.copy_(masks[i]);
  apply_to_weights();
  verify_across_ranks(*ctx.communicator);
  current_sparsity_ = mask_sparsity();
  last_pruning_step_ = ctx.global_step;
  if (ctx.world.rank == 0 && ctx.options != nullptr && ctx.options->progress && ctx.options->log_every > 0) {
    // On a terminal the progress line is redrawn in place: start a fresh line.
    std::printf("%spruning: step %lld: masks at %s sparsity (scheduled %s)\n", ::isatty(STDOUT_FILENO) ? "\n" : "", static_cast<long long>(ctx.global_step),
                percent(current_sparsity_).c_str(), percent(sparsity).c_str());
    std::fflush(stdout);
  }
}

// Note [Masks as state]: per layer, the number of kept weights and a position-weighted sum of the
// mask; gathered from every rank and compared with rank 0's. Every rank sees the same gathered
// table, so every rank raises the same error.
void MagnitudePruning::verify_across_ranks(comm::Communicator& comm) const {
  if (comm.size() == 1) return;
  const auto n = static_cast<int64_t>(layers_.size());
  at::Tensor mine = torch::empty({2 * n}, torch::kLong);
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor flat = layers_[i]->mask.reshape({-1}).to(torch::kCPU, torch::kLong);
    at::Tensor weights = torch::arange(flat.numel(), torch::kLong).remainder(65521).add_(1);
    mine[2 * i] = flat.sum();
    mine[2 * i + 1] = flat.mul(weights).sum();
  }
  at::Tensor all = torch::empty({comm.size() * 2 * n}, torch::kLong);
  comm.allgather(mine, all)->wait();
  all = all.view({comm.size(), 2 * n});
  for (int r = 1; r < comm.size(); ++r) {
    for (int64_t i = 0; i < n; ++i) {
      if (!torch::equal(all[r].narrow(0, 2 * i, 2), all[0].narrow(0, 2 * i, 2))) {
        LOCKSTEP_FAIL("MagnitudePruning: the pruning mask of '", layers_[i]->name, "' differs between rank 0 (",
                      all[0][2 * i].item<int64_t>(), " weights kept) and rank ", r, " (", all[r][2 * i].item<int64_t>(),
                      " kept): the ranks' weights were not identical when the masks were computed");
      }
    }
  }
}

std::vector<LayerSparsity> MagnitudePruning::report() const {
  std::vector<LayerSparsity> out;
  for (const auto& layer : layers_) out.push_back(measure(layer->name, layer->weight.detach()));
  return out;
}

void MagnitudePruning::on_epoch_end(train::TrainerContext& ctx) {
  const std::vector<LayerSparsity> layers = report();
  int64_t numel = 0, nonzeros = 0;
  for (const auto& layer : layers) {
    numel += layer.numel;
    nonzeros += layer.nonzeros;
    ctx.metrics["sparsity/" + layer.name] = layer.sparsity();
  }
  const double total = numel > 0 ? 1.0 - static_cast<double>(nonzeros) / static_cast<double>(numel) : 0.0;
  ctx.metrics["sparsity"] = total;
  ctx.metrics["sparsity_scheduled"] = last_pruning_step_ >= 0 ? scheduled_sparsity(options_, last_pruning_step_) : 0.0;
  if (ctx.world.rank != 0 || ctx.options == nullptr || !ctx.options->progress) return;
  std::printf("pruning: sparsity %s over %zu layers (%lld of %lld weights nonzero):", percent(total).c_str(),
              layers.size(), static_cast<long long>(nonzeros), static_cast<long long>(numel));
  for (size_t i = 0; i < layers.size(); ++i) {
    std::printf("%s%s %.1f%%", i % 4 == 0 ? "\n  " : " | ", layers[i].name.c_str(), 100.0 * layers[i].sparsity());
  }
  std::printf("\n");
  std::fflush(stdout);
}

void MagnitudePruning::on_train_end(train::TrainerContext& ctx) {
  if (model_ == nullptr) return;
  if (ctx.world.rank == 0 && options_.print_table) {
    std::printf("%s", format_sparsity_table(report()).c_str());
    std::fflush(stdout);
  }
  // Collective whether or not a path is set (a permanent_path set on rank 0 alone stays in step).
  const bool permanent = !options_.permanent_path.empty();
  if (permanent) {
    make_pruning_permanent(*model_);
    layers_.clear();
    model_ = nullptr;
    masks_ = nullptr;
  }
  train::run_on_rank0(
      ctx,
      [&] {
        if (!permanent) return;
        save_model_atomically(*ctx.model, options_.permanent_path);
        std::printf("pruning: masks folded into the weights; plain model saved to %s\n",
                    options_.permanent_path.c_str());
        std::fflush(stdout);
      },
      "MagnitudePruning: could not save the pruned model");
}

std::string MagnitudePruning::agreement() const {
  // As configured (the epochs are resolved per fit, alike everywhere); print_table and permanent_path
  // are local (the permanent save is collective whether or not a path is set).
  const PruningOptions& o = configured_;
  return nlohmann::json{{"granularity", to_string(o.granularity)}, {"scope", to_string(o.scope)},
                        {"n", o.n}, {"m", o.m}, {"schedule", to_string(o.schedule)},
                        {"initial_sparsity", o.initial_sparsity}, {"target_sparsity", o.target_sparsity},
                        {"begin_step", o.begin_step}, {"end_step", o.end_step}, {"frequency", o.frequency},
                        {"begin_epoch", o.begin_epoch}, {"end_epoch", o.end_epoch}, {"include", o.include},
                        {"exclude", o.exclude}}
      .dump();
}

std::string MagnitudePruning::save_state() const {
  nlohmann::json state = schedule_state(options_);
  state["last_pruning_step"] = last_pruning_step_;
  state["layers"] = layers();
  return state.dump();
}

void MagnitudePruning::load_state(const std::string& text) {
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(text);
    const auto last_pruning_step = state.at("last_pruning_step").get<int64_t>();
    const auto saved = state.at("layers").get<std::vector<std::string>>();
    if (saved != layers()) {
      // Checkpoints of structured runs from before Note [Structured pruning and Linear layers] hold
      // the Linear layers that an empty include no longer takes.
      std::string linear;
      for (const auto& [name, reason] : skipped_) {
        if (reason == kLinearSkipped && std::find(saved.begin(), saved.end(), name) != saved.end()) {
          linear += (linear.empty() ? "'" : ", '") + name + "'";
        }
      }
      // Unstructured and N:M checkpoints from before 1-D parameters were left dense.
      std::string flat;
      for (const auto& [name, reason] : skipped_) {
        if (reason == kFlatSkipped && std::find(saved.begin(), saved.end(), name) != saved.end()) {
          flat += (flat.empty() ? "'" : ", '") + name + "'";
        }
      }
      LOCKSTEP_CHECK(flat.empty(), "MagnitudePruning: the checkpoint's pruned layers include ", flat,
                     ", parameters of fewer than 2 dimensions (biases, norms), which pruning leaves dense now: "
                     "this run cannot go on with their masks. Start a new run from its weights with "
                     "trainer.init_from (their pruned zeros stay as values), or finish it with the version "
                     "that wrote it");
      LOCKSTEP_CHECK(linear.empty(), "MagnitudePruning: the checkpoint's pruned layers include ", linear,
                     ", Linear layers that structured pruning takes by default no more (a classifier's rows are "
                     "its classes). To resume the run as it was written, select them with include, e.g. include: "
                     "['\\.weight$'] (the biases and norms it also matches are skipped)");
    }
    LOCKSTEP_CHECK(saved == layers(), "MagnitudePruning: the checkpoint's pruned layers (", saved.size(),
                   ") are not the ones this run selects (", layers_.size(),
                   "): resume with the same include/exclude patterns and granularity");
    // Checkpoints written before the schedule was saved whole hold its steps only.
    const nlohmann::json schedule = schedule_state(options_);
    for (const auto& [key, value] : schedule.items()) {
      LOCKSTEP_CHECK(!state.contains(key) || state.at(key) == value, "MagnitudePruning: the checkpoint was pruned ",
                     "on another schedule: its ", key, " is ", state.at(key).dump(), ", this run's ", value.dump(),
                     " (", describe_steps(state), " there, ", describe_steps(schedule_state(options_)),
                     " here). Resume with the schedule and epochs it was written with");
    }
    last_pruning_step_ = last_pruning_step;  // only once the state is known to fit (a refusal changes nothing)
  } catch (const nlohmann::json::exception& e) {
    LOCKSTEP_FAIL("MagnitudePruning: the checkpoint's pruning state is not valid: ", e.what());
  }
}

std::vector<LayerSparsity> make_pruning_permanent(torch::nn::Module& model) {
  std::shared_ptr<torch::nn::Module> masks;
  for (const auto& child : model.named_children()) {
    if (child.key() == kMasksChild) masks = child.value();
  }
  if (!masks) return {};
  // Each mask's parameter, found by encoding the parameters' names (the encoding has no inverse).
  std::map<std::string, std::vector<std::pair<std::string, at::Tensor>>> by_mask_name;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    by_mask_name[buffer_name(item.key())].emplace_back(item.key(), item.value());
  }
  std::vector<LayerSparsity> out;
  torch::NoGradGuard no_grad;
  for (const auto& item : masks->named_buffers(/*recurse=*/false)) {
    const auto found = by_mask_name.find(item.key());
    LOCKSTEP_CHECK(found != by_mask_name.end(), "make_pruning_permanent: mask '", item.key(),
                   "' belongs to no parameter of the model");
    LOCKSTEP_CHECK(found->second.size() == 1, "make_pruning_permanent: mask '", item.key(), "' could belong to '",
                   found->second[0].first, "' or '", found->second[1].first, "'");
    const auto& [name, weight] = found->second[0];
    LOCKSTEP_CHECK(weight.sizes() == item.value().sizes(), "make_pruning_permanent: mask '", item.key(), "' has shape ",
                   item.value().sizes(), " but parameter '", name, "' has ", weight.sizes());
    at::Tensor w = weight;
    w.mul_(item.value());
    out.push_back(measure(name, w.detach()));
  }
  model.unregister_module(kMasksChild);
  return out;
}

void save_model_atomically(torch::nn::Module& model, const std::string& path) {
  train::check_names_readable(model, "save_model_atomically(" + path + ")");
  torch::serialize::OutputArchive archive;
  model.save(archive);
  train::write_file_atomically(path,
                               [&](const std::string& temporary) { train::save_with_checksum(archive, temporary); });
}

void load_model_checked(torch::nn::Module& model, const std::string& path) {
  c10::Device device(c10::kCPU);
  for (const auto& parameter : model.parameters()) {
    device = parameter.device();
    break;
  }
  torch::serialize::InputArchive archive;
  train::load_with_checksum(archive, path, device, "model file " + path);
  model.load(archive);
}

std::string format_sparsity_table(const std::vector<LayerSparsity>& layers) {
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof line, "%-28s %-18s %10s %10s %9s %14s\n", "layer", "shape", "params", "nonzeros",
                "sparsity", "zero channels");
  out << line;
  int64_t numel = 0, nonzeros = 0, channels = 0, zero = 0;
  for (const auto& layer : layers) {
    std::string shape;
    for (size_t i = 0; i < layer.shape.size(); ++i) shape += (i ? "x" : "") + std::to_string(layer.shape[i]);
    const std::string channel_text = std::to_string(layer.zero_channels) + "/" + std::to_string(layer.channels);
    std::snprintf(line, sizeof line, "%-28s %-18s %10lld %10lld %8.2f%% %14s\n", layer.name.c_str(), shape.c_str(),
                  static_cast<long long>(layer.numel), static_cast<long long>(layer.nonzeros), 100.0 * layer.sparsity(),
                  channel_text.c_str());
    out << line;
    numel += layer.numel;
    nonzeros += layer.nonzeros;
    channels += layer.channels;
    zero += layer.zero_channels;
  }
  const double total = numel > 0 ? 1.0 - static_cast<double>(nonzeros) / static_cast<double>(numel) : 0.0;
  const std::string channel_text = std::to_string(zero) + "/" + std::to_string(channels);
  std::snprintf(line, sizeof line, "%-28s %-18s %10lld %10lld %8.2f%% %14s\n", "total (pruned layers)", "",
                static_cast<long long>(numel), static_cast<long long>(nonzeros), 100.0 * total, channel_text.c_str());
  out << line;
  return out.str();
}

}  // namespace lockstep::compress
