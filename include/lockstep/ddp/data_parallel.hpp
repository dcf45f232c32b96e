#pragma once
// DataParallel: synchronous data parallelism for any torch::nn::Module.
//
//   lockstep::Runtime runtime(argc, argv);
//   auto model = std::make_shared<MyNet>();                  // or a TORCH_MODULE holder
//   lockstep::ddp::DataParallel dp(model, runtime.communicator());
//   torch::optim::SGD opt(model->parameters(), 0.1);
//   for (...) {                                              // each rank on its own shard
//     opt.zero_grad();
//     loss_fn(model->forward(x), y).backward();              // buckets all-reduce while backward runs
//     opt.step();                                            // .grad() already holds the average
//   }
//
// Construction is collective: it checks that every rank holds the same model, then copies rank
// 0's parameters and buffers to the others. Every backward afterwards averages the gradients over
// ranks (through the communication hook) unless a no_sync() guard is alive. Buffers (BatchNorm's
// running statistics) follow rank 0: they are broadcast at the end of every synchronised backward,
// which for a training loop is the same as before the next forward, with no call to remember.
// With sync_batch_norm, the model's ddp::SyncBatchNorm layers normalise over all ranks' samples.
// See docs/ddp.md.

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/ddp/comm_hooks.hpp"
#include "lockstep/ddp/reducer.hpp"
#include "lockstep/ddp/timeline.hpp"

namespace lockstep::ddp {

class SyncBatchNormAttachment;  // sync_batch_norm.hpp

struct DataParallelOptions {
  // Bucket size, MiB: the all-reduce unit. Larger buckets use the network better; smaller ones start
  // communicating earlier and hide more of it behind backward.
  double bucket_cap_mb = 25.0;
  // The first bucket (the last layers, whose gradients come first) is small so communication starts
  // early.
  double first_bucket_cap_mb = 1.0;
  // .grad() tensors are views into the flat bucket buffers: no copy in, no copy out, no extra memory.
  bool gradient_as_bucket_view = true;
  // Parameters that got no gradient in a backward count as ready, contributing what their .grad()
  // holds (zero after zero_grad(), or what no_sync() micro-batches accumulated), as PyTorch's DDP; a
  // parameter no rank used keeps its .grad() (with gradient_as_bucket_view, averaged in place like the
  // rest; a compressing comm hook such as PowerSGD replaces it by what the hook computes for it, as
  // for any other gradient of the bucket). Off: such a parameter is an error, raised on every rank.
  bool find_unused_parameters = false;
  // Broadcast buffers from rank 0 at the end of every synchronised backward.
  bool broadcast_buffers = true;
  // How a bucket is reduced; empty: allreduce_hook() (average). See comm_hooks.hpp.
  CommHook comm_hook;
  // What a comm_hook of your own depends on (the settings its lambda captured: a top-k fraction, a
  // quantisation width), in any text form. Every rank must give the same text: construction compares
  // it across ranks with the hook's type (describe_comm_hook, which cannot see inside a callable), so
  // ranks whose hooks would issue collectives of other sizes fail there, on every rank, instead of
  // hanging or summing mismatched buffers in the first backward.
  std::string comm_hook_settings;
  // Attach the model's ddp::SyncBatchNorm layers to the communicator: in training mode they normalise
  // with the global batch's statistics (sync_batch_norm.hpp). Their buffers are then bitwise equal on
  // every rank by construction and leave the per-step buffer broadcast. Construction fails if the model
  // has no SyncBatchNorm layer (torch::nn::BatchNorm*d cannot be synchronised). With
  // find_unused_parameters too, the buckets launch at the end of backward (no overlap): Note
  // [SyncBatchNorm among the buckets]. Layers attached by hand (attach_sync_batch_norm, to this
  // communicator or another) are refused without it: DataParallel would not order its collectives
  // with theirs; with it, they are attached to DataParallel's communicator.
  bool sync_batch_norm = false;
};

class DataParallel;

// While alive, backward passes only accumulate gradients locally; the next synchronised backward
// reduces the accumulated sum (averaged over ranks). The backward must run while the guard lives.
class [[nodiscard]] NoSyncGuard {
 public:
  NoSyncGuard(NoSyncGuard&& other) noexcept;
  NoSyncGuard& operator=(NoSyncGuard&&) = delete;
  NoSyncGuard(const NoSyncGuard&) = delete;
  NoSyncGuard& operator=(const NoSyncGuard&) = delete;
  ~NoSyncGuard();

 private:
  friend class DataParallel;
  NoSyncGuard(Reducer* reducer, bool previous);
  Reducer* reducer_;
  bool previous_;
};

class DataParallel {
 public:
  // Collective: every rank must construct it with its own copy of the same model.
  DataParallel(std::shared_ptr<torch::nn::Module> module, comm::CommunicatorPtr comm, DataParallelOptions options = {});
  // For TORCH_MODULE holders: DataParallel dp(model, comm).
  template <typename Impl>
  DataParallel(const torch::nn::ModuleHolder<Impl>& module, comm::CommunicatorPtr comm,
               DataParallelOptions options = {})
      : DataParallel(std::static_pointer_cast<torch::nn::Module>(module.ptr()), std::move(comm), std::move(options)) {}
  // Writes this rank's trace (enable_trace) if write_trace() has not written it since, and detaches
  // the SyncBatchNorm layers it attached.
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  torch::nn::Module& module() { return *module_; }
  const std::shared_ptr<torch::nn::Module>& module_ptr() const { return module_; }
  comm::Communicator& communicator() { return *comm_; }
  const DataParallelOptions& options() const { return options_; }

  // auto guard = dp.no_sync(); loss.backward();  // accumulates locally
  NoSyncGuard no_sync();

  // Optional timing marks: call before the forward pass and just before loss.backward() to split
  // StepTimings::forward_s from backward_s exactly (without the second, backward starts at the
  // first gradient hook). Cheap; no communication. before_forward() (as no_sync()) also checks that
  // the model was not moved or cast since construction (Reducer::check_hooks_attached): every
  // backward checks that too, but a model moved whole never reaches DataParallel's hooks at all.
  void before_forward();
  void before_backward();

  // Collective: copies rank 0's buffers (all of them, SyncBatchNorm's included) to every rank now
  // (e.g. before evaluating after steps that were all under no_sync).
  void sync_buffers();

  // Timings of the last backward pass (see StepTimings).
  const StepTimings& last_step() const { return reducer_->last_timings(); }

  // Records a Chrome trace of every backward from now on. write_trace() (collective) writes all
  // ranks' events into one file at `path`, pid = rank; at destruction, events not yet written go
  // to one file per rank, `path` with ".rank<r>" before its extension.
  void enable_trace(std::string path);
  void write_trace();

  const Reducer& reducer() const { return *reducer_; }
  // Synchronised backward passes so far, and setting it back on resume (Note [Iteration across a
  // resume]: the Checkpointer does).
  std::uint64_t synchronized_backwards() const { return reducer_->sync_count(); }
  void set_synchronized_backwards(std::uint64_t count) { reducer_->set_sync_count(count); }
  // The order the buckets were rebuilt by, and setting it back on resume (Note [Bucket order across a
  // resume] in reducer.cpp: the Checkpointer does).
  const std::vector<std::int64_t>& bucket_order() const { return reducer_->rebuilt_order(); }
  void set_bucket_order(const std::vector<std::int64_t>& order) { reducer_->set_rebuilt_order(order); }
  // How many ddp::SyncBatchNorm layers this DataParallel attached (options().sync_batch_norm).
  std::size_t sync_batch_norm_layers() const;

 private:
  friend class Join;  // uneven inputs (join.hpp) drive the reducer's join mode
  // Collective: copies `root`'s parameters, and its buffers if `with_buffers`, to every rank.
  void broadcast_state(int root, bool with_buffers = true);
  std::shared_ptr<torch::nn::Module> module_;
  comm::CommunicatorPtr comm_;
  DataParallelOptions options_;
  std::vector<at::Tensor> state_;  // parameters (a tied tensor once), then buffers
  std::vector<at::Tensor> buffers_;
  std::size_t state_parameters_ = 0;  // state_'s first state_parameters_ tensors are the parameters
  // A member, so that a constructor that throws after attaching detaches again.
  std::unique_ptr<SyncBatchNormAttachment> sync_batch_norm_;
  std::unique_ptr<Reducer> reducer_;
  std::shared_ptr<Timeline> timeline_;
  std::string trace_path_;
  std::size_t written_events_ = 0;
};

}  // namespace lockstep::ddp
