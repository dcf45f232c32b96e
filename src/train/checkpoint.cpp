#include "lockstep/train/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <charconv>
#include <exception>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "core/exception_text.hpp"
#include "ddp/parameter_order.hpp"
#include "lockstep/comm/agree.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/data/loader.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/zero_optimizer.hpp"
#include "lockstep/train/trainer.hpp"
#include "lockstep/train/model_tensors.hpp"
#include "train/atomic_file.hpp"
#include "train/checksum.hpp"

namespace lockstep::train {
namespace {

namespace fs = std::filesystem;
constexpr const char* kPrefix = "checkpoint-step";
constexpr const char* kSuffix = ".pt";
constexpr int64_t kFormatVersion = 1;

// fsync so that after the rename the file's data is on disk, not only its name (a crash between
// rename and writeback must not leave a complete-looking empty file). A failure is an error: a file
// whose data may not be on disk must not be reported as written.
void sync_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  LOCKSTEP_CHECK(fd >= 0, "cannot open ", path, " to sync it to disk: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  // A directory on a file system that cannot sync directories says EINVAL: nothing more to do there.
  LOCKSTEP_CHECK(rc == 0 || error == EINVAL, "cannot sync ", path, " to disk: ", std::strerror(error));
}

// A file to read: "does not exist" only where nothing is there. A directory named instead of a file in
// it (checkpoint.resume or init_from given the checkpoints directory) is said as such, with its newest.
void check_is_file(const std::string& path, const std::string& what) {
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  if (fs::is_regular_file(status)) return;
  LOCKSTEP_CHECK(fs::exists(status), what, " does not exist");
  if (fs::is_directory(status)) {
    const std::vector<std::string> inside = list_checkpoints(path);
    LOCKSTEP_FAIL(what, " is a directory; name a checkpoint file",
                  inside.empty() ? std::string(" (it holds none)")
                                 : " in it (its newest is " + inside.back() + ")",
                  ", or give checkpoint.resume: auto to resume from the run's newest checkpoint");
  }
  LOCKSTEP_FAIL(what, " is not a regular file");
}

int64_t read_int(torch::serialize::InputArchive& archive, const std::string& key) {
  c10::IValue value;
  archive.read(key, value);
  return value.toInt();
}

// A context built by hand may lack what the trainer sets.
void check_context(const TrainerContext& ctx, const std::string& context) {
  const char* missing = ctx.model == nullptr       ? "model"
                        : ctx.optimizer == nullptr ? "optimizer"
                        : ctx.communicator == nullptr ? "communicator"
                                                      : nullptr;
  LOCKSTEP_CHECK(missing == nullptr, context, ": the TrainerContext has no ", missing);
}

// Opens and checks the header of a checkpoint; throws a lockstep::Error naming it.
// Note [Checkpoints across devices]: the file keeps each tensor's device (a GPU run writes cuda:N
// tensors), and LibTorch would move them back there as it reads, which fails on a machine without
// that GPU (a CPU-only LibTorch, a GPU-less evaluation node) and lands on the writer's GPU rather than
// this rank's. So every tensor is read straight onto `device`: the model's device when loading
// into a model, else the CPU.
void open_checkpoint(torch::serialize::InputArchive& archive, const std::string& path,
                     const c10::Device& device = c10::Device(c10::kCPU)) {
  check_is_file(path, "checkpoint " + path);
  try {
    load_with_checksum(archive, path, device, "checkpoint " + path);  // Note [Checksummed files]
    const int64_t version = read_int(archive, "lockstep_checkpoint_version");
    LOCKSTEP_CHECK(version == kFormatVersion, "checkpoint ", path, " has format version ", version, ", expected ",
                   kFormatVersion);
    read_int(archive, "global_step");
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    LOCKSTEP_FAIL("checkpoint ", path, " is not a valid Lockstep checkpoint (truncated or corrupt?): ",
                  detail::exception_text(e));
  }
}

// Note [Load by copy]: Module::load() would set_() each parameter to the archive's storage. That
// swaps the storage under DataParallel, which holds on to the parameters' memory, and the next
// synchronised step no longer matches an uninterrupted run. So values are copied into the existing
// tensors instead (same hierarchy of nested archives as Module::save writes), and only once every
// one of them was found with the model's shape (Note [A checkpoint that does not fit]).
using ModelValues = std::vector<std::pair<at::Tensor, at::Tensor>>;  // (the model's tensor, the file's)

// How read_model_values treats a module of the model that the file does not hold.
enum class MissingModule {
  kRefuse,  // a checkpoint to resume: the run that wrote it had another model
  // Weights to start from (load_model_weights): a module without parameters keeps its values (the
  // activation ranges of ActivationFakeQuant points, added for QAT, start unobserved).
  kKeepWithoutParameters,
};

// Every parameter and buffer of `module` (recursively), found in `archive` with the model's shape, as
// (the model's tensor, the file's) pairs; `what` names the file in errors ("checkpoint <path>").
void read_model_values(torch::nn::Module& module, torch::serialize::InputArchive& archive, const std::string& prefix,
                       ModelValues& values, MissingModule missing, const std::string& what) {
  auto take = [&](const std::string& name, const at::Tensor& target, bool is_buffer) {
    at::Tensor source;
    LOCKSTEP_CHECK(archive.try_read(name, source, is_buffer), what, " holds no '", prefix + name, "' (a ",
                   is_buffer ? "buffer" : "parameter", " of the model, shape ", target.sizes(),
                   "): it was written from another model");
    LOCKSTEP_CHECK(source.sizes() == target.sizes(), "'", prefix + name, "' has shape ", source.sizes(), " in ", what,
                   " but ", target.sizes(), " in the model");
    values.emplace_back(target, std::move(source));
  };
  for (auto& item : module.named_parameters(/*recurse=*/false)) take(item.key(), item.value(), false);
  for (auto& item : module.named_buffers(/*recurse=*/false)) take(item.key(), item.value(), true);
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::InputArchive child_archive;
    if (archive.try_read(child.key(), child_archive)) {
      read_model_values(*child.value(), child_archive, prefix + child.key() + ".", values, missing, what);
      continue;
    }
    const bool has_parameters = !child.value()->parameters().empty();
    if (missing == MissingModule::kKeepWithoutParameters && !has_parameters) continue;
    if (!has_parameters) {
      LOCKSTEP_FAIL(what, " holds no module '", prefix + child.key(), "' (", child.value()->name(),
                    "), which this run's model has: the run that wrote it had no such module. Pruning adds "
                    "'pruning_masks', and model.quantize_activations adds ActivationFakeQuant modules. A resume "
                    "continues the run it was written by, with its options; to start from its weights with other "
                    "options (pruning or quantization-aware training from a trained model), set trainer.init_from "
                    "(TrainerOptions::init_from) to it in a new run (another output_dir)");
    }
    LOCKSTEP_FAIL(what, " holds no module '", prefix + child.key(), "' (", child.value()->name(),
                  "), which has parameters in this model: it was written from another model");
  }
}

// The device of the model's parameters (the CPU for a model without any).
c10::Device model_device(const TrainerContext& ctx) {
  if (ctx.model != nullptr) {
    for (const auto& parameter : ctx.model->parameters()) return parameter.device();
  }
  return c10::Device(c10::kCPU);
}

// Every rank's state of `generator`, gathered to all as float64 (which holds bytes exactly and which
// every backend gathers): [world, state bytes] as uint8.
at::Tensor gather_generator_states(comm::Communicator& comm, const at::Generator& generator) {
  at::Tensor state = generator.get_state().to(torch::kFloat64);
  at::Tensor all = torch::empty({comm.size() * state.numel()}, torch::kFloat64);
  comm.allgather(state, all)->wait();
  return all.to(torch::kUInt8).view({comm.size(), state.numel()});
}

void restore_generator_state(at::Generator generator, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state.to(at::kCPU).clone());
}

}  // namespace

void write_file_atomically(const std::string& path, const std::function<void(const std::string&)>& write) {
  const fs::path target(path);
  const fs::path directory = target.has_parent_path() ? target.parent_path() : fs::path(".");
  // Directories made here are synced into their parents too (after the file): a new checkpoints/
  // directory's own entry must reach the disk for the file in it to be found after a crash.
  std::vector<fs::path> made;
  for (fs::path d = directory; !d.empty() && !fs::exists(d); d = d.parent_path()) made.push_back(d);
  fs::create_directories(directory);
  const std::string temporary = path + ".tmp";
  try {
    write(temporary);
    sync_file(temporary);
    LOCKSTEP_CHECK(std::rename(temporary.c_str(), path.c_str()) == 0, "cannot rename ", temporary, " to ", path, ": ",
                   std::strerror(errno));
  } catch (...) {
    std::error_code ignored;
    fs::remove(temporary, ignored);  // a partial file left behind would only take space (a full disk, say)
    throw;
  }
  sync_file(directory.string());
  // Best effort: the file and its directory are on disk; a parent this process may not open (a 711
  // scratch directory) must not make a complete file a failed write.
  for (const fs::path& d : made) {
    try {
      sync_file((d.has_parent_path() ? d.parent_path() : fs::path(".")).string());
    } catch (const Error&) {
    }
  }
}

void run_on_rank0(const TrainerContext& ctx, const std::function<void()>& work, const std::string& context) {
  if (ctx.communicator != nullptr) {
    comm::run_on_root(*ctx.communicator, 0, work, context);
  } else if (ctx.world.rank == 0) {
    work();
  }
}

std::string checkpoint_file_name(int64_t global_step) {
  char name[64];
  std::snprintf(name, sizeof name, "%s%08lld%s", kPrefix, static_cast<long long>(global_step), kSuffix);
  return name;
}

namespace {
// The checkpoints in `directory` with their steps, lowest step first.
std::vector<std::pair<int64_t, std::string>> checkpoints_by_step(const std::string& directory) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code error;
  if (!fs::is_directory(directory, error)) return {};
  for (const auto& entry : fs::directory_iterator(directory)) {
    const std::string name = entry.path().filename().string();
    const std::string prefix = kPrefix, suffix = kSuffix;
    if (name.size() <= prefix.size() + suffix.size() || name.compare(0, prefix.size(), prefix) != 0 ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    const std::string digits = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
    if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit)) continue;
    int64_t step = 0;
    const auto [end, status] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
    if (status != std::errc() || end != digits.data() + digits.size()) continue;  // past int64: not ours
    found.emplace_back(step, entry.path().string());
  }
  std::sort(found.begin(), found.end());
  return found;
}
}  // namespace

namespace {
// Note [Data order in a checkpoint]: a position inside an epoch means "the first `position` samples
// of this epoch's order were trained on", and that order follows from the data set's size, the seed,
// the shuffle and (for the step count) the batch size and accumulation. A run resumed mid-epoch with
// another of them would skip samples it never saw and repeat others, silently; so they are written
// beside the position and compared on load. At an epoch's start the seed and the shuffle may change
// (nothing of the epoch was seen), but not what sets the steps per epoch (the training set size, the
// batch size, drop_last_batch, accumulation): the learning-rate schedule is a function of the global
// step and the steps per epoch, so the steps already taken would count as other epochs (a cosine
// schedule resumed with twice the accumulation ends at min_lr at once).
struct DataOrderEntry {
  std::string key;
  int64_t value;
  bool sets_steps;  // changes the steps per epoch
  bool sets_order;  // changes the order of an epoch's samples
};
// Note [A finished run's metrics]: a checkpoint at an epoch's end holds that epoch's metrics (a nested
// archive of doubles, nan and inf included), so that the same command run again after the run completed
// (no epoch left to train) still returns them from fit() instead of nothing.

std::vector<DataOrderEntry> data_order(const TrainerContext& ctx) {
  std::vector<DataOrderEntry> out;
  if (ctx.train_loader == nullptr) return out;
  const data::ShardedSampler& sampler = *ctx.train_loader->sampler();
  out.push_back({"the training set size", static_cast<int64_t>(sampler.dataset_size()), true, true});
  out.push_back({"seed", static_cast<int64_t>(sampler.options().seed), false, true});
  out.push_back({"shuffle", sampler.options().shuffle ? 1 : 0, false, true});
  out.push_back({"batch_size", static_cast<int64_t>(ctx.train_loader->options().batch_size), true, false});
  out.push_back({"drop_last_batch", ctx.train_loader->options().drop_last_batch ? 1 : 0, true, false});
  if (ctx.options != nullptr) out.push_back({"accumulation_steps", ctx.options->accumulation_steps, true, false});
  return out;
}
}  // namespace

std::vector<std::string> list_checkpoints(const std::string& directory) {
  std::vector<std::string> paths;
  for (auto& item : checkpoints_by_step(directory)) paths.push_back(std::move(item.second));
  return paths;
}

Checkpointer::Checkpointer(CheckpointOptions options) : options_(std::move(options)) {
  LOCKSTEP_CHECK(!options_.directory.empty(), "Checkpointer: CheckpointOptions::directory is empty");
  LOCKSTEP_CHECK(options_.every_steps >= 0, "CheckpointOptions::every_steps must be >= 0, got ",
                 options_.every_steps);
  LOCKSTEP_CHECK(options_.keep_last >= 0, "CheckpointOptions::keep_last must be >= 0, got ", options_.keep_last);
}

void Checkpointer::save(TrainerContext& ctx, const data::SamplerState& position) {
  check_context(ctx, "Checkpointer: cannot save");
  comm::Communicator& comm = *ctx.communicator;
  const int rank = comm.rank();
  const int world = comm.size();
  // Every rank's generator state (they differ: seeded with seed + rank); on a GPU also the model's
  // device generator, which dropout and other random ops on the GPU draw from.
  const at::Tensor cpu_states = gather_generator_states(comm, at::detail::getDefaultCPUGenerator());
  const c10::Device device = model_device(ctx);
  at::Tensor device_states;
  if (device.is_cuda()) device_states = gather_generator_states(comm, at::globalContext().defaultGenerator(device));

  // Note [ZeRO checkpoints]: a sharded optimizer state is gathered (collectively) before rank 0 writes.
  if (auto* sharded = dynamic_cast<ddp::ZeroRedundancyOptimizer*>(ctx.optimizer)) sharded->consolidate_state();

  // Note [Callback state]: every rank asks every callback, in order, so that a callback may gather
  // per-rank state with collectives (PowerSGD's residuals); rank 0's answers are written. The keys
  // are checked on every rank too, so that all ranks fail alike; and a callback's save_state() or
  // save_tensors() that throws on some ranks only is every rank's error at once (run_on_every_rank),
  // where the others would have gone on to wait for rank 0's file until the timeout, told of its disk.
  // (Not for a failure inside a callback's own collectives, such as PowerSGD's gather_state: a rank
  // that fails before its part of them leaves the others there; the callback must agree itself.)
  struct CallbackState {
    std::string key, text;
    std::vector<at::Tensor> tensors;
  };
  std::vector<CallbackState> callback_states;
  if (ctx.callbacks != nullptr) {
    comm::run_on_every_rank(*ctx.communicator, [&] {
      std::set<std::string> keys;
      for (const auto& cb : *ctx.callbacks) {
        std::string key = cb->state_key();
        if (key.empty()) continue;
        LOCKSTEP_CHECK(std::all_of(key.begin(), key.end(),
                                   [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }),
                       "callback state_key '", key, "' must contain only letters, digits and '_'");
        LOCKSTEP_CHECK(keys.insert(key).second, "two callbacks have the state_key '", key,
                       "': each would overwrite the other's state in the checkpoint");
        CallbackState saved;
        try {
          saved = CallbackState{key, cb->save_state(), cb->save_tensors()};
        } catch (const std::exception& e) {
          LOCKSTEP_FAIL("the callback with state_key '", key, "' could not give its state: ", detail::exception_text(e));
        }
        if (rank == 0) callback_states.push_back(std::move(saved));
      }
    }, "Checkpointer: could not take the callbacks' state for the checkpoint of step " + std::to_string(ctx.global_step));
  }

  const std::string final_path = (fs::path(options_.directory) / checkpoint_file_name(ctx.global_step)).string();
  // Note [A failed checkpoint]: only rank 0 writes, so only rank 0 would see a full disk or a
  // read-only directory, and the others would wait for it in the next step's collectives until they
  // timed out; run_on_root makes its error every rank's, at once. Files written only by rank 0
  // (metrics.jsonl) do the same.
  const auto write = [&] {
    torch::serialize::OutputArchive archive;
    archive.write("lockstep_checkpoint_version", c10::IValue(kFormatVersion));
    archive.write("global_step", c10::IValue(ctx.global_step));
    archive.write("epoch", c10::IValue(position.epoch));
    archive.write("position", c10::IValue(position.position));
    archive.write("world_size", c10::IValue(static_cast<int64_t>(world)));
    archive.write("total_steps", c10::IValue(ctx.total_steps));  // Note [A cosine schedule stretched]
    if (position.position == 0 && !ctx.metrics.empty()) {  // Note [A finished run's metrics]
      torch::serialize::OutputArchive metrics;
      for (const auto& [key, value] : ctx.metrics) metrics.write(key, c10::IValue(value));
      archive.write("last_epoch_metrics", metrics);
    }
    {  // Note [Data order in a checkpoint]
      torch::serialize::OutputArchive order;
      for (const auto& entry : data_order(ctx)) order.write(entry.key, c10::IValue(entry.value));
      archive.write("data_order", order);
    }
    if (ctx.data_parallel != nullptr) {  // Note [Iteration across a resume]
      archive.write("ddp_synchronized_backwards",
                    c10::IValue(static_cast<int64_t>(ctx.data_parallel->synchronized_backwards())));
      const std::vector<std::int64_t>& order = ctx.data_parallel->bucket_order();
      if (!order.empty()) {  // Note [Bucket order across a resume] (reducer.cpp)
        archive.write("ddp_bucket_order", at::tensor(at::ArrayRef<std::int64_t>(order), at::kLong));
      }
    }
    torch::serialize::OutputArchive model_archive;
    ctx.model->save(model_archive);
    archive.write("model", model_archive);
    torch::serialize::OutputArchive optimizer_archive;
    ctx.optimizer->save(optimizer_archive);
    archive.write("optimizer", optimizer_archive);
    archive.write("rng_states", cpu_states);
    if (device_states.defined()) archive.write("cuda_rng_states", device_states);
    for (const CallbackState& saved : callback_states) {
      archive.write("callback_" + saved.key, c10::IValue(saved.text));
      if (!saved.tensors.empty()) {
        torch::serialize::OutputArchive part;
        part.write("count", c10::IValue(static_cast<int64_t>(saved.tensors.size())));
        for (size_t i = 0; i < saved.tensors.size(); ++i) part.write("t" + std::to_string(i), saved.tensors[i]);
        archive.write("callback_tensors_" + saved.key, part);
      }
    }
    write_file_atomically(final_path, [&](const std::string& temporary) { save_with_checksum(archive, temporary); });
    if (options_.keep_last > 0) {
      // Note [Pruning checkpoints]: only this run's files count, those up to the step just written;
      // a file of a later step is another run's (a resume from an explicit older checkpoint), not
      // an older one of ours, and the file just written is never the one removed.
      // The new file is complete and in place: a directory that cannot be listed now (out of file
      // descriptors) costs old files their removal, not the checkpoint; said, not raised.
      try {
        std::vector<std::pair<int64_t, std::string>> ours = checkpoints_by_step(options_.directory);
        ours.erase(
            std::remove_if(ours.begin(), ours.end(), [&](const auto& item) { return item.first > ctx.global_step; }),
            ours.end());
        for (size_t i = 0; i + static_cast<size_t>(options_.keep_last) < ours.size(); ++i) {
          if (ours[i].first == ctx.global_step) continue;
          std::error_code ignored;
          fs::remove(ours[i].second, ignored);
        }
      } catch (const std::exception& e) {
        std::cerr << "lockstep: warning: the checkpoint of step " << ctx.global_step << " was written, but older "
                  << "ones were not removed (checkpoint.keep_last " << options_.keep_last << "): "
                  << detail::exception_text(e) << std::endl;
      }
    }
  };
  run_on_rank0(ctx, write,
               "Checkpointer: could not write the checkpoint of step " + std::to_string(ctx.global_step) + " (" +
                   final_path + ")");
  last_saved_step_ = ctx.global_step;
  last_saved_position_ = position;
  last_path_ = final_path;
}

// Note [A checkpoint that does not fit]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A program may catch a refused checkpoint and start afresh (or try an older file). That is safe only
// if the refusal changed nothing, on any rank, so load() goes in three parts, each finished on every
// rank before the next begins:
//   1. Through comm::run_on_every_rank: read the whole file and check what it says about the run
//      (world size, data order) and the model's names and shapes, changing nothing; then, after a
//      snapshot of both, take the random-number states and the optimizer's state (its own checks).
//   2. Through comm::run_on_every_rank: hand the callbacks their states (their own checks).
//   3. Copy the model's values (checked in part 1: they cannot fail) and set the trainer's position.
// Should part 1 or 2 fail on any rank, every rank puts the random-number states and the optimizer back
// and raises. So a checkpoint of another model (a layer more, a layer of another shape) or of another
// optimizer, on one rank or on all, leaves every rank's model, optimizer, callbacks, random-number
// states and position as they were; one whose state a callback refuses leaves all but the callbacks'
// (those that took their state keep it, on every rank where they did: callbacks cannot be put back).
namespace {

// A callback's checkpointed state, read in part 1 and handed over in part 2.
struct CallbackState {
  Callback* callback;
  std::optional<std::string> text;
  std::optional<std::vector<at::Tensor>> tensors;
};

// What part 1 read, for parts 2 and 3 to take.
struct Taken {
  ModelValues model_values;  // Note [Load by copy]
  int64_t global_step = 0;
  data::SamplerState position;
  std::optional<std::uint64_t> synchronized_backwards;        // Note [Iteration across a resume]
  std::optional<std::vector<std::int64_t>> bucket_order;      // Note [Bucket order across a resume]
  std::optional<std::map<std::string, double>> last_metrics;  // Note [A finished run's metrics]
  std::optional<int64_t> total_steps;                         // the run's length then; older files have none
  std::vector<CallbackState> callbacks;
};

// The optimizer's state and options, to put back. Optimizer::load replaces the state's entries and
// options rather than writing into their tensors, so copies of the entries (which share the tensors)
// restore it. ZeroRedundancyOptimizer keeps its state in its local optimizer (a refused load leaves its
// consolidated copy dropped: Checkpointer::save consolidates again).
class OptimizerSnapshot {
 public:
  explicit OptimizerSnapshot(torch::optim::Optimizer& optimizer) : optimizer_(holder(optimizer)) {
    try {
      for (const auto& entry : optimizer_.state()) state_.emplace(entry.first, entry.second->clone());
      for (auto& group : optimizer_.param_groups()) options_.push_back(group.options().clone());
      taken_ = true;
    } catch (const std::exception&) {
      // An optimizer of the program's own whose state cannot be cloned (LibTorch's base clone()
      // throws): loaded without a way back, as before snapshots.
    }
  }
  void restore() {  // once
    if (!taken_) return;
    optimizer_.state() = std::move(state_);
    for (size_t i = 0; i < options_.size(); ++i) optimizer_.param_groups()[i].set_options(std::move(options_[i]));
  }

 private:
  static torch::optim::Optimizer& holder(torch::optim::Optimizer& optimizer) {
    if (auto* zero = dynamic_cast<ddp::ZeroRedundancyOptimizer*>(&optimizer)) return zero->local();
    return optimizer;
  }
  torch::optim::Optimizer& optimizer_;
  bool taken_ = false;
  std::decay_t<decltype(std::declval<torch::optim::Optimizer&>().state())> state_;
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options_;
};

// What part 1 changes, to put back when some rank refused: taken before anything changes.
class Undo {
 public:
  Undo(std::optional<c10::Device> device, torch::optim::Optimizer& optimizer)
      : device_(device), cpu_(at::detail::getDefaultCPUGenerator().get_state()), optimizer_(optimizer) {
    if (device_) device_state_ = at::globalContext().defaultGenerator(*device_).get_state();
  }
  void restore() {
    restore_generator_state(at::detail::getDefaultCPUGenerator(), cpu_);
    if (device_) restore_generator_state(at::globalContext().defaultGenerator(*device_), device_state_);
    optimizer_.restore();
  }

 private:
  std::optional<c10::Device> device_;  // a CUDA device whose generator part 1 sets
  at::Tensor cpu_, device_state_;
  OptimizerSnapshot optimizer_;
};

// Runs `work`, reporting an exception other than a lockstep::Error as the file not fitting.
void as_load_error(const std::string& path, const std::function<void()>& work) {
  try {
    work();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    LOCKSTEP_FAIL("checkpoint ", path, " could not be loaded (does it belong to this model and optimizer?): ",
                  detail::exception_text(e));
  }
}

// Part 1 on this rank: `undo` is set before anything changes.
Taken read_and_take_optimizer(TrainerContext& ctx, const std::string& path, std::optional<Undo>& undo) {
  // Note [Checkpoints across devices]: onto the model's device, so that the optimizer's state
  // (momentum buffers) lands beside the parameters it updates, whichever device wrote the file.
  const c10::Device device = model_device(ctx);
  torch::serialize::InputArchive archive;
  open_checkpoint(archive, path, device);
  const int rank = ctx.communicator->rank();
  const int world = ctx.communicator->size();
  Taken taken;
  as_load_error(path, [&] {
    const int64_t saved_world = read_int(archive, "world_size");
    LOCKSTEP_CHECK(saved_world == world, "checkpoint ", path, " was written by ", saved_world,
                   " ranks but this job has ", world,
                   ": the train sampler's position is per rank, so resume with the same world size");
    taken.global_step = read_int(archive, "global_step");
    taken.position.epoch = read_int(archive, "epoch");
    taken.position.position = read_int(archive, "position");
    const int64_t global_step = taken.global_step;
    const data::SamplerState& position = taken.position;
    torch::serialize::InputArchive order;  // Note [Data order in a checkpoint]; older files have none
    if (archive.try_read("data_order", order)) {
      // Inside an epoch its sample order must be the same; anywhere, the steps per epoch. Each refusal
      // gives its own reason (a new batch size keeps the order but not the steps).
      const bool inside = position.position > 0;
      std::string changed;
      bool order_changed = false;
      for (const auto& entry : data_order(ctx)) {
        c10::IValue saved;
        if ((inside || entry.sets_steps) && order.try_read(entry.key, saved) && saved.toInt() != entry.value) {
          changed += (changed.empty() ? "" : ", ") + entry.key + " " + std::to_string(saved.toInt()) + " then, " +
                     std::to_string(entry.value) + " now";
          order_changed = order_changed || entry.sets_order;
        }
      }
      if (inside && order_changed) {
        LOCKSTEP_FAIL("checkpoint ", path, " stopped inside epoch ", position.epoch + 1, " (", position.position,
                      " samples of this rank's share done), and the order of that epoch's samples has changed since (",
                      changed, "): resuming would skip samples never trained on and repeat others. Resume with the "
                      "same data and options");
      } else {
        LOCKSTEP_CHECK(changed.empty(), "checkpoint ", path, " was written with other steps per epoch (", changed,
                       "): the learning-rate schedule counts global steps in epochs, so the ", global_step,
                       " steps taken would count as other epochs. Resume with the same data and batch options, or "
                       "start a new run (checkpoint.resume: never) from the model");
      }
    }
    torch::serialize::InputArchive model_archive;
    archive.read("model", model_archive);
    read_model_values(*ctx.model, model_archive, "", taken.model_values, MissingModule::kRefuse, "checkpoint " + path);
    torch::serialize::InputArchive optimizer_archive;
    archive.read("optimizer", optimizer_archive);
    at::Tensor states;
    archive.read("rng_states", states);
    // A checkpoint written on the CPU has no device states (the GPU generator keeps the run's seed),
    // and one written on a GPU resumed on the CPU does not need them.
    at::Tensor device_states;
    const bool device_rng = device.is_cuda() && archive.try_read("cuda_rng_states", device_states);
    LOCKSTEP_CHECK(states.dim() >= 1 && states.size(0) == world && (!device_rng || (device_states.dim() >= 1 &&
                                                                                      device_states.size(0) == world)),
                   "checkpoint ", path, " does not hold one random-number state per rank");
    if (ctx.callbacks != nullptr) {
      for (const auto& cb : *ctx.callbacks) {
        const std::string key = cb->state_key();
        if (key.empty()) continue;
        CallbackState state{cb.get(), std::nullopt, std::nullopt};
        c10::IValue value;
        if (archive.try_read("callback_" + key, value)) state.text = value.toStringRef();
        torch::serialize::InputArchive part;
        if (archive.try_read("callback_tensors_" + key, part)) {
          std::vector<at::Tensor> tensors(static_cast<size_t>(read_int(part, "count")));
          for (size_t i = 0; i < tensors.size(); ++i) part.read("t" + std::to_string(i), tensors[i]);
          state.tensors = std::move(tensors);
        }
        taken.callbacks.push_back(std::move(state));
      }
    }
    c10::IValue total;
    if (archive.try_read("total_steps", total)) taken.total_steps = total.toInt();
    c10::IValue synchronized;
    if (ctx.data_parallel != nullptr && archive.try_read("ddp_synchronized_backwards", synchronized)) {
      taken.synchronized_backwards = static_cast<std::uint64_t>(synchronized.toInt());
    }
    at::Tensor bucket_order;
    if (ctx.data_parallel != nullptr && archive.try_read("ddp_bucket_order", bucket_order)) {
      // Note [Bucket order across a resume]: checked here, so that a refusal changes nothing.
      bucket_order = bucket_order.to(at::kCPU, at::kLong).contiguous().reshape({-1});
      std::vector<std::int64_t> order(bucket_order.data_ptr<int64_t>(),
                                      bucket_order.data_ptr<int64_t>() + bucket_order.numel());
      const std::size_t n = ctx.data_parallel->reducer().parameter_count();
      LOCKSTEP_CHECK(ddp::is_parameter_order(order, n), "checkpoint ", path, " holds a bucket order of ",
                     order.size(), " entries that is not an order of this model's ", n,
                     " parameters under DataParallel");
      taken.bucket_order = std::move(order);
    }
    torch::serialize::InputArchive metrics;
    if (position.position == 0 && archive.try_read("last_epoch_metrics", metrics)) {
      taken.last_metrics.emplace();
      for (const std::string& key : metrics.keys()) {
        c10::IValue value;
        if (metrics.try_read(key, value) && value.isDouble()) (*taken.last_metrics)[key] = value.toDouble();  // not "training"
      }
    }

    undo.emplace(device_rng ? std::optional<c10::Device>(device) : std::nullopt, *ctx.optimizer);
    restore_generator_state(at::detail::getDefaultCPUGenerator(), states[rank]);
    if (device_rng) restore_generator_state(at::globalContext().defaultGenerator(device), device_states[rank]);
    ctx.optimizer->load(optimizer_archive);
  });
  return taken;
}

}  // namespace

void load_model_weights(torch::nn::Module& model, const std::string& path) {
  const std::string what = "weights file " + path;
  check_is_file(path, what);
  torch::serialize::InputArchive archive;
  try {
    // Onto the CPU: a checkpoint's optimizer state and callbacks' tensors, read with the model's
    // values, do not take device memory. copy_ moves the values to the model's device.
    load_with_checksum(archive, path, c10::Device(c10::kCPU), what);  // Note [Checksummed files]
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    LOCKSTEP_FAIL(what, " is neither a model file nor a Lockstep checkpoint: ", detail::exception_text(e));
  }
  // A checkpoint holds the model under "model", beside its step.
  c10::IValue step;
  torch::serialize::InputArchive checkpoint_model;
  const bool checkpoint = archive.try_read("global_step", step) && archive.try_read("model", checkpoint_model);
  ModelValues values;
  read_model_values(model, checkpoint ? checkpoint_model : archive, "", values,
                    MissingModule::kKeepWithoutParameters, what);
  torch::NoGradGuard no_grad;
  for (auto& [target, source] : values) target.copy_(source);  // Note [Load by copy]
}

void Checkpointer::load(TrainerContext& ctx, const std::string& path) {
  load(ctx, path, "Checkpointer: cannot load " + path);
}

void Checkpointer::load(TrainerContext& ctx, const std::string& path, const std::string& context) {
  check_context(ctx, context);
  Taken taken;
  std::optional<Undo> undo;
  try {
    comm::run_on_every_rank(*ctx.communicator, [&] { taken = read_and_take_optimizer(ctx, path, undo); }, context);
    comm::run_on_every_rank(*ctx.communicator, [&] {
      as_load_error(path, [&] {
        for (CallbackState& state : taken.callbacks) {
          if (state.text) state.callback->load_state(*state.text);
          if (state.tensors) state.callback->load_tensors(std::move(*state.tensors));
        }
      });
    }, context);
  } catch (...) {
    if (undo) undo->restore();
    throw;
  }
  {
    torch::NoGradGuard no_grad;
    for (auto& [target, source] : taken.model_values) target.copy_(source);
  }
  ctx.global_step = taken.global_step;
  if (taken.synchronized_backwards) ctx.data_parallel->set_synchronized_backwards(*taken.synchronized_backwards);
  if (taken.bucket_order) ctx.data_parallel->set_bucket_order(*taken.bucket_order);
  ctx.epoch = taken.position.epoch;
  ctx.resume_position = taken.position;
  if (taken.last_metrics) ctx.metrics = std::move(*taken.last_metrics);
  // Note [A cosine schedule stretched]: the cosine schedule decays over the run's total steps, so a
  // resume with other epochs (raised to train on) moves the learning rate at the step resumed: from
  // near min_lr back towards the base. Allowed (it is how a longer run continues), but said. A step
  // still in the warmup, which does not depend on the length, has no jump.
  if (ctx.communicator->rank() == 0 && taken.total_steps && ctx.total_steps > 0 && ctx.steps_per_epoch > 0 &&
      *taken.total_steps != ctx.total_steps && ctx.options != nullptr &&
      ctx.options->lr.kind == LrScheduleKind::Cosine) {
    const int64_t step = taken.global_step;
    const auto decayed = [&](int64_t total) {
      return cosine_progress(ctx.options->lr, step, ctx.steps_per_epoch, total);
    };
    if (decayed(*taken.total_steps) != decayed(ctx.total_steps)) {
      std::printf("lockstep: warning: %s was written by a run of %lld steps and this run has %lld: the cosine "
                  "learning-rate schedule now decays over the new length, so at step %lld it is %.0f%% through "
                  "its decay, not %.0f%% (the learning rate jumps %s)\n",
                  path.c_str(), static_cast<long long>(*taken.total_steps), static_cast<long long>(ctx.total_steps),
                  static_cast<long long>(step), 100.0 * decayed(ctx.total_steps), 100.0 * decayed(*taken.total_steps),
                  decayed(ctx.total_steps) < decayed(*taken.total_steps) ? "up" : "down");
      std::fflush(stdout);
    }
  }
  last_saved_step_ = ctx.global_step;
  last_saved_position_ = taken.position;
  last_path_ = path;
}

// A choice will_resume() made for a fit() that failed before on_train_begin is not this fit()'s.
void Checkpointer::on_setup(TrainerContext&) { chosen_.reset(); }

void Checkpointer::on_train_begin(TrainerContext& ctx) {
  if (ctx.model != nullptr) check_names_readable(*ctx.model, "Checkpointer");  // before any step is lost
  resume(ctx);
  first_step_ = ctx.global_step;
}

// Note [Starting over]: `resume: never` in a directory that holds an earlier run's checkpoints must
// not mix the two runs: a later `resume: auto` (after a crash, or the same command with the default)
// would pick the earlier run's newest file whenever its step is higher, and pruning would count the
// earlier run's files as this run's. Nothing is deleted either: rank 0 moves them into a folder of
// their own, "previous-run-<UTC time>", beside where this run's go. The same holds after a resume
// from a named checkpoint of step N: the directory's files of later steps belong to the run that went
// on from N before (abandoned now), and a later `resume: auto` (a preempted job requeued) would pick
// the newest of them over this run's own; so those are moved aside too, and the file N stays.
void Checkpointer::set_aside_earlier_run(int64_t after_step) const {
  std::vector<std::string> earlier;
  for (auto& [step, path] : checkpoints_by_step(options_.directory)) {
    if (step > after_step) earlier.push_back(std::move(path));
  }
  if (earlier.empty()) return;
  const std::string why = after_step < 0 ? "checkpoint.resume is 'never'"
                                         : "resumed from a named checkpoint of step " + std::to_string(after_step);
  char stamp[32];
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &utc);
  fs::path aside = fs::path(options_.directory) / (std::string("previous-run-") + stamp);
  for (int n = 2; fs::exists(aside); ++n) {
    aside = fs::path(options_.directory) / (std::string("previous-run-") + stamp + "-" + std::to_string(n));
  }
  std::error_code error;
  fs::create_directories(aside, error);
  LOCKSTEP_CHECK(!error, why, ", but the earlier run's checkpoints in ", options_.directory,
                 " cannot be moved aside: cannot create ", aside.string(), ": ", error.message());
  for (const std::string& path : earlier) {
    fs::rename(path, aside / fs::path(path).filename(), error);
    LOCKSTEP_CHECK(!error, why, ", but cannot move the earlier run's ", path, " into ", aside.string(), ": ",
                   error.message());
  }
  sync_file(options_.directory);
  std::printf("%s: moved %zu checkpoint(s) of an earlier run%s into %s\n", why.c_str(), earlier.size(),
              after_step < 0 ? "" : " (of later steps)", aside.string().c_str());
  std::fflush(stdout);
}

bool Checkpointer::will_resume(TrainerContext& ctx) {
  if (!chosen_) chosen_ = choose_resume(ctx);
  return !chosen_->empty();
}

std::string Checkpointer::choose_resume(TrainerContext& ctx) {
  if (options_.resume == "never") return "";
  check_context(ctx, "Checkpointer: cannot resume");
  std::string path;
  if (options_.resume == "auto") {
    // Rank 0 picks the newest checkpoint that opens, and every rank loads that one.
    double chosen = -1;
    run_on_rank0(ctx, [&] {
      std::vector<std::string> candidates = list_checkpoints(options_.directory);
      for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
        try {
          torch::serialize::InputArchive archive;
          open_checkpoint(archive, *it);
          chosen = static_cast<double>(read_int(archive, "global_step"));
          break;
        } catch (const std::exception& e) {
          std::cerr << "lockstep: warning: skipping checkpoint " << *it << ": "
                    << detail::exception_text(e) << "\n";
        }
      }
    }, "Checkpointer: cannot list the checkpoints in " + options_.directory);
    at::Tensor choice = torch::full({1}, chosen, torch::kFloat64);
    ctx.communicator->broadcast(choice)->wait();
    chosen = choice.item<double>();
    if (chosen < 0) return "";
    path = (fs::path(options_.directory) / checkpoint_file_name(static_cast<int64_t>(chosen))).string();
  } else {
    path = options_.resume;
  }
  return path;
}

void Checkpointer::resume(TrainerContext& ctx) {
  // Collectives (run_on_rank0): should rank 0 fail to read or move the directory, every rank raises.
  if (options_.resume == "never") {
    run_on_rank0(ctx, [&] { set_aside_earlier_run(); }, "Checkpointer");
    return;
  }
  // Chosen already when the trainer asked will_resume() (a run with init_from).
  const std::string path = chosen_ ? *chosen_ : choose_resume(ctx);
  chosen_.reset();  // a later fit() chooses again
  if (path.empty()) return;
  // Collective: a rank that cannot load (the file missing or unreadable on its node, a bad copy)
  // fails every rank here, rather than the others training on into collectives it never joins.
  load(ctx, path, "Checkpointer: cannot resume from " + path);
  if (options_.resume != "auto") {  // Note [Starting over]: the run that went on from it before
    const int64_t step = ctx.global_step;
    run_on_rank0(ctx, [&] { set_aside_earlier_run(step); }, "Checkpointer");
  }
  if (ctx.communicator->rank() == 0) {
    const int64_t epochs = ctx.options != nullptr ? ctx.options->epochs : -1;
    if (ctx.resume_position->position == 0 && epochs >= 0 && ctx.resume_position->epoch >= epochs) {
      std::printf("resumed from %s (step %lld): the run is complete (%lld of %lld epochs), nothing left to train; "
                  "raise trainer.epochs to train on (a cosine schedule then spans the longer run), or set "
                  "checkpoint.resume: never to start over\n",
                  path.c_str(), static_cast<long long>(ctx.global_step),
                  static_cast<long long>(ctx.resume_position->epoch), static_cast<long long>(epochs));
    } else {
      std::printf("resumed from %s (epoch %lld, step %lld)\n", path.c_str(),
                  static_cast<long long>(ctx.resume_position->epoch + 1), static_cast<long long>(ctx.global_step));
    }
    std::fflush(stdout);
  }
}

// on_step_end, not on_after_optimizer_step: the Checkpointer runs first (it resumes in on_train_begin
// before the others start), so in that event it would save before other callbacks finished the step.
void Checkpointer::on_step_end(TrainerContext& ctx) {
  if (options_.every_steps > 0 && ctx.global_step % options_.every_steps == 0) save(ctx, ctx.train_loader->state());
}

namespace {

data::SamplerState next_epoch_start(const TrainerContext& ctx) {
  data::SamplerState next;
  next.epoch = ctx.epoch + 1;
  next.position = 0;
  return next;
}

}  // namespace

// After every callback's on_epoch_end (the Checkpointer is the first callback): the epoch's metrics
// (Note [A finished run's metrics]) and every callback's state are final.
void Checkpointer::on_after_epoch_end(TrainerContext& ctx) {
  if (options_.every_epoch) save(ctx, next_epoch_start(ctx));
}

void Checkpointer::on_train_end(TrainerContext& ctx) {
  // After an epoch's end (a finished run, or a stop there: Note [Stop at epoch ends]) the run goes on
  // at the next epoch's start; the loader's own position (the epoch's end) would make a resumed run
  // evaluate and end that epoch a second time.
  // A checkpoint of this step written mid-epoch (every_steps landing on an epoch's last step) holds
  // the epoch's end, not the next one's start, so it is written again.
  const data::SamplerState position = ctx.epoch_finished ? next_epoch_start(ctx) : ctx.train_loader->state();
  if (options_.at_end && (last_saved_step_ != ctx.global_step || last_saved_position_.epoch != position.epoch ||
                          last_saved_position_.position != position.position)) {
    save(ctx, position);
  }
  // A run that stopped early (a stop signal, a time limit): say where it can go on from. One that took
  // no step (it resumed a run that early stopping had ended, say) has nothing new to point to.
  if (ctx.stop_requested && ctx.communicator->rank() == 0 && last_saved_step_ == ctx.global_step &&
      ctx.global_step > first_step_) {
    std::printf("checkpoint %s holds step %lld (%s)\n", last_path_.c_str(), static_cast<long long>(ctx.global_step),
                options_.resume == "auto" ? "checkpoint.resume: auto continues from it"
                                          : "set checkpoint.resume to its path to continue from it");
    std::fflush(stdout);
  }
}

}  // namespace lockstep::train
