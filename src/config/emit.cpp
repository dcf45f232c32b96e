// ExperimentConfig -> YAML (--print-config). Keys and nesting mirror parse_config exactly, so the
// output is itself a valid config that reproduces the run.
#include <yaml-cpp/yaml.h>

#include <cstdio>
#include <cstdlib>

#include "lockstep/comm/agree.hpp"
#include "lockstep/config/config.hpp"

#include "config/shortest_number.hpp"

namespace lockstep::config {
namespace {

// The shortest decimal text that reads back as the same double (0.1, not 0.10000000000000001).
std::string number(double value) {
  std::string out = detail::shortest_number(value);
  // Keep it a float to a reader: "1" -> "1.0" (exponent forms already read as floats).
  if (out.find_first_of(".eEn") == std::string::npos) out += ".0";
  return out;
}

template <typename T>
void put(YAML::Emitter& out, const char* key, const T& value) {
  out << YAML::Key << key << YAML::Value << value;
}
void put_real(YAML::Emitter& out, const char* key, double value) {
  out << YAML::Key << key << YAML::Value << number(value);
}

}  // namespace

std::string to_yaml(const ExperimentConfig& c) {
  YAML::Emitter out;
  out << YAML::BeginMap;

  out << YAML::Key << "runtime" << YAML::Value << YAML::BeginMap;
  put(out, "tune_malloc", c.runtime.tune_malloc);
  put(out, "threads", c.runtime.threads);
  put(out, "device", c.runtime.device);
  put(out, "backend", c.runtime.backend);
  put_real(out, "timeout_s", static_cast<double>(c.runtime.timeout.count()) / 1e3);
  out << YAML::EndMap;

  const train::TrainerOptions& t = c.trainer;
  out << YAML::Key << "trainer" << YAML::Value << YAML::BeginMap;
  put(out, "epochs", t.epochs);
  put(out, "batch_size", static_cast<int64_t>(t.batch_size));
  put(out, "eval_batch_size", static_cast<int64_t>(t.eval_batch_size));
  put(out, "seed", static_cast<unsigned long long>(t.seed));
  put(out, "output_dir", t.output_dir);
  put(out, "init_from", t.init_from);
  put(out, "log_every", t.log_every);
  put(out, "progress", t.progress);
  put(out, "prefetch", static_cast<int64_t>(t.prefetch));
  put(out, "drop_last_batch", t.drop_last_batch);
  put(out, "stop_after_steps", t.stop_after_steps);
  out << YAML::Key << "stop_signals" << YAML::Value << YAML::Flow << t.stop_signals;
  put_real(out, "stop_after_seconds", t.stop_after_seconds);
  put(out, "accumulation_steps", t.accumulation_steps);
  put_real(out, "clip_grad_norm", t.clip_grad_norm);
  put(out, "device", t.device);
  put(out, "precision", t.precision);
  put(out, "channels_last", t.channels_last);
  out << YAML::Key << "loss" << YAML::Value << YAML::BeginMap;
  put(out, "name", t.loss.name);
  put_real(out, "label_smoothing", t.loss.label_smoothing);
  put(out, "ignore_index", t.loss.ignore_index);
  put_real(out, "beta", t.loss.beta);
  out << YAML::EndMap;
  out << YAML::Key << "metrics" << YAML::Value << YAML::Flow << t.metrics;
  out << YAML::Key << "grad_scaler" << YAML::Value << YAML::BeginMap;
  put_real(out, "init_scale", t.grad_scaler.init_scale);
  put_real(out, "growth_factor", t.grad_scaler.growth_factor);
  put_real(out, "backoff_factor", t.grad_scaler.backoff_factor);
  put(out, "growth_interval", t.grad_scaler.growth_interval);
  out << YAML::EndMap;
  out << YAML::Key << "lr_schedule" << YAML::Value << YAML::BeginMap;
  put(out, "kind", train::to_string(t.lr.kind));
  put_real(out, "base_lr", t.lr.base_lr);
  put_real(out, "warmup_epochs", t.lr.warmup_epochs);
  put(out, "warmup_steps", t.lr.warmup_steps);
  put(out, "step_size", t.lr.step_size);
  put_real(out, "gamma", t.lr.gamma);
  put_real(out, "min_lr", t.lr.min_lr);
  put(out, "scale_with_world_size", t.lr.scale_lr_with_world_size);
  out << YAML::EndMap;
  out << YAML::Key << "checkpoint" << YAML::Value << YAML::BeginMap;
  put(out, "enabled", t.checkpoints);
  put(out, "every_steps", t.checkpoint.every_steps);
  put(out, "every_epoch", t.checkpoint.every_epoch);
  put(out, "keep_last", t.checkpoint.keep_last);
  put(out, "resume", t.checkpoint.resume);
  put(out, "directory", t.checkpoint.directory);
  put(out, "at_end", t.checkpoint.at_end);
  out << YAML::EndMap;
  out << YAML::EndMap;

  out << YAML::Key << "ddp" << YAML::Value << YAML::BeginMap;
  put(out, "comm_hook", c.ddp_comm_hook);
  put_real(out, "bucket_cap_mb", t.ddp.bucket_cap_mb);
  put_real(out, "first_bucket_cap_mb", t.ddp.first_bucket_cap_mb);
  put(out, "gradient_as_bucket_view", t.ddp.gradient_as_bucket_view);
  put(out, "find_unused_parameters", t.ddp.find_unused_parameters);
  put(out, "broadcast_buffers", t.ddp.broadcast_buffers);
  put(out, "sync_batch_norm", t.ddp.sync_batch_norm);
  const ddp::PowerSGDOptions& ps = c.ddp_powersgd;
  out << YAML::Key << "powersgd" << YAML::Value << YAML::BeginMap;
  put(out, "matrix_approximation_rank", ps.matrix_approximation_rank);
  put(out, "start_iteration", static_cast<unsigned long long>(ps.start_iteration));
  put_real(out, "min_compression_rate", ps.min_compression_rate);
  put(out, "use_error_feedback", ps.use_error_feedback);
  put(out, "warm_start", ps.warm_start);
  put_real(out, "orthogonalization_epsilon", ps.orthogonalization_epsilon);
  put(out, "seed", static_cast<unsigned long long>(ps.seed));
  out << YAML::EndMap;
  out << YAML::EndMap;

  out << YAML::Key << "data" << YAML::Value << YAML::BeginMap;
  put(out, "dataset", c.data.dataset);
  put(out, "dir", c.data.dir);
  put(out, "train_subset", c.data.train_subset);
  put(out, "test_subset", c.data.test_subset);
  if (c.data.dataset == "cifar10") put(out, "records_per_file", c.data.records_per_file);  // an error elsewhere
  out << YAML::Key << "augment" << YAML::Value << YAML::BeginMap;
  put(out, "pad", c.data.augment.pad);
  put(out, "hflip", c.data.augment.hflip);
  out << YAML::EndMap;
  out << YAML::EndMap;

  out << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  put(out, "name", std::string("resnet18"));
  put(out, "width", c.model.width);
  put(out, "num_classes", c.model.num_classes);
  put(out, "in_channels", c.model.in_channels);
  put(out, "stem", models::to_string(c.model.stem));
  put(out, "zero_init_residual", c.model.zero_init_residual);
  put(out, "quantize_activations", c.model.quantize_activations);
  out << YAML::EndMap;

  out << YAML::Key << "optimizer" << YAML::Value << YAML::BeginMap;
  put(out, "name", c.optimizer.name);
  put_real(out, "lr", c.optimizer.lr);
  put_real(out, "momentum", c.optimizer.momentum);
  put_real(out, "weight_decay", c.optimizer.weight_decay);
  put(out, "nesterov", c.optimizer.nesterov);
  put_real(out, "beta1", c.optimizer.beta1);
  put_real(out, "beta2", c.optimizer.beta2);
  put_real(out, "eps", c.optimizer.eps);
  put(out, "zero", c.optimizer.zero);
  out << YAML::EndMap;

  const compress::PruningOptions& p = c.pruning.options;
  out << YAML::Key << "ema" << YAML::Value << YAML::BeginMap;
  put(out, "enabled", c.ema.enabled);
  put_real(out, "decay", c.ema.options.decay);
  put(out, "warmup", c.ema.options.warmup);
  put(out, "every_steps", c.ema.options.every_steps);
  put(out, "evaluate", c.ema.options.evaluate);
  put(out, "apply_at_end", c.ema.options.apply_at_end);
  out << YAML::EndMap;

  out << YAML::Key << "early_stopping" << YAML::Value << YAML::BeginMap;
  put(out, "enabled", c.early_stopping.enabled);
  put(out, "monitor", c.early_stopping.options.monitor);
  put(out, "mode", c.early_stopping.options.mode);
  put(out, "patience", c.early_stopping.options.patience);
  put_real(out, "min_delta", c.early_stopping.options.min_delta);
  put(out, "restore_best_weights", c.early_stopping.options.restore_best_weights);
  out << YAML::EndMap;

  out << YAML::Key << "pruning" << YAML::Value << YAML::BeginMap;
  put(out, "enabled", c.pruning.enabled);
  put(out, "granularity", compress::to_string(p.granularity));
  put(out, "scope", compress::to_string(p.scope));
  put(out, "n", p.n);
  put(out, "m", p.m);
  put(out, "schedule", compress::to_string(p.schedule));
  put_real(out, "initial_sparsity", p.initial_sparsity);
  put_real(out, "target_sparsity", p.target_sparsity);
  put(out, "begin_step", p.begin_step);
  put(out, "end_step", p.end_step);
  put(out, "frequency", p.frequency);
  put_real(out, "begin_epoch", p.begin_epoch);
  put_real(out, "end_epoch", p.end_epoch);
  out << YAML::Key << "include" << YAML::Value << YAML::Flow << p.include;
  out << YAML::Key << "exclude" << YAML::Value << YAML::Flow << p.exclude;
  put(out, "print_table", p.print_table);
  put(out, "permanent_path", p.permanent_path);
  out << YAML::EndMap;

  const compress::QuantizationOptions& q = c.quantization.options;
  out << YAML::Key << "quantization" << YAML::Value << YAML::BeginMap;
  put(out, "enabled", c.quantization.enabled);
  put(out, "per_channel", q.per_channel);
  put(out, "activations", q.activations);
  put(out, "begin_step", q.begin_step);
  put(out, "freeze_step", q.freeze_step);
  put_real(out, "begin_epoch", q.begin_epoch);
  put_real(out, "freeze_epoch", q.freeze_epoch);
  put_real(out, "averaging_constant", q.averaging_constant);
  out << YAML::Key << "include" << YAML::Value << YAML::Flow << q.include;
  out << YAML::Key << "exclude" << YAML::Value << YAML::Flow << q.exclude;
  put(out, "print_table", q.print_table);
  put(out, "export_path", q.export_path);
  out << YAML::EndMap;

  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}



namespace {

// "trainer.lr_schedule.kind" -> value, for every scalar of the emitted YAML, in document order.
void flatten(const YAML::Node& node, const std::string& path, std::vector<std::pair<std::string, std::string>>& out) {
  if (node.IsMap()) {
    for (const auto& item : node) {
      const std::string key = item.first.as<std::string>();
      flatten(item.second, path.empty() ? key : path + "." + key, out);
    }
  } else if (node.IsSequence()) {
    for (std::size_t i = 0; i < node.size(); ++i) flatten(node[i], path + "[" + std::to_string(i) + "]", out);
    if (node.size() == 0) out.emplace_back(path, "[]");
  } else {
    out.emplace_back(path, node.IsNull() ? "null" : node.Scalar());
  }
}

}  // namespace

void check_same_on_all_ranks(const ExperimentConfig& config, comm::Communicator& comm) {
  std::vector<std::pair<std::string, std::string>> keys;
  flatten(YAML::Load(to_yaml(config)), "", keys);
  // A device index is a rank's own placement (cuda:<local rank> on a node of several GPUs, set per
  // rank by --set; "cuda" is the runtime's GPU): the ranks must agree on the device's kind only.
  for (auto& [key, value] : keys) {
    if (key == "trainer.device" && value.rfind("cuda:", 0) == 0) value = "cuda";
  }
  comm::check_same_values(comm, keys, "config",
                          "Every rank must read the same configuration: the same --config file contents on every "
                          "node and the same --set arguments (compare the nodes' copies with --print-config).");
}

}  // namespace lockstep::config
