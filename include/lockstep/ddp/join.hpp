#pragma once
// Join: data parallelism on uneven inputs, as PyTorch's DistributedDataParallel.join() and Horovod's
// hvd.join(). Every synchronised backward is collective, so a rank that runs out of batches while the
// others still have some would leave them waiting in their next backward. Inside a Join, a rank that
// has finished its loop calls finish(), which takes part in the others' remaining steps with no
// gradients of its own until every rank has finished:
//
//   lockstep::ddp::DataParallel dp(model, comm);
//   lockstep::ddp::Join join(dp);                         // on every rank, before the loop
//   for (const auto& [x, y] : my_batches) {               // any number per rank, none included
//     opt.zero_grad();
//     loss_fn(model->forward(x), y).backward();
//     opt.step();
//   }
//   join.finish([&] { opt.step(); });                     // collective; the lambda: see finish()
//
// In each step some rank skips, the sum of gradients holds those of the ranks that trained; by default
// it is divided by the world size, so every sample weighs the same whichever rank it came from
// (PyTorch's default), or, with divide_by_initial_world_size = false, by the number of ranks that
// trained. Buffers (batch norm statistics) follow the lowest rank that trained. At the end, every rank
// holds the model of a rank that trained in the last step.
//
// Inside a Join, the only collectives a step may issue are DataParallel's synchronised backward and
// the shadow step's (a ZeroRedundancyOptimizer's step); metrics and other collectives go after
// finish(). SyncBatchNorm layers are refused: their forward is collective, and a joined rank runs no
// forward. Each step costs one extra all-gather of 2 x world_size ints. Note [Join] in
// src/ddp/reducer.cpp.
//
// Stopping early on every rank alike (a signal that reached one node, a time limit), with no
// collective of the loop's own: JoinOptions::stop_code rides on Join's all-gather (Note [Stop in a
// Join]), and every rank sees stop_requested() after the same step:
//
//   lockstep::StopSignals signals({"SIGTERM", "SIGUSR1"});  // core/stop_signals.hpp
//   lockstep::ddp::JoinOptions options;
//   options.stop_code = [&] { return signals.caught(); };
//   lockstep::ddp::Join join(dp, options);
//   for (const auto& [x, y] : my_batches) {
//     ... backward, opt.step() ...
//     if (join.stop_requested()) break;                 // the same step on every rank still training
//   }
//   join.finish([&] { opt.step(); });                   // the joined ranks leave after that step too
//   if (join.stop_requested()) { save a checkpoint; exit }

#include <cstdint>
#include <functional>
#include <vector>

namespace lockstep::ddp {

class DataParallel;

// divide_by_initial_world_size and throw_on_early_termination must be the same on every rank: they
// ride on each step's all-gather, and a difference is the same error on every rank.
struct JoinOptions {
  // true: a step's summed gradient is divided by the world size even when some ranks have finished
  // (each sample weighs the same). false: divided by the number of ranks that trained in the step.
  bool divide_by_initial_world_size = true;
  // Instead of shadowing: when some rank runs out of inputs while others have more, every rank raises
  // a lockstep::Error naming which ranks finished (the others in that backward, the finished ones in
  // finish()); the communicator stays usable. For jobs whose shards must be even.
  bool throw_on_early_termination = false;
  // Note [Stop in a Join]: asked once per step on this rank (a training rank: as its backward starts,
  // on autograd's thread; a joined rank: in finish()), just before Join's all-gather, which hands
  // every rank the codes of all. Non-zero asks every rank to stop: Join::stop_requested() then says
  // so on every rank after that step. Must be cheap and must not call into DataParallel. Empty: 0.
  std::function<std::int32_t()> stop_code;
};

struct JoinResult {
  std::int64_t shadowed_steps = 0;  // steps this rank took part in after it finished its own
  int source_rank = 0;  // the rank (one that trained in the last step) whose model every rank now holds
  // Per rank, the first non-zero JoinOptions::stop_code it posted (0: none); the same on every rank.
  std::vector<std::int32_t> stop_codes;
};

class Join {
 public:
  // Not collective. Refused if the DataParallel attached SyncBatchNorm layers, or has a Join already.
  explicit Join(DataParallel& dp, JoinOptions options = {});
  // Runs finish() if it was not called and no exception is unwinding (then any error aborts the job:
  // destructors cannot throw). During unwinding it only leaves join mode.
  ~Join();
  Join(const Join&) = delete;
  Join& operator=(const Join&) = delete;

  // Collective: call once this rank has no more batches. Until every rank has called it, takes part
  // in each synchronised backward the others still run, with zero gradients; after each, this rank's
  // .grad()s hold the same reduced gradients as theirs and `shadow_step` (if given) runs: it should do
  // what the loop does after backward (opt.step(), a scheduler's step), so that this rank's parameters
  // and optimizer state stay equal to the others'. It is required with a ZeroRedundancyOptimizer,
  // whose step is collective. Finally, broadcasts the parameters (and the buffers, unless
  // DataParallelOptions::broadcast_buffers is off: then each rank keeps its own) from the lowest rank
  // that trained in the last step, so every rank ends with the same model even without a shadow step
  // (the optimizer state of ranks that finished early then lags). Leaves join mode.
  JoinResult finish(const std::function<void()>& shadow_step = {});
  bool finished() const { return finished_; }

  // Note [Stop in a Join]: whether some rank's JoinOptions::stop_code has returned non-zero in a step
  // of this Join so far, and per rank the first such code (0: none). After a step's backward (on a
  // joined rank: in finish()), the same on every rank.
  bool stop_requested() const;
  std::vector<std::int32_t> stop_codes() const;

 private:
  DataParallel* dp_;
  JoinOptions options_;
  bool finished_ = false;
  bool left_ = false;                     // finish() has left join mode
  std::vector<std::int32_t> stop_codes_;  // once left; before, the reducer's
  int uncaught_ = 0;  // std::uncaught_exceptions() at construction
};

}  // namespace lockstep::ddp
