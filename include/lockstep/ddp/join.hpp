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
// forward. Each step costs one extra all-gather of world_size ints. Note [Join] in src/ddp/reducer.cpp.

#include <cstdint>
#include <functional>

namespace lockstep::ddp {

class DataParallel;

struct JoinOptions {
  // true: a step's summed gradient is divided by the world size even when some ranks have finished
  // (each sample weighs the same). false: divided by the number of ranks that trained in the step.
  bool divide_by_initial_world_size = true;
  // Instead of shadowing: when some rank runs out of inputs while others have more, every rank raises
  // a lockstep::Error naming which ranks finished (the others in that backward, the finished ones in
  // finish()); the communicator stays usable. For jobs whose shards must be even.
  bool throw_on_early_termination = false;
};

struct JoinResult {
  std::int64_t shadowed_steps = 0;  // steps this rank took part in after it finished its own
  int source_rank = 0;  // the rank (one that trained in the last step) whose model every rank now holds
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
  // whose step is collective. Finally, broadcasts the parameters and buffers from the lowest rank that
  // trained in the last step, so every rank ends with the same model even without a shadow step (the
  // optimizer state of ranks that finished early then lags). Leaves join mode.
  JoinResult finish(const std::function<void()>& shadow_step = {});
  bool finished() const { return finished_; }

 private:
  DataParallel* dp_;
  JoinOptions options_;
  bool finished_ = false;
  int uncaught_ = 0;  // std::uncaught_exceptions() at construction
};

}  // namespace lockstep::ddp
