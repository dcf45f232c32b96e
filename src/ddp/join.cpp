#include "lockstep/ddp/join.hpp"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <vector>

#include "lockstep/core/error.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/ddp/sync_batch_norm.hpp"

namespace lockstep::ddp {

Join::Join(DataParallel& dp, JoinOptions options)
    : dp_(&dp), options_(options), uncaught_(std::uncaught_exceptions()) {
  // Those DataParallel attached, and any attached by hand (attach_sync_batch_norm after it was built):
  // either forward is collective. Every rank holds the same model, so every rank refuses alike.
  std::size_t synchronised = 0;
  for (const auto& m : dp.module().modules(/*include_self=*/true)) {
    const auto* layer = dynamic_cast<const SyncBatchNormImpl*>(m.get());
    if (layer != nullptr && layer->synchronised()) ++synchronised;
  }
  LOCKSTEP_CHECK(synchronised == 0, "ddp::Join: the model has ", synchronised,
                 " synchronised SyncBatchNorm layer(s), whose forward is collective; a rank that has run out of "
                 "inputs runs no forward, so uneven inputs cannot be shadowed. Use per-rank batch norm "
                 "(sync_batch_norm = false, and no attach_sync_batch_norm) or give every rank the same number of "
                 "batches (rank ",
                 dp.communicator().rank(), ")");
  dp.reducer_->enable_join(options_);
}

Join::~Join() {
  if (finished_) return;
  if (std::uncaught_exceptions() > uncaught_) {
    dp_->reducer_->disable_join();  // an error is on its way out; the job's fail-fast handles the rest
    return;
  }
  try {
    finish();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lockstep: rank %d: ddp::Join: finish() at destruction failed: %s\n",
                 dp_->communicator().rank(), e.what());
    std::terminate();
  }
}

JoinResult Join::finish(const std::function<void()>& shadow_step) {
  LOCKSTEP_CHECK(!finished_, "ddp::Join::finish() was called twice (rank ", dp_->communicator().rank(), ")");
  finished_ = true;
  Reducer& reducer = *dp_->reducer_;
  struct LeaveJoinMode {
    Join& join;
    ~LeaveJoinMode() {
      join.stop_codes_ = join.dp_->reducer_->join_stop_codes();  // they outlive join mode
      join.left_ = true;
      join.dp_->reducer_->disable_join();
    }
  } leave{*this};

  JoinResult result;
  const std::uint64_t shadowed_before = reducer.shadowed_steps();
  while (reducer.shadow_step()) {
    if (shadow_step) shadow_step();
  }
  result.shadowed_steps = static_cast<std::int64_t>(reducer.shadowed_steps() - shadowed_before);

  // Every rank has finished, and agrees on which ranks trained in the last step (Note [Join]).
  const std::vector<int>& last = reducer.last_active_ranks();
  result.source_rank = last.empty() ? 0 : last.front();
  result.stop_codes = reducer.join_stop_codes();
  // Buffers only where DataParallel shares them (broadcast_buffers): with it off, each rank's buffers
  // are its own (PyTorch's join does the same).
  dp_->broadcast_state(result.source_rank, dp_->options().broadcast_buffers);
  return result;
}

std::vector<std::int32_t> Join::stop_codes() const {
  return left_ ? stop_codes_ : dp_->reducer_->join_stop_codes();
}

bool Join::stop_requested() const {
  const std::vector<std::int32_t> codes = stop_codes();
  return std::any_of(codes.begin(), codes.end(), [](std::int32_t code) { return code != 0; });
}

}  // namespace lockstep::ddp
