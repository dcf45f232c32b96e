// YAML -> ExperimentConfig. Note [Config checking]: each section is read through a Section that
// records the keys it knows; after reading, any other key in the mapping is an error listing the known
// ones. Values are converted with an explicit expected type and range, and every error carries the
// key path and its origin (file:line:column, or the --set argument that produced it).
#include "lockstep/config/config.hpp"

#include "config/shortest_number.hpp"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <filesystem>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "lockstep/comm/work.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/core/stop_signals.hpp"
#include "lockstep/core/world.hpp"

namespace lockstep::config {
namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int64_t>::max();

std::string join(const std::set<std::string>& keys) {
  std::string out;
  for (const auto& key : keys) out += (out.empty() ? "" : ", ") + key;
  return out;
}

std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a sequence";
    case YAML::NodeType::Null: return "nothing (null)";
    case YAML::NodeType::Scalar: return "'" + node.Scalar() + "'";
    default: return "nothing";
  }
}

// Plain decimal text: an optional sign, then "0" or digits that do not start with 0. yaml-cpp's
// convert<int64_t> would also read "010" as octal (8) and "0x10" as hexadecimal (16).
bool is_decimal_integer(const std::string& text) {
  const size_t start = (!text.empty() && (text[0] == '+' || text[0] == '-')) ? 1 : 0;
  if (text.size() == start || text.find_first_not_of("0123456789", start) != std::string::npos) return false;
  return text[start] != '0' || text.size() == start + 1;
}

// "010", "-08", "0x10": a number written with a leading zero (the hint of the error above).
bool has_leading_zero(const std::string& text) {
  const size_t start = (!text.empty() && (text[0] == '+' || text[0] == '-')) ? 1 : 0;
  if (text.size() < start + 2 || text[start] != '0') return false;
  const char next = text[start + 1];
  return (next >= '0' && next <= '9') || next == 'x' || next == 'X';
}

// The --set argument that wrote `path` or one of its parents (nullptr: none did).
const std::string* set_by(const std::map<std::string, std::string>& origins, const std::string& path) {
  for (std::string prefix = path;;) {
    if (auto it = origins.find(prefix); it != origins.end()) return &it->second;
    const auto dot = prefix.rfind('.');
    if (dot == std::string::npos) return nullptr;
    prefix.resize(dot);
  }
}

// "file:line:column" for a node read from `source`.
std::string position(const std::string& source, const YAML::Mark& mark) {
  return source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

class Reader {
 public:
  Reader(std::string source, std::map<std::string, std::string> origins)
      : source_(std::move(source)), origins_(std::move(origins)) {}

  // Where the value at `path` came from: the --set argument that wrote it (or a parent of it), else
  // its position in the source.
  std::string where(const std::string& path, const YAML::Mark& mark) const {
    if (const std::string* item = set_by(origins_, path)) return "--set " + *item;
    if (mark.is_null()) {
      // A mapping that a --set created on its way to a leaf (`--set optimiser.lr=0.05` makes
      // `optimiser`) has no place in the file: that --set is where it came from.
      const std::string below = path + ".";
      auto it = origins_.lower_bound(below);
      if (it != origins_.end() && it->first.compare(0, below.size(), below) == 0) return "--set " + it->second;
      return source_;
    }
    return position(source_, mark);
  }

  [[noreturn]] void fail(const std::string& path, const YAML::Node& node, const std::string& what) const {
    LOCKSTEP_FAIL("config key '", path, "' at ", where(path, node.Mark()), ": ", what);
  }
  void warn(const std::string& path, const YAML::Node& node, const std::string& what) const {
    warnings_.push_back("config key '" + path + "' at " + where(path, node.Mark()) + " is ignored: " + what);
  }
  const std::vector<std::string>& warnings() const { return warnings_; }

 private:
  std::string source_;
  std::map<std::string, std::string> origins_;
  mutable std::vector<std::string> warnings_;
};

class Section {
 public:
  Section(const Reader& reader, YAML::Node node, std::string path)
      : reader_(reader), node_(std::move(node)), path_(std::move(path)) {
    if (node_.IsDefined() && !node_.IsNull() && !node_.IsMap()) {
      reader_.fail(path_.empty() ? "<top level>" : path_, node_, "expected a mapping, found " + describe(node_));
    }
    check_unique_keys();
  }

  Section section(const std::string& key) {
    known_.insert(key);
    return Section(reader_, child(key), full(key));
  }

  void integer(const std::string& key, int64_t& out, int64_t min, int64_t max = kMaxInt) {
    YAML::Node node = scalar(key, "an integer");
    if (!node) return;
    int64_t value = 0;
    // Decimal text only, checked first: yaml-cpp would read "010" as 8 (octal) and "0x10" as 16.
    const std::string text = node.Scalar();
    if (!is_decimal_integer(text) || !YAML::convert<int64_t>::decode(node, value)) {
      fail_not_integer(key, node, is_decimal_integer(text) ? " (past the 64-bit range, +-9223372036854775807)" : "");
    }
    if (value < min || value > max) {
      reader_.fail(full(key), node,
                   "expected an integer " + (max == kMaxInt ? ">= " + std::to_string(min)
                                                            : "in [" + std::to_string(min) + ", " +
                                                                  std::to_string(max) + "]") +
                       ", found " + std::to_string(value));
    }
    out = value;
  }
  void count(const std::string& key, size_t& out, int64_t min) {
    auto value = static_cast<int64_t>(out);
    integer(key, value, min);
    out = static_cast<size_t>(value);
  }
  // "expected an integer, found ...", with the leading-zero hint where it applies, else `otherwise`.
  [[noreturn]] void fail_not_integer(const std::string& key, const YAML::Node& node, const char* otherwise = "") {
    const std::string& text = node.Scalar();
    const std::size_t digits = !text.empty() && (text[0] == '+' || text[0] == '-') ? 1 : 0;
    const bool hex = text.size() > digits + 1 && (text[digits + 1] == 'x' || text[digits + 1] == 'X');
    const char* hint = !has_leading_zero(text) ? otherwise
                       : hex ? " (hexadecimal is not allowed: write the number in plain decimal)"
                           : " (leading zeros are not allowed: YAML reads them as octal; write the number in plain decimal)";
    reader_.fail(full(key), node, "expected an integer, found " + describe(node) + hint);
  }
  // 0 .. 2^64 - 1 (seeds: any value set in code must read back from the config to_yaml writes).
  void unsigned_integer(const std::string& key, uint64_t& out) {
    YAML::Node node = scalar(key, "an integer");
    if (!node) return;
    const std::string text = node.Scalar();
    if (is_decimal_integer(text) && text[0] == '-') {
      reader_.fail(full(key), node, "expected an integer >= 0, found " + text);
    }
    uint64_t value = 0;
    if (!is_decimal_integer(text) || !YAML::convert<uint64_t>::decode(node, value)) {
      fail_not_integer(key, node, is_decimal_integer(text) ? " (past 18446744073709551615)" : "");
    }
    out = value;
  }
  // A real number in [min, max] (or (min, ...) when min_exclusive).
  void real(const std::string& key, double& out, double min, double max = std::numeric_limits<double>::infinity(),
            bool min_exclusive = false, bool max_exclusive = false) {
    YAML::Node node = scalar(key, "a number");
    if (!node) return;
    double value = 0;
    if (!YAML::convert<double>::decode(node, value) || !std::isfinite(value)) {
      reader_.fail(full(key), node, "expected a number, found " + describe(node));
    }
    const bool low = min_exclusive ? value <= min : value < min;
    const bool high = max_exclusive ? value >= max : value > max;
    if (low || high) {
      // Enough digits to tell the value from the bound: 1000001 against (0, 1e+06] printed "1e+06".
      std::ostringstream range;
      range << (min_exclusive ? "(" : "[") << detail::shortest_number(min) << ", " << detail::shortest_number(max)
            << (max_exclusive ? ")" : "]");
      reader_.fail(full(key), node, "expected a number in " + range.str() + ", found " + detail::shortest_number(value));
    }
    out = value;
  }
  void boolean(const std::string& key, bool& out) {
    YAML::Node node = scalar(key, "true or false");
    if (!node) return;
    // YAML 1.2's booleans only, unquoted: yaml-cpp would also take y, n, yes, no, on and off, quoted or
    // not, so `hflip: n` turned flipping off where a YAML 1.2 reader sees the string "n".
    const std::string& text = node.Scalar();
    const bool plain = node.Tag() != "!";
    if (plain && (text == "true" || text == "True" || text == "TRUE")) {
      out = true;
    } else if (plain && (text == "false" || text == "False" || text == "FALSE")) {
      out = false;
    } else {
      reader_.fail(full(key), node, "expected true or false, found " +
                                        (plain ? describe(node) : "the quoted string " + describe(node) + " (unquote it)"));
    }
  }
  void string(const std::string& key, std::string& out) {
    YAML::Node node = scalar(key, "a string");
    if (node) out = node.Scalar();
  }
  void choice(const std::string& key, std::string& out, const std::set<std::string>& allowed) {
    YAML::Node node = scalar(key, "one of " + join(allowed));
    if (!node) return;
    if (allowed.count(node.Scalar()) == 0) {
      reader_.fail(full(key), node, "expected one of " + join(allowed) + ", found " + describe(node));
    }
    out = node.Scalar();
  }

  // A sequence of strings (a single string is taken as a one-element list).
  void strings(const std::string& key, std::vector<std::string>& out) {
    known_.insert(key);
    YAML::Node node = child(key);
    if (!node.IsDefined()) return;
    if (node.IsScalar()) {
      out = {node.Scalar()};
      return;
    }
    // Null too (`metrics:` left empty, `--set trainer.metrics=~`): it kept the default list, where a
    // scalar key left empty is an error; an empty list is written [].
    if (!node.IsSequence()) {
      reader_.fail(full(key), node, "expected a list of strings ([] for none), found " + describe(node));
    }
    out.clear();
    for (const auto& item : node) {
      if (!item.IsScalar()) reader_.fail(full(key), item, "expected a list of strings, found an item that is " + describe(item));
      out.push_back(item.Scalar());
    }
  }
  [[noreturn]] void fail_here(const std::string& what) const {
    reader_.fail(path_, node_, what);
  }
  // Note [Config checking]: call after reading every known key.
  void finish() const {
    if (!node_.IsDefined() || !node_.IsMap()) return;
    for (auto it = node_.begin(); it != node_.end(); ++it) {
      const std::string key = it->first.Scalar();
      if (known_.count(key) == 0 && key.find('.') != std::string::npos) {
        // `trainer: {lr_schedule.kind: step}` would read "unknown config key 'trainer.lr_schedule.kind'",
        // a path that exists: the dot is inside one key's name, which only --set reads as a path.
        LOCKSTEP_FAIL("unknown config key '", key, "'", path_.empty() ? "" : " under '" + path_ + "'", " at ",
                      reader_.where(full(key), it->first.Mark()), ": a key's name holds a dot; in a file, nest the "
                      "keys as mappings (only --set takes a dotted path)");
      }
      if (known_.count(key) == 0) {
        LOCKSTEP_FAIL("unknown config key '", full(key), "' at ", reader_.where(full(key), it->first.Mark()),
                      " (known keys", path_.empty() ? "" : " under '" + path_ + "'", ": ", join(known_), ")");
      }
    }
  }

  [[noreturn]] void fail_key(const std::string& key, const std::string& what) const {
    reader_.fail(full(key), child(key), what);
  }
  // Whether the key is written (in the file or by --set), whatever its value.
  bool given(const std::string& key) const { return child(key).IsDefined(); }
  // Note [Keys the chosen mode ignores]: a key written with a value of its own (`differs` from the
  // default) that the selected mode does not read (optimizer.momentum under adam) is reported, not
  // refused: the shipped configs set SGD's keys, and `--set optimizer.name=adam` must still run.
  void ignored(const std::string& key, bool differs, const std::string& why) const {
    if (given(key) && differs) reader_.warn(full(key), child(key), why);
  }

 private:
  std::string full(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  // yaml-cpp keeps both entries of a key given twice in one mapping, and node[key] returns the first:
  // a second `trainer:` block lower in the file would be ignored, unchecked. An error naming both
  // places (of the file, or the --set argument whose value holds the mapping).
  void check_unique_keys() const {
    if (!node_.IsDefined() || !node_.IsMap()) return;
    std::map<std::string, YAML::Node> seen;
    for (auto it = node_.begin(); it != node_.end(); ++it) {
      if (!it->first.IsScalar()) continue;  // finish() names it as an unknown key
      const std::string key = it->first.Scalar();
      const auto [earlier, inserted] = seen.emplace(key, it->first);
      if (!inserted) {
        LOCKSTEP_FAIL("config key '", full(key), "' is given twice, at ", reader_.where(path_, earlier->second.Mark()),
                      " and at ", reader_.where(path_, it->first.Mark()), " (each key may appear once in a mapping)");
      }
    }
  }
  // yaml-cpp hands out "invalid" nodes for missing keys, which throw on most queries: normalise
  // every absent key to a valid Undefined node.
  YAML::Node child(const std::string& key) const {
    if (!node_.IsDefined() || !node_.IsMap()) return YAML::Node(YAML::NodeType::Undefined);
    YAML::Node value = node_[key];
    if (!value.IsDefined()) return YAML::Node(YAML::NodeType::Undefined);
    return value;
  }
  // The key's node if it is given and a scalar; an invalid node if it is absent; an error otherwise.
  YAML::Node scalar(const std::string& key, const std::string& expected) {
    known_.insert(key);
    YAML::Node node = child(key);
    if (!node.IsDefined()) return YAML::Node(YAML::NodeType::Undefined);
    if (!node.IsScalar()) reader_.fail(full(key), node, "expected " + expected + ", found " + describe(node));
    return node;
  }

  const Reader& reader_;
  YAML::Node node_;
  std::string path_;
  std::set<std::string> known_;
};

void read_runtime(Section s, RuntimeOptions& o) {
  s.boolean("tune_malloc", o.tune_malloc);
  int64_t threads = o.threads;
  s.integer("threads", threads, 0, 4096);
  o.threads = static_cast<int>(threads);
  s.choice("device", o.device, {"auto", "cpu", "cuda"});
  s.choice("backend", o.backend, {"auto", "mpi", "nccl"});
  // Refused here, at its line, rather than by the Runtime after MPI started.
  if (o.device == "cpu" && o.backend == "nccl") {
    s.fail_key("backend", "is nccl, which all-reduces CUDA tensors, but runtime.device is cpu; set backend to mpi or "
                          "auto, or device to cuda or auto");
  }
  double timeout_s = static_cast<double>(o.timeout.count()) / 1e3;
  s.real("timeout_s", timeout_s, 0.0);
  // 0 means the default (comm::default_timeout()), so a positive timeout that would round to 0 ms is an
  // error rather than the default. Past comm::kMaxTimeout (about 100 years) it is kMaxTimeout, compared
  // as a double first: converting a value past int64's range is undefined.
  if (timeout_s > 0 && timeout_s < 1e-3) {
    s.fail_key("timeout_s", "expected 0 (the default timeout) or at least 0.001 (1 ms), found " +
                                detail::shortest_number(timeout_s));
  }
  const double timeout_ms = std::round(timeout_s * 1e3);
  o.timeout = timeout_ms >= static_cast<double>(comm::kMaxTimeout.count())
                  ? comm::kMaxTimeout
                  : std::chrono::milliseconds(static_cast<int64_t>(timeout_ms));
  s.finish();
}

void read_trainer(Section s, train::TrainerOptions& o, const RuntimeOptions& runtime) {
  s.integer("epochs", o.epochs, 0);
  s.count("batch_size", o.batch_size, 1);
  s.count("eval_batch_size", o.eval_batch_size, 1);
  s.unsigned_integer("seed", o.seed);
  s.string("output_dir", o.output_dir);
  s.string("init_from", o.init_from);
  s.integer("log_every", o.log_every, 0);
  s.boolean("progress", o.progress);
  if (!o.progress) {
    s.ignored("log_every", o.log_every != train::TrainerOptions{}.log_every,
              "trainer.progress is false (log_every is the progress log's interval)");
  }
  s.count("prefetch", o.prefetch, 0);
  s.boolean("drop_last_batch", o.drop_last_batch);
  s.integer("stop_after_steps", o.stop_after_steps, 0);
  s.strings("stop_signals", o.stop_signals);
  for (const auto& name : o.stop_signals) {
    try {
      signal_number(name, "");
    } catch (const Error& e) {
      s.fail_key("stop_signals", e.message());
    }
  }
  s.real("stop_after_seconds", o.stop_after_seconds, 0.0);
  s.integer("accumulation_steps", o.accumulation_steps, 1);
  s.real("clip_grad_norm", o.clip_grad_norm, 0.0);
  s.string("device", o.device);  // as TrainerOptions::device takes it, cuda:N included
  if (!(o.device == "auto" || o.device == "cpu" || o.device == "cuda" ||
        std::regex_match(o.device, std::regex("cuda:[0-9]{1,4}")))) {
    s.fail_key("device", "expected one of auto, cpu, cuda or cuda:N, found " + o.device);
  }
  // The runtime keeps such a rank off the GPUs (no device chosen from its local rank): training there
  // anyway would put every rank of a node on cuda:0, its tensors staged through the CPU for MPI.
  if (runtime.device == "cpu" && o.device.rfind("cuda", 0) == 0) {
    s.fail_key("device", "is " + o.device + ", but runtime.device is cpu (the runtime chooses no GPU for the ranks); "
                         "set runtime.device to cuda or auto, or trainer.device to auto or cpu");
  }
  s.choice("precision", o.precision, {"fp32", "bf16", "fp16"});
  s.boolean("channels_last", o.channels_last);
  {
    Section l = s.section("loss");
    const std::vector<std::string>& names = train::loss_names();
    l.choice("name", o.loss.name, std::set<std::string>(names.begin(), names.end()));
    l.real("label_smoothing", o.loss.label_smoothing, 0.0, 1.0, false, true);
    l.integer("ignore_index", o.loss.ignore_index, std::numeric_limits<int64_t>::min());
    l.real("beta", o.loss.beta, 0.0, std::numeric_limits<double>::infinity(), true);
    l.finish();
    if (o.loss.name != "smooth_l1") {  // label_smoothing and ignore_index are refused below: they change nothing
      l.ignored("beta", o.loss.beta != train::LossOptions{}.beta,
                "trainer.loss.name is " + o.loss.name + " (beta is smooth_l1's)");
    }
    try {
      train::check_loss_options(o.loss);
    } catch (const Error& e) {
      s.fail_key("loss", e.message());
    }
  }
  s.strings("metrics", o.metrics);
  std::set<std::string> listed;
  for (const auto& name : o.metrics) {
    try {
      train::check_metric_name(name);
    } catch (const Error& e) {
      s.fail_key("metrics", e.message());
    }
    if (!listed.insert(name).second) s.fail_key("metrics", "'" + name + "' is given twice");
  }
  {
    Section g = s.section("grad_scaler");
    g.real("init_scale", o.grad_scaler.init_scale, 0.0, 1e30, true);
    g.real("growth_factor", o.grad_scaler.growth_factor, 1.0, 1e6, true);
    g.real("backoff_factor", o.grad_scaler.backoff_factor, 0.0, 1.0, true, true);
    g.integer("growth_interval", o.grad_scaler.growth_interval, 1);
    g.finish();
    if (o.precision != "fp16") {
      const train::GradScalerOptions defaults;
      const std::string why = "the loss scaler runs only with trainer.precision fp16 (it is " + o.precision + ")";
      g.ignored("init_scale", o.grad_scaler.init_scale != defaults.init_scale, why);
      g.ignored("growth_factor", o.grad_scaler.growth_factor != defaults.growth_factor, why);
      g.ignored("backoff_factor", o.grad_scaler.backoff_factor != defaults.backoff_factor, why);
      g.ignored("growth_interval", o.grad_scaler.growth_interval != defaults.growth_interval, why);
    }
  }
  {
    Section lr = s.section("lr_schedule");
    std::string kind = train::to_string(o.lr.kind);
    lr.choice("kind", kind, {"constant", "step", "cosine"});
    o.lr.kind = train::parse_lr_schedule_kind(kind);
    lr.real("base_lr", o.lr.base_lr, 0.0);
    lr.real("warmup_epochs", o.lr.warmup_epochs, 0.0);
    lr.integer("warmup_steps", o.lr.warmup_steps, 0);
    lr.integer("step_size", o.lr.step_size, 1);
    lr.real("gamma", o.lr.gamma, 0.0, 1.0, true, false);
    lr.real("min_lr", o.lr.min_lr, 0.0);
    lr.boolean("scale_with_world_size", o.lr.scale_lr_with_world_size);
    lr.finish();
    const train::LrScheduleOptions defaults;
    const std::string why = "lr_schedule.kind is " + kind;
    if (o.lr.kind != train::LrScheduleKind::Step) {
      lr.ignored("step_size", o.lr.step_size != defaults.step_size, why + " (step_size is the step schedule's)");
      lr.ignored("gamma", o.lr.gamma != defaults.gamma, why + " (gamma is the step schedule's)");
    }
    if (o.lr.kind != train::LrScheduleKind::Cosine) {
      lr.ignored("min_lr", o.lr.min_lr != defaults.min_lr, why + " (min_lr is the cosine schedule's)");
    }
  }
  {
    Section c = s.section("checkpoint");
    c.boolean("enabled", o.checkpoints);
    c.integer("every_steps", o.checkpoint.every_steps, 0);
    c.boolean("every_epoch", o.checkpoint.every_epoch);
    c.integer("keep_last", o.checkpoint.keep_last, 0);
    c.string("resume", o.checkpoint.resume);
    c.string("directory", o.checkpoint.directory);
    c.boolean("at_end", o.checkpoint.at_end);
    c.finish();
    // The trainer refuses these too; here the error names the key and where it was set.
    if (!train::keeps_checkpoints(o) && o.checkpoint.resume != "auto" && o.checkpoint.resume != "never") {
      c.fail_key("resume", "names a checkpoint to resume from, but this run keeps no checkpoints (" +
                               std::string(o.checkpoints ? "trainer.output_dir and trainer.checkpoint.directory are empty"
                                                         : "trainer.checkpoint.enabled is false") +
                               "), so nothing would load it");
    }
    if (!o.checkpoints && !o.checkpoint.directory.empty()) {
      c.fail_key("directory", "is set, but trainer.checkpoint.enabled is false: nothing would be written there or "
                              "resumed from it");
    }
    // Not when enabled is false: that turns checkpoints off on purpose, keys and all (as ema.enabled
    // does its section's); a run with nowhere to write them probably forgot output_dir.
    if (o.checkpoints && !train::keeps_checkpoints(o)) {
      const train::CheckpointOptions defaults;
      const std::string why =
          "this run keeps no checkpoints (trainer.output_dir and trainer.checkpoint.directory are empty)";
      c.ignored("every_steps", o.checkpoint.every_steps != defaults.every_steps, why);
      c.ignored("every_epoch", o.checkpoint.every_epoch != defaults.every_epoch, why);
      c.ignored("keep_last", o.checkpoint.keep_last != defaults.keep_last, why);
      c.ignored("at_end", o.checkpoint.at_end != defaults.at_end, why);
    }
  }
  s.finish();
}

void read_powersgd(Section s, ddp::PowerSGDOptions& o) {
  s.integer("matrix_approximation_rank", o.matrix_approximation_rank, 1);
  s.unsigned_integer("start_iteration", o.start_iteration);
  s.real("min_compression_rate", o.min_compression_rate, 1.0);
  s.boolean("use_error_feedback", o.use_error_feedback);
  s.boolean("warm_start", o.warm_start);
  s.real("orthogonalization_epsilon", o.orthogonalization_epsilon, 0.0);
  s.unsigned_integer("seed", o.seed);
  s.finish();
}

void read_ddp(Section s, ddp::DataParallelOptions& o, std::string& comm_hook, ddp::PowerSGDOptions& powersgd) {
  s.choice("comm_hook", comm_hook, {"allreduce", "fp16", "bf16", "powersgd"});
  read_powersgd(s.section("powersgd"), powersgd);  // checked whichever hook is chosen
  if (comm_hook != "powersgd") {
    const Section p = s.section("powersgd");
    const ddp::PowerSGDOptions defaults;
    const std::string why = "ddp.comm_hook is " + comm_hook + ", not powersgd";
    p.ignored("matrix_approximation_rank", powersgd.matrix_approximation_rank != defaults.matrix_approximation_rank, why);
    p.ignored("start_iteration", powersgd.start_iteration != defaults.start_iteration, why);
    p.ignored("min_compression_rate", powersgd.min_compression_rate != defaults.min_compression_rate, why);
    p.ignored("use_error_feedback", powersgd.use_error_feedback != defaults.use_error_feedback, why);
    p.ignored("warm_start", powersgd.warm_start != defaults.warm_start, why);
    p.ignored("orthogonalization_epsilon", powersgd.orthogonalization_epsilon != defaults.orthogonalization_epsilon, why);
    p.ignored("seed", powersgd.seed != defaults.seed, why);
  }
  if (comm_hook == "fp16") o.comm_hook = ddp::fp16_compress_hook();
  else if (comm_hook == "bf16") o.comm_hook = ddp::bf16_compress_hook();
  else if (comm_hook == "powersgd") o.comm_hook = ddp::powersgd_hook(powersgd);
  else o.comm_hook = nullptr;  // the reducer's default: ddp::allreduce_hook()
  s.real("bucket_cap_mb", o.bucket_cap_mb, 0.0, 1e6, true);
  s.real("first_bucket_cap_mb", o.first_bucket_cap_mb, 0.0, 1e6, true);
  s.boolean("gradient_as_bucket_view", o.gradient_as_bucket_view);
  s.boolean("find_unused_parameters", o.find_unused_parameters);
  s.boolean("broadcast_buffers", o.broadcast_buffers);
  s.boolean("sync_batch_norm", o.sync_batch_norm);
  s.finish();
}

void read_data(Section s, DataConfig& o) {
  s.choice("dataset", o.dataset, {"fashion-mnist", "mnist", "cifar10", "synthetic"});
  s.string("dir", o.dir);
  s.integer("train_subset", o.train_subset, 0);
  s.integer("test_subset", o.test_subset, 0);
  s.integer("records_per_file", o.records_per_file, 0);
  if (o.dataset == "synthetic") {
    s.ignored("dir", o.dir != DataConfig{}.dir, "data.dataset is synthetic (generated, read from no directory)");
  }
  // Another value would be ignored. The default is let through: a cifar10 config that --print-config
  // wrote holds it (unless it was set), and may be run with another data set by --set.
  if (s.given("records_per_file") && o.dataset != "cifar10" && o.records_per_file != DataConfig{}.records_per_file) {
    s.fail_key("records_per_file", "only the cifar10 data set reads batch files of a fixed record count, but "
                                   "data.dataset is '" + o.dataset + "'");
  }
  // The synthetic data set is as large as these ask (make_datasets): bounded, so that a few zeros too
  // many are an error here rather than an index list of hundreds of GB.
  if (o.dataset == "synthetic") {
    auto bound = [&s](const std::string& key, int64_t size) {
      if (size > kMaxSyntheticSamples) {
        s.fail_key(key, "the synthetic data set holds at most " + std::to_string(kMaxSyntheticSamples) +
                            " samples (2^31), found " + std::to_string(size));
      }
    };
    bound("train_subset", o.train_subset);
    bound("test_subset", o.test_subset);
  }
  // Fashion-MNIST has a default directory (the Debian package's); the others have none.
  if ((o.dataset == "mnist" || o.dataset == "cifar10") && o.dir.empty()) {
    s.fail_key("dir", "is empty, but data.dataset " + o.dataset + " has no default directory: name the directory "
                      "that holds its files");
  }
  Section a = s.section("augment");
  a.integer("pad", o.augment.pad, 0, 64);
  a.boolean("hflip", o.augment.hflip);
  a.finish();
  s.finish();
}

void read_model(Section s, models::ResNet18Options& o) {
  std::string name = "resnet18";
  s.choice("name", name, {"resnet18"});
  s.integer("width", o.width, 1, 4096);
  s.integer("num_classes", o.num_classes, 1);
  s.integer("in_channels", o.in_channels, 1);
  std::string stem = models::to_string(o.stem);
  s.choice("stem", stem, {"imagenet", "small"});
  o.stem = models::parse_stem(stem);
  s.boolean("zero_init_residual", o.zero_init_residual);
  s.boolean("quantize_activations", o.quantize_activations);
  s.finish();
}

void read_optimizer(Section s, OptimizerConfig& o) {
  s.choice("name", o.name, {"sgd", "adam", "adamw"});
  s.real("lr", o.lr, 0.0, 1e6, true);
  s.real("momentum", o.momentum, 0.0, 1.0, false, true);
  s.real("weight_decay", o.weight_decay, 0.0);
  s.boolean("nesterov", o.nesterov);
  s.real("beta1", o.beta1, 0.0, 1.0, false, true);
  s.real("beta2", o.beta2, 0.0, 1.0, false, true);
  s.real("eps", o.eps, 0.0, 1.0, true);
  s.boolean("zero", o.zero);
  const OptimizerConfig defaults;
  if (o.name == "sgd") {
    const std::string why = "optimizer.name is sgd (it is adam's and adamw's)";
    s.ignored("beta1", o.beta1 != defaults.beta1, why);
    s.ignored("beta2", o.beta2 != defaults.beta2, why);
    s.ignored("eps", o.eps != defaults.eps, why);
  } else {
    const std::string why = "optimizer.name is " + o.name + " (it is sgd's)";
    s.ignored("momentum", o.momentum != defaults.momentum, why);
    s.ignored("nesterov", o.nesterov != defaults.nesterov, why);
  }
  if (o.name == "sgd" && o.nesterov && o.momentum <= 0) {
    std::ostringstream found;
    found << o.momentum;
    s.fail_key("nesterov", "Nesterov momentum needs optimizer.momentum > 0, found " + found.str());
  }
  s.finish();
}

// An enabled section's options checked as a whole (compress::validate); the error names the section.
template <typename Options>
void validate_section(const Section& s, const Options& options) {
  try {
    compress::validate(options);
  } catch (const Error& e) {
    s.fail_here(e.message());
  }
}

// A list of ECMAScript regular expressions (pruning and quantization's include / exclude).
void read_patterns(Section& s, const char* key, std::vector<std::string>& list) {
  s.strings(key, list);
  for (const auto& pattern : list) {
    try {
      std::regex check(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error&) {
      s.fail_key(key, "'" + pattern + "' is not a valid regular expression");
    }
  }
}

void read_pruning(Section s, PruningConfig& c) {
  compress::PruningOptions& o = c.options;
  s.boolean("enabled", c.enabled);
  std::string granularity = compress::to_string(o.granularity);
  s.choice("granularity", granularity, {"unstructured", "structured", "n:m"});
  o.granularity = compress::parse_prune_granularity(granularity);
  std::string scope = compress::to_string(o.scope);
  s.choice("scope", scope, {"layer", "global"});
  o.scope = compress::parse_prune_scope(scope);
  s.integer("n", o.n, 1, 1024);
  s.integer("m", o.m, 2, 1024);
  std::string schedule = compress::to_string(o.schedule);
  s.choice("schedule", schedule, {"one_shot", "gradual"});
  o.schedule = compress::parse_prune_schedule(schedule);
  s.real("initial_sparsity", o.initial_sparsity, 0.0, 1.0, false, true);
  s.real("target_sparsity", o.target_sparsity, 0.0, 1.0, false, true);
  s.integer("begin_step", o.begin_step, 0);
  s.integer("end_step", o.end_step, 0);
  s.integer("frequency", o.frequency, 1);
  s.real("begin_epoch", o.begin_epoch, 0.0);
  s.real("end_epoch", o.end_epoch, 0.0);
  read_patterns(s, "include", o.include);
  read_patterns(s, "exclude", o.exclude);
  s.boolean("print_table", o.print_table);
  s.string("permanent_path", o.permanent_path);
  s.finish();
  if (!c.enabled) return;  // keys of a section turned off on purpose: nothing to warn of
  // Note [Keys the chosen mode ignores]
  const compress::PruningOptions defaults;
  if (o.granularity == compress::PruneGranularity::NM) {
    const std::string why = "pruning.granularity is n:m, whose sparsity is 1 - n/m";
    s.ignored("target_sparsity", o.target_sparsity != defaults.target_sparsity, why);
    s.ignored("initial_sparsity", o.initial_sparsity != defaults.initial_sparsity, why);
  } else {
    const std::string why = "pruning.granularity is " + granularity + " (n and m are the n:m granularity's)";
    s.ignored("n", o.n != defaults.n, why);
    s.ignored("m", o.m != defaults.m, why);
  }
  if (o.schedule == compress::PruneSchedule::OneShot) {
    const std::string why = "pruning.schedule is one_shot, which prunes once, at begin_step or begin_epoch (" +
                            std::string("end_step, end_epoch, frequency and initial_sparsity are the gradual "
                                        "schedule's)");
    s.ignored("end_step", o.end_step != defaults.end_step, why);
    s.ignored("end_epoch", o.end_epoch != defaults.end_epoch, why);
    s.ignored("frequency", o.frequency != defaults.frequency, why);
    if (o.granularity != compress::PruneGranularity::NM) {
      s.ignored("initial_sparsity", o.initial_sparsity != defaults.initial_sparsity, why);
    }
  }
  validate_section(s, o);
}

void read_quantization(Section s, QuantizationConfig& c) {
  compress::QuantizationOptions& o = c.options;
  s.boolean("enabled", c.enabled);
  s.boolean("per_channel", o.per_channel);
  s.boolean("activations", o.activations);
  s.integer("begin_step", o.begin_step, 0);
  s.integer("freeze_step", o.freeze_step, -1);
  s.real("begin_epoch", o.begin_epoch, 0.0);
  s.real("freeze_epoch", o.freeze_epoch, 0.0);
  s.real("averaging_constant", o.averaging_constant, 0.0, 1.0, true);
  read_patterns(s, "include", o.include);
  read_patterns(s, "exclude", o.exclude);
  s.boolean("print_table", o.print_table);
  s.string("export_path", o.export_path);
  s.finish();
  if (c.enabled) validate_section(s, o);
}

void read_ema(Section s, EmaConfig& c, const ExperimentConfig& config) {
  train::EmaOptions& o = c.options;
  s.boolean("enabled", c.enabled);
  s.real("decay", o.decay, 0.0, 1.0, false, true);
  s.boolean("warmup", o.warmup);
  s.integer("every_steps", o.every_steps, 1);
  s.boolean("evaluate", o.evaluate);
  s.boolean("apply_at_end", o.apply_at_end);
  s.finish();
  // Note [EMA and pruning]: pruning zeroes weights after each step, which an average would undo (its
  // masked weights would decay instead of staying zero). Quantization composes: train_resnet adds the
  // average first, so evaluation and export quantize the averaged weights.
  if (c.enabled && config.pruning.enabled) {
    s.fail_key("enabled", "ema cannot be combined with pruning.enabled (an average of the weights would undo "
                          "the pruning masks)");
  }
  if (c.enabled && config.quantization.enabled && !config.quantization.options.export_path.empty() && o.evaluate &&
      !o.apply_at_end) {
    s.fail_key("apply_at_end", "ema.apply_at_end false with ema.evaluate and quantization.export_path: the int8 "
                               "file would hold the raw weights while the test metrics were the average's; set "
                               "apply_at_end to true (the file is then the evaluated average) or evaluate to false");
  }
}

void read_early_stopping(Section s, EarlyStoppingConfig& c, const ExperimentConfig& config) {
  train::EarlyStoppingOptions& o = c.options;
  s.boolean("enabled", c.enabled);
  s.string("monitor", o.monitor);
  s.choice("mode", o.mode, {"min", "max", "auto"});
  s.integer("patience", o.patience, 1);
  s.real("min_delta", o.min_delta, 0.0);
  s.boolean("restore_best_weights", o.restore_best_weights);
  if (o.monitor.empty()) s.fail_key("monitor", "expected a metric name such as test_loss or test_acc, found ''");
  // Note [Best weights and compression] (early_stopping.hpp). Pruning's case depends on the steps per
  // epoch, which MagnitudePruning checks when training begins.
  if (c.enabled && o.restore_best_weights && config.quantization.enabled) {
    s.fail_key("restore_best_weights", "early_stopping.restore_best_weights cannot be combined with "
                                       "quantization.enabled (the best epoch can come before quantization began, "
                                       "and putting its weights back would undo it); set it to false");
  }
  s.finish();
}

// How many places in `tree` hold `node` itself (the aliases of an anchor are all one node).
int occurrences(const YAML::Node& tree, const YAML::Node& node) {
  if (tree.is(node)) return 1;
  int n = 0;
  if (tree.IsMap()) {
    for (const auto& item : tree) n += occurrences(item.second, node);
  } else if (tree.IsSequence()) {
    for (const auto& item : tree) n += occurrences(item, node);
  }
  return n;
}

// "trainer.lr_schedule.kind" for {"trainer", "lr_schedule", "kind"}.
std::string dotted(const std::vector<std::string>& keys) {
  std::string path;
  for (const auto& key : keys) path += (path.empty() ? "" : ".") + key;
  return path;
}

// Writes `value` (YAML text) at the dotted `path` under `root` (in `document`), creating mappings on
// the way. Note [--set and YAML aliases]: assigning to an existing node writes through to the node
// it shares with every alias of its anchor (yaml-cpp's set_ref), so `--set trainer.lr_schedule.base_lr=0.05`
// with `base_lr: *lr` would also change `optimizer.lr: &lr 0.1`. So the leaf is removed and set anew,
// and a mapping on the way that is aliased elsewhere is replaced by a copy of its own (a copy loses
// the line numbers error messages quote, so only then).
void set_path(const YAML::Node& document, YAML::Node root, const std::vector<std::string>& keys, size_t i,
              const YAML::Node& value, const std::string& item, const std::string& source,
              const std::map<std::string, std::string>& origins) {
  const std::string& key = keys[i];
  int copies = 0;
  for (const auto& item : root) copies += item.first.IsScalar() && item.first.Scalar() == key ? 1 : 0;
  // A key given twice is an error the reader reports, naming both places; removing one copy here
  // would hide it, so nothing is written.
  if (copies > 1) return;
  if (i + 1 == keys.size()) {
    root.remove(key);
    root[key] = value;
    return;
  }
  // (Assigning one YAML::Node to another that refers to a node writes through as well: fresh
  // variables only.)
  const YAML::Node existing = root[key];
  // A scalar or a list on the way is not replaced by a mapping: where a section belongs it is the
  // file's error, which would vanish (`lr_schedule: cosine` with `--set trainer.lr_schedule.warmup_steps=100`
  // trained on a constant schedule), and elsewhere (`epochs: 3`) the --set names no key.
  if (existing.IsDefined() && !existing.IsNull() && !existing.IsMap()) {
    const std::string path = dotted({keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(i) + 1});
    // Where it was written: an earlier --set (its mark is in that argument's text), else the file.
    std::string place;
    if (const std::string* earlier = set_by(origins, path)) {
      place = " (from --set " + *earlier + ")";
    } else if (!existing.Mark().is_null()) {
      place = " at " + position(source, existing.Mark());
    }
    LOCKSTEP_FAIL("--set ", item, ": config key '", path, "'", place, " is ",
                  existing.IsScalar() ? "'" + existing.Scalar() + "'" : std::string("a list"),
                  ", not a mapping that could hold '", keys[i + 1], "'");
  }
  if (existing.IsMap() && occurrences(document, existing) == 1) {
    set_path(document, existing, keys, i + 1, value, item, source, origins);
    return;
  }
  YAML::Node child = existing.IsMap() ? YAML::Clone(existing) : YAML::Node(YAML::NodeType::Map);
  root.remove(key);
  root[key] = child;
  set_path(document, child, keys, i + 1, value, item, source, origins);
}

// The (key path, value) pairs a --set value writes: a non-empty mapping one pair per leaf (a scalar,
// a sequence or an empty mapping), recursively; anything else itself.
void expand_mapping(const std::vector<std::string>& keys, const YAML::Node& value, const std::string& item,
                    std::vector<std::pair<std::vector<std::string>, YAML::Node>>& out) {
  if (!value.IsMap() || value.size() == 0) {
    out.emplace_back(keys, value);
    return;
  }
  std::set<std::string> seen;
  for (const auto& entry : value) {
    LOCKSTEP_CHECK(entry.first.IsScalar() && !entry.first.Scalar().empty(), "--set ", item,
                   ": a key of the mapping is not a plain name");
    const std::string& key = entry.first.Scalar();
    std::vector<std::string> deeper = keys;
    deeper.push_back(key);
    LOCKSTEP_CHECK(seen.insert(key).second, "--set ", item, ": config key '", dotted(deeper),
                   "' is given twice in the mapping (each key may appear once)");
    expand_mapping(deeper, entry.second, item, out);
  }
}

}  // namespace

ExperimentConfig parse_config(const std::string& yaml, const std::string& source,
                              const std::vector<std::string>& overrides) {
  // Every document is read: YAML::Load would take the first and silently drop any after a '---' line.
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(yaml);
  } catch (const YAML::Exception& e) {
    LOCKSTEP_FAIL("config ", position(source, e.mark), ": invalid YAML: ", e.msg);
  }
  if (documents.size() > 1) {
    const YAML::Mark mark = documents[1].Mark();
    const std::string second =
        mark.is_null() ? "" : " (the second begins at " + position(source, mark) + ")";
    LOCKSTEP_FAIL("config ", source, ": expected one YAML document, found ", documents.size(), second,
                  "; a '---' line starts a new document: merge them into one");
  }
  YAML::Node root;
  if (!documents.empty()) root = documents[0];
  if (!root.IsDefined() || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  std::map<std::string, std::string> origins;
  for (const std::string& item : overrides) {
    const auto eq = item.find('=');
    LOCKSTEP_CHECK(eq != std::string::npos && eq > 0, "--set expects key.path=value, found '", item, "'");
    const std::string path = item.substr(0, eq);
    // getline drops a trailing empty part: "trainer.=3" would set trainer itself.
    LOCKSTEP_CHECK(path.front() != '.' && path.back() != '.', "--set ", item, ": empty key in the path '", path, "'");
    LOCKSTEP_CHECK(eq + 1 < item.size(), "--set ", item, ": no value after '='; write ", path,
                   "=\"\" for an empty string or ", path, "=[] for an empty list");
    std::vector<std::string> keys;
    std::stringstream parts(path);
    for (std::string key; std::getline(parts, key, '.');) {
      LOCKSTEP_CHECK(!key.empty(), "--set ", item, ": empty key in the path '", path, "'");
      keys.push_back(key);
    }
    YAML::Node value;
    try {
      value = YAML::Load(item.substr(eq + 1));
      LOCKSTEP_CHECK(YAML::LoadAll(item.substr(eq + 1)).size() <= 1, "--set ", item,
                     ": the value holds more than one YAML document (a '---' line starts another)");
    } catch (const YAML::Exception& e) {
      LOCKSTEP_FAIL("--set ", item, ": the value is not valid YAML: ", e.msg);
    }
    // Note [--set with a mapping]: `--set trainer.lr_schedule={warmup_steps: 100}` sets that key and
    // keeps the section's others (kind: cosine), as "override one key" promises; replacing the whole
    // section would silently drop them. An empty mapping ({}) still replaces: the section's defaults.
    std::vector<std::pair<std::vector<std::string>, YAML::Node>> leaves;
    expand_mapping(keys, value, item, leaves);
    for (const auto& [leaf_keys, leaf] : leaves) {
      if (root.IsMap()) set_path(root, root, leaf_keys, 0, leaf, item, source, origins);
      // Each key it wrote is this argument's; the section's other keys keep their places in the file.
      origins[dotted(leaf_keys)] = item;
    }
  }
  Reader reader(source, origins);
  ExperimentConfig config;
  Section top(reader, root, "");
  read_runtime(top.section("runtime"), config.runtime);
  read_trainer(top.section("trainer"), config.trainer, config.runtime);
  read_ddp(top.section("ddp"), config.trainer.ddp, config.ddp_comm_hook, config.ddp_powersgd);
  read_data(top.section("data"), config.data);
  read_model(top.section("model"), config.model);
  read_optimizer(top.section("optimizer"), config.optimizer);
  {
    // A cosine floor above its peak: known here when the peak is not scaled by the world size (the
    // trainer refused it at construction, after MPI started, naming no place).
    const train::LrScheduleOptions& lr = config.trainer.lr;
    const double peak = lr.base_lr > 0 ? lr.base_lr : config.optimizer.lr;
    if (lr.kind == train::LrScheduleKind::Cosine && !lr.scale_lr_with_world_size && lr.min_lr > peak) {
      top.section("trainer").section("lr_schedule").fail_key(
          "min_lr", "is " + detail::shortest_number(lr.min_lr) + ", above the cosine schedule's peak " +
                        detail::shortest_number(peak) + (lr.base_lr > 0 ? " (base_lr)" : " (optimizer.lr)") +
                        ": the schedule would rise instead of decaying");
    }
  }
  read_pruning(top.section("pruning"), config.pruning);
  read_quantization(top.section("quantization"), config.quantization);
  read_ema(top.section("ema"), config.ema, config);
  read_early_stopping(top.section("early_stopping"), config.early_stopping, config);
  top.finish();
  config.warnings = reader.warnings();
  // Activation quantization needs the model's fake-quant points (ExperimentConfig::quantization).
  if (config.quantization.enabled && config.quantization.options.activations) config.model.quantize_activations = true;
  return config;
}

ExperimentConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  // A directory opens as a stream that reads nothing: it would parse as the all-defaults config. A pipe
  // (--config <(sed ... base.yaml), /dev/stdin) reads like a file for one process; under a launcher
  // every rank reads the file itself, and a pipe feeds one reader only: the others would wait in open()
  // for a writer that has gone (before MPI starts, where no timeout runs), or read nothing.
  LOCKSTEP_CHECK(std::filesystem::exists(path), "config file '", path, "' does not exist");
  LOCKSTEP_CHECK(!std::filesystem::is_directory(path), "config file '", path, "' is a directory");
  const bool regular = std::filesystem::is_regular_file(path);
  LOCKSTEP_CHECK(regular || launcher_size() <= 1, "config file '", path,
                 "' is not a regular file (a pipe?), and every one of the launcher's ", launcher_size(),
                 " processes reads the config itself, which a pipe serves only one of: write it to a file");
  std::ifstream in(path);
  LOCKSTEP_CHECK(in.good(), "cannot open config file '", path, "'");
  std::stringstream text;
  text << in.rdbuf();
  LOCKSTEP_CHECK(!in.bad(), "cannot read config file '", path, "'");
  // /dev/null, or a pipe whose writer wrote nothing: not the all-defaults config by accident.
  LOCKSTEP_CHECK(regular || !text.str().empty(), "config file '", path, "' (not a regular file) read nothing");
  return parse_config(text.str(), path, overrides);
}

CommandLine parse_command_line(int argc, char** argv) {
  CommandLine cli;
  auto value_of = [&](int& i, const std::string& arg, const std::string& flag) -> std::string {
    if (arg.size() > flag.size() && arg[flag.size()] == '=') return arg.substr(flag.size() + 1);
    LOCKSTEP_CHECK(i + 1 < argc, flag, " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto is = [&](const std::string& flag) {
      return arg == flag || (arg.size() > flag.size() && arg.compare(0, flag.size() + 1, flag + "=") == 0);
    };
    if (is("--config")) {
      const std::string path = value_of(i, arg, "--config");
      // An empty value would otherwise read as "no --config" (the built-in default, where there is one).
      LOCKSTEP_CHECK(!path.empty(), "--config needs a file name, found an empty value");
      LOCKSTEP_CHECK(cli.config_path.empty(), "--config is given twice ('", cli.config_path, "' and '", path,
                     "'); give one config file (and --set for changes on top of it)");
      cli.config_path = path;
    } else if (is("--set")) {
      cli.overrides.push_back(value_of(i, arg, "--set"));
    } else if (arg == "--print-config") {
      cli.print_config = true;
    } else if (arg == "--help" || arg == "-h") {
      cli.help = true;
    } else {
      LOCKSTEP_FAIL("unknown command-line argument '", arg, "' (see --help)");
    }
  }
  return cli;
}

std::string usage(const std::string& program, bool built_in_default) {
  return "usage: " + program + (built_in_default ? " [--config FILE]" : " --config FILE") +
         " [--set key.path=value]... [--print-config] [--help]\n"
         "  --config FILE        YAML experiment configuration" +
         std::string(built_in_default ? " (default: the built-in one)\n" : " (required)\n") +
         "  --set key.path=value override one key, e.g. --set trainer.epochs=3 (repeatable); a mapping\n"
         "                       sets each key it holds and keeps the others: --set 'trainer.lr_schedule={warmup_steps: 100}'\n"
         "  --print-config       print the effective configuration as YAML and exit\n";
}

}  // namespace lockstep::config
