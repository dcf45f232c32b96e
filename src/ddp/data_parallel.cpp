#include "lockstep/ddp/data_parallel.hpp"

#include <cstdio>
#include <unordered_set>

#include "lockstep/comm/agree.hpp"
#include "lockstep/comm/nccl_communicator.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/ddp/bucket_assignment.hpp"
#include "lockstep/ddp/comm_hooks.hpp"
#include "lockstep/ddp/model_sync.hpp"
#include "lockstep/ddp/sync_batch_norm.hpp"

namespace lockstep::ddp {

namespace {

// "trace.json" -> "trace.rank1.json"
std::string per_rank_path(const std::string& path, int rank) {
  const std::string tag = ".rank" + std::to_string(rank);
  const std::size_t slash = path.find_last_of('/');
  const std::size_t dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return path + tag;
  return path.substr(0, dot) + tag + path.substr(dot);
}

}  // namespace

NoSyncGuard::NoSyncGuard(Reducer* reducer, bool previous) : reducer_(reducer), previous_(previous) {}

NoSyncGuard::NoSyncGuard(NoSyncGuard&& other) noexcept : reducer_(other.reducer_), previous_(other.previous_) {
  other.reducer_ = nullptr;
}

NoSyncGuard::~NoSyncGuard() {
  if (reducer_ != nullptr) reducer_->set_sync(previous_);
}

DataParallel::DataParallel(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm,
                           DataParallelOptions options)
    : module_(std::move(module)), comm_(std::move(comm)), options_(std::move(options)) {
  LOCKSTEP_CHECK(module_ != nullptr, "DataParallel needs a module");
  LOCKSTEP_CHECK(comm_ != nullptr, "DataParallel needs a communicator");
  ReducerOptions reducer_options;
  reducer_options.gradient_as_bucket_view = options_.gradient_as_bucket_view;
  reducer_options.find_unused_parameters = options_.find_unused_parameters;
  reducer_options.comm_hook = options_.comm_hook;
  // Note [SyncBatchNorm among the buckets]
  // ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
  // A SyncBatchNorm layer's backward issues an all-gather on DataParallel's communicator in the
  // middle of backward, and collectives match by issue order. The buckets launch in the same order
  // everywhere, but where among those all-gathers each launches depends on when it fills: with
  // find_unused_parameters the parameters a rank uses can differ, so a bucket of a layer one rank
  // used fills (and launches) before a SyncBatchNorm layer's backward there, and only at the end of
  // backward on a rank that did not use it: an all-reduce would meet an all-gather. So with both
  // options the buckets launch at the end of backward, after every SyncBatchNorm layer's all-gather,
  // on every rank (their communication then no longer overlaps backward). A graph that differs
  // between ranks in other ways (the same parameters used in another order) is not covered.
  reducer_options.launch_at_end = options_.sync_batch_norm && options_.find_unused_parameters;

  std::vector<ModelEntry> entries;
  std::vector<at::Tensor> parameters, frozen;
  std::vector<std::string> names, frozen_names;
  // A tensor registered under two names (tied weights) is one parameter: reduce it once.
  std::unordered_set<const void*> seen;
  for (const auto& item : module_->named_parameters(/*recurse=*/true)) {
    const at::Tensor& p = item.value();
    if (!p.defined() || !seen.insert(p.unsafeGetTensorImpl()).second) continue;
    entries.push_back({"parameter", item.key(), p});
    if (p.requires_grad()) {
      parameters.push_back(p);
      names.push_back(item.key());
    } else {
      frozen.push_back(p);
      frozen_names.push_back(item.key());
    }
  }
  state_parameters_ = entries.size();
  for (const auto& item : module_->named_buffers(/*recurse=*/true)) {
    entries.push_back({"buffer", item.key(), item.value()});
    if (item.value().defined()) buffers_.push_back(item.value());
  }

  // Options that set the buckets or which collectives run: a rank with others would reduce its
  // gradients in buckets of other parameters than its peers' (sums of unrelated values when the
  // sizes happen to match) or leave them waiting. Options that stay local (gradient_as_bucket_view,
  // a trace file) may differ.
  char caps[96];
  std::snprintf(caps, sizeof caps, "%.17g MB, first bucket %.17g MB", options_.bucket_cap_mb,
                options_.first_bucket_cap_mb);
  // NCCL reduces tensors of its own GPU: a model on another one (moved to cuda:0 on every rank of a
  // node) would fail in the broadcast below on the ranks whose GPU differs, and leave the others there.
  std::string off_gpu;
  if (const int gpu = comm::nccl_device_index(*comm_); gpu >= 0) {
    for (const auto& entry : entries) {
      const at::Tensor& t = entry.tensor;
      if (t.defined() && t.is_cuda() && t.device().index() != gpu) {
        off_gpu = entry.kind + " " + entry.name + " is on " + t.device().str() + ", the NCCL communicator on cuda:" +
                  std::to_string(gpu);
        break;
      }
    }
  }
  // SyncBatchNorm layers attached by hand (attach_sync_batch_norm) run collectives that the buckets'
  // order (Note [SyncBatchNorm among the buckets]) and Join must know of, which only
  // options.sync_batch_norm tells them: with it, DataParallel attaches them itself.
  std::string hand_attached;
  if (!options_.sync_batch_norm) {
    for (const auto& item : module_->named_modules("", /*include_self=*/true)) {
      const auto* layer = dynamic_cast<const SyncBatchNormImpl*>(item.value().get());
      if (layer != nullptr && layer->synchronised()) {
        hand_attached = "'" + (item.key().empty() ? std::string("(the model itself)") : item.key()) + "'";
        break;
      }
    }
  }
  comm::check_same_values(
      *comm_,
      {{"SyncBatchNorm attached by hand", hand_attached.empty() ? "no" : "yes"},
       {"bucket caps", caps},
       {"find_unused_parameters", std::to_string(options_.find_unused_parameters)},
       {"broadcast_buffers", std::to_string(options_.broadcast_buffers)},
       {"sync_batch_norm", std::to_string(options_.sync_batch_norm)},
       {"comm_hook", describe_comm_hook(options_.comm_hook)},
       {"comm_hook_settings", options_.comm_hook_settings.empty() ? "(none)" : options_.comm_hook_settings},
       {"the model on the NCCL communicator's GPU", off_gpu.empty() ? "yes" : "no (" + off_gpu + ")"}},
      "DataParallel", "Every rank must build DataParallel with the same DataParallelOptions.");
  LOCKSTEP_CHECK(hand_attached.empty(), "DataParallel: the model's SyncBatchNorm layer ", hand_attached,
                 " is attached to a communicator (attach_sync_batch_norm), but DataParallelOptions::sync_batch_norm "
                 "is false: set it instead, so that DataParallel attaches the layers and orders its reductions (and "
                 "Join) with their collectives; or detach_sync_batch_norm the model for per-rank batch norm (rank ",
                 comm_->rank(), ")");
  LOCKSTEP_CHECK(off_gpu.empty(), "DataParallel: ", off_gpu,
                 ": move the model to the rank's GPU (the runtime's device) before building DataParallel; "
                 "DistributedTrainer moves it to TrainerOptions::device, whose \"auto\" is that GPU");
  // After the agreement: a cap one rank alone gets wrong is the disagreement above, on every rank.
  reducer_options.first_bucket_cap_bytes = cap_bytes_from_mb(options_.first_bucket_cap_mb, "first_bucket_cap_mb");
  reducer_options.bucket_cap_bytes = cap_bytes_from_mb(options_.bucket_cap_mb, "bucket_cap_mb");
  check_same_model(*comm_, entries);
  for (const auto& entry : entries) state_.push_back(entry.tensor);
  broadcast_state(0);

  // Attach after the model check and the broadcast: the layers are numbered in registration order,
  // which is then known to be the same on every rank, so this throws on every rank or on none.
  std::vector<at::Tensor> broadcast = buffers_;
  if (options_.sync_batch_norm) {
    sync_batch_norm_ = std::make_unique<SyncBatchNormAttachment>(*module_, comm_);
    LOCKSTEP_CHECK(sync_batch_norm_->layers() > 0,
                   "DataParallelOptions::sync_batch_norm is set, but the model has no lockstep::ddp::SyncBatchNorm "
                   "layer to synchronise (torch::nn::BatchNorm*d cannot be): build the model with ddp::SyncBatchNorm, "
                   "as models::ResNet18 does (rank ", comm_->rank(), ")");
    // Note [SyncBatchNorm statistics]: their running statistics are bitwise equal everywhere already.
    std::unordered_set<const void*> synchronised;
    for (const auto& m : module_->modules(/*include_self=*/true)) {
      if (auto* layer = m->as<SyncBatchNormImpl>()) {
        for (const auto& b : layer->buffers(/*recurse=*/false)) synchronised.insert(b.unsafeGetTensorImpl());
      }
    }
    broadcast.clear();
    for (const auto& b : buffers_) {
      if (synchronised.count(b.unsafeGetTensorImpl()) == 0) broadcast.push_back(b);
    }
  }

  reducer_ = std::make_unique<Reducer>(std::move(parameters), std::move(names), comm_, std::move(reducer_options));
  reducer_->set_frozen(std::move(frozen), std::move(frozen_names));
  if (options_.broadcast_buffers && !broadcast.empty()) reducer_->set_broadcast_tensors(std::move(broadcast));
}

DataParallel::~DataParallel() {
  if (timeline_ && timeline_->size() > written_events_) {
    try {
      timeline_->write(per_rank_path(trace_path_, comm_->rank()));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "lockstep: rank %d: could not write the DataParallel trace: %s\n", comm_->rank(), e.what());
    }
  }
}

std::size_t DataParallel::sync_batch_norm_layers() const {
  return sync_batch_norm_ != nullptr ? sync_batch_norm_->layers() : 0;
}

NoSyncGuard DataParallel::no_sync() {
  reducer_->check_hooks_attached();
  const bool previous = reducer_->sync();
  reducer_->set_sync(false);
  return NoSyncGuard(reducer_.get(), previous);
}

void DataParallel::before_forward() {
  reducer_->check_hooks_attached();
  reducer_->mark_forward_start();
}
void DataParallel::before_backward() { reducer_->mark_backward_start(); }

void DataParallel::broadcast_state(int root, bool with_buffers) {
  if (with_buffers) {
    for (auto& work : broadcast_coalesced(*comm_, state_, root)) work->wait();
    return;
  }
  const std::vector<at::Tensor> parameters(state_.begin(), state_.begin() + static_cast<std::ptrdiff_t>(state_parameters_));
  for (auto& work : broadcast_coalesced(*comm_, parameters, root)) work->wait();
}

void DataParallel::sync_buffers() {
  for (auto& work : broadcast_coalesced(*comm_, buffers_, 0)) work->wait();
}

void DataParallel::enable_trace(std::string path) {
  LOCKSTEP_CHECK(!path.empty(), "DataParallel::enable_trace needs a file path");
  trace_path_ = std::move(path);
  if (!timeline_) {
    timeline_ = std::make_shared<Timeline>(comm_->rank());
    reducer_->set_timeline(timeline_);
  }
}

void DataParallel::write_trace() {
  // Collective: a trace enabled on some ranks only (rank 0's, say) would have those ranks wait in
  // the merge's all-gather for the others, which raise below; every rank raises here instead.
  comm::check_same_values(*comm_, {{"enable_trace() called", timeline_ != nullptr ? "yes" : "no"}},
                          "DataParallel::write_trace",
                          "Call enable_trace(path) on every rank: the trace is merged from all ranks into one file.");
  LOCKSTEP_CHECK(timeline_ != nullptr, "DataParallel::write_trace: call enable_trace(path) first (rank ", comm_->rank(),
                 ")");
  timeline_->write_merged(*comm_, trace_path_);
  written_events_ = timeline_->size();
}

}  // namespace lockstep::ddp
