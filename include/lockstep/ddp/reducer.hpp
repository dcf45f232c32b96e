#pragma once
// Reducer: owns the gradient buckets. It hooks every parameter's gradient accumulator, launches a
// bucket's all-reduce (through the communication hook) as soon as the bucket and every bucket
// before it are ready, so communication overlaps the rest of backward, and at the end of backward
// waits for all of them and leaves the reduced gradients in .grad(). It knows nothing of training
// loops; DataParallel builds it and most users never touch it directly.

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/work.hpp"
#include "lockstep/ddp/bucket_assignment.hpp"
#include "lockstep/ddp/comm_hooks.hpp"
#include "lockstep/ddp/join.hpp"
#include "lockstep/ddp/timeline.hpp"

namespace lockstep::ddp {

struct ReducerOptions {
  std::int64_t first_bucket_cap_bytes = std::int64_t{1} << 20;
  std::int64_t bucket_cap_bytes = std::int64_t{25} << 20;
  bool gradient_as_bucket_view = true;
  bool find_unused_parameters = false;
  bool rebuild_buckets = true;  // once, after the first synchronised backward (Note [Bucket order])
  CommHook comm_hook;           // empty: allreduce_hook()
  // Launch every bucket at the end of backward rather than as soon as it fills (no overlap): for
  // collectives of other kinds issued during backward, whose place among the buckets' must be the
  // same on every rank (Note [SyncBatchNorm among the buckets], data_parallel.cpp).
  bool launch_at_end = false;
};

// What one backward pass cost. Seconds; steady_clock.
struct StepTimings {
  std::uint64_t backward_index = 0;  // counts every backward the reducer saw, synchronised or not
  bool synchronized = false;         // false under no_sync(): nothing was communicated
  // From mark_forward_start() to the start of backward (mark_backward_start(), or else the first
  // gradient hook, which comes after the output layer's backward). 0 when forward was not marked.
  double forward_s = 0;
  // From the start of backward to the end of the autograd pass (before the final wait).
  double backward_s = 0;
  // Sum over buckets of the time the communicator spent on each all-reduce (start to end).
  double communication_s = 0;
  // From the end of the autograd pass until every bucket was reduced and written back: the part
  // of the communication that backward did not hide.
  double exposed_communication_s = 0;
  std::size_t bucket_count = 0;
  std::int64_t bucket_bytes = 0;  // bytes of gradient the buckets hold (before any compression)
};

class Reducer {
 public:
  // `parameters` must be leaves that require grad, with distinct storage; `names` label them in
  // error messages. The bucket assignment is computed here from the parameters alone, so ranks
  // holding the same model agree on it.
  Reducer(std::vector<at::Tensor> parameters, std::vector<std::string> names, comm::CommunicatorPtr comm,
          ReducerOptions options);
  ~Reducer();
  Reducer(const Reducer&) = delete;
  Reducer& operator=(const Reducer&) = delete;

  // Whether the next backward all-reduces (true) or only accumulates locally (no_sync).
  // Read when the first gradient of a backward arrives.
  void set_sync(bool sync);
  bool sync() const;

  // Tensors that follow rank 0 at every synchronisation (DataParallel passes the module's buffers).
  // Their broadcast is issued after the last bucket and waited for with the buckets.
  void set_broadcast_tensors(std::vector<at::Tensor> tensors);

  // Optional timing marks; see StepTimings.
  void mark_forward_start();
  void mark_backward_start();

  // Records this rank's events from now on (nullptr: stop).
  void set_timeline(std::shared_ptr<Timeline> timeline);

  const StepTimings& last_timings() const { return last_timings_; }

  // Raises a clear error if a parameter no longer reaches this reducer: moved or cast (to(), half(),
  // set_data) after the reducer was built, LibTorch gave it a new gradient accumulator without the
  // hook, and its gradients would silently stay local. Checked at the start of every backward and by
  // DataParallel::before_forward() and no_sync() (the only checks that catch a model moved whole).
  void check_hooks_attached() const;
  // Parameters that were frozen (requires_grad off) when the reducer was built, so that it has no hook
  // on them: unfrozen later, their gradients would silently stay local. check_hooks_attached() names
  // any that requires grad now.
  void set_frozen(std::vector<at::Tensor> parameters, std::vector<std::string> names);

  // Diagnostics, for tests and the curious.
  std::size_t parameter_count() const { return params_.size(); }
  const std::vector<std::string>& parameter_names() const { return names_; }
  BucketAssignment bucket_assignment() const;
  // Of the last synchronised backward: parameter indices in the order their gradients became ready
  // on this rank; bucket indices in the order they became ready; bucket indices in launch order.
  const std::vector<std::size_t>& last_ready_order() const { return ready_order_; }
  const std::vector<std::size_t>& last_bucket_ready_order() const { return bucket_ready_order_; }
  const std::vector<std::size_t>& last_launch_order() const { return launch_order_; }
  bool buckets_rebuilt() const { return rebuilt_; }
  // Note [Bucket order across a resume]: the parameter order the buckets were rebuilt by (rank 0's
  // observed ready order, agreed by every rank; empty before the rebuild), and setting it on a new
  // Reducer, which then builds its buckets by it and does no rebuild of its own. Not during a backward;
  // every rank with the same order (one checkpoint read by all). Without rebuild_buckets, ignored.
  const std::vector<std::int64_t>& rebuilt_order() const { return rebuilt_order_; }
  void set_rebuilt_order(const std::vector<std::int64_t>& order);

  // Synchronised backward passes so far: GradBucket::iteration of the next one. Note [Iteration
  // across a resume]: a resumed run's new Reducer would count from 0 again, so comm hooks (PowerSGD's
  // start_iteration and random draws, a user's warm-up) would see the process's iteration instead of
  // the run's; a checkpoint stores the count and the resumed run sets it back. Not during a backward.
  std::uint64_t sync_count() const { return sync_count_; }
  void set_sync_count(std::uint64_t count);

  // Uneven inputs (ddp::Join, join.hpp; Note [Join] in reducer.cpp). While join mode is on, every
  // synchronised backward starts with one all-gather of a flag per rank, "still training", and a
  // rank that ran out of inputs calls shadow_step() instead of running backward.
  void enable_join(const JoinOptions& options);
  void disable_join();
  // Collective, on a rank that has joined: takes part in the next synchronised backward of the
  // ranks still training, with no gradients of its own (its .grad()s receive the reduced ones), or
  // returns false when no rank is training any more.
  bool shadow_step();
  // The ranks that took part in the last synchronised backward under join mode (all of them before
  // any), and the number of backwards shadowed so far.
  const std::vector<int>& last_active_ranks() const { return last_active_; }
  // Note [Stop in a Join]: per rank, the first non-zero JoinOptions::stop_code it posted since join
  // mode began (0: none), as read from the join all-gathers so far: the same on every rank after the
  // same step.
  const std::vector<std::int32_t>& join_stop_codes() const { return join_stop_codes_; }
  std::uint64_t shadowed_steps() const { return shadowed_steps_; }

 private:
  struct Bucket {
    GradBucket grad;                  // what the comm hook sees; grad.buffer is the flat buffer
    std::vector<std::size_t> params;  // parameter indices, in buffer order
    std::vector<at::Tensor> views;    // per parameter: its slice of the buffer, shaped like it
    std::size_t pending = 0;          // parameters not yet ready in this backward
    // Positions whose gradient arrived as a tensor of its own in this backward, to be copied into
    // the buffer when the bucket is full (Note [Gradient views]).
    std::vector<std::size_t> fresh;
    comm::WorkPtr work;
  };
  struct Slot {
    std::size_t bucket = 0;
    std::size_t position = 0;  // within the bucket
  };

  void build_buckets(const BucketAssignment& assignment);
  void on_gradient_ready(std::size_t index);
  void begin_backward();
  void prepare_sync();
  void finish_backward();
  void mark_ready(std::size_t index);
  // `end_of_backward`: the autograd pass is over (or there is none: a Join's shadow step).
  void launch_ready_buckets(bool end_of_backward);
  void contribute_unready(std::size_t index);
  void adopt_gradient(std::size_t index);
  void adopt_fresh(Bucket& bucket);
  void synchronize(StepTimings& timings, comm::Clock::time_point backward_end, std::vector<int> active);
  // `held_counts` (a joined rank's shadow step only): per parameter, the training ranks holding a .grad().
  void write_back(const std::vector<std::int32_t>& used_counts, const std::int32_t* held_counts);
  void rebuild_by_ready_order();
  // Builds the buckets for `order` (parameter indices) and moves the gradients over.
  void adopt_order(const std::vector<std::size_t>& order);
  void reset_iteration();
  void check_hooks_attached_locked() const;
  // Note [Abandoned backward], for buckets launched at the end of a pass (or a Join shadow step)
  // whose launch failed after others were issued: every later synchronised step refuses to start.
  void note_failed_launch(const std::exception& error, const char* where);
  // out_of_step_ (the first cause only): "... failed on rank R while <doing> (<error>); ...".
  void mark_out_of_step(const std::exception& error, const std::string& doing);
  // Note [Abandoned backward]: whether this pass issued collectives (with syncing_), and the rest of
  // what a failed pass leaves behind (the used flags when nothing was issued, the Join all-gather).
  bool issued_this_pass() const;
  void end_failed_pass(bool issued);
  void check_can_synchronize() const;
  // Note [Abandoned backward]: ends a backward whose autograd pass failed before its end-of-pass
  // callback ran; with mutex_ held.
  void settle_abandoned_backward();
  [[noreturn]] void fail_unready(const std::vector<std::int32_t>& ready_counts,
                                 const std::vector<std::int32_t>& used_counts, int active);
  [[noreturn]] void fail_uneven() const;
  // A wait on this rank's collectives failed (a timeout, a dead peer): record out_of_step_.
  void note_out_of_step(const std::exception& error, const char* waiting_for);
  // Note [Join]: this rank's entry of a join all-gather ("still training", its stop code), and what
  // the gathered entries say: the ranks training in the step (the stop codes are recorded, and
  // JoinOptions that differ between ranks in join_error_).
  at::Tensor join_entry(bool training) const;
  std::vector<int> read_join_flags(const at::Tensor& flags);
  const at::Tensor& view_of(std::size_t index) const;

  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> frozen_;
  std::vector<std::string> frozen_names_;
  comm::CommunicatorPtr comm_;
  ReducerOptions options_;
  struct GradientHooks;  // the parameters' gradient accumulators and this reducer's hooks on them
  std::unique_ptr<GradientHooks> hooks_;

  std::vector<Bucket> buckets_;
  std::vector<Slot> slots_;
  std::vector<at::Tensor> broadcast_tensors_;
  std::shared_ptr<Timeline> timeline_;

  mutable std::mutex mutex_;  // hooks of a multi-device model may run on several autograd threads
  bool sync_ = true;
  // Per backward pass.
  bool in_backward_ = false;
  bool syncing_ = false;
  // Note [Abandoned backward]: expires when the autograd pass that began the current backward is
  // gone; if that happens while in_backward_ is still set, the pass failed partway through.
  std::weak_ptr<void> pass_alive_;
  // Set when a failed synchronised backward had already issued collectives on this rank: the ranks
  // are out of step for good, and every later synchronised backward raises it.
  std::string out_of_step_;
  std::vector<char> ready_;            // got its gradient from autograd in this backward
  std::vector<char> used_since_sync_;  // got one in any backward since the last synchronisation
  // The flags of used_since_sync_ the current backward set: cleared again if it fails before it
  // issued anything (Note [Abandoned backward]), so that a retry that does not use them finds them unset.
  std::vector<std::size_t> newly_used_;
  std::vector<std::size_t> ready_order_, bucket_ready_order_, launch_order_;
  std::size_t next_launch_ = 0;
  comm::Clock::time_point forward_start_{}, backward_start_{};
  std::uint64_t backward_count_ = 0;
  std::uint64_t sync_count_ = 0;
  bool rebuilt_ = false;
  std::vector<std::int64_t> rebuilt_order_;  // Note [Bucket order across a resume]
  StepTimings last_timings_;
  // Join mode (Note [Join]).
  bool join_ = false;
  JoinOptions join_options_;
  at::Tensor join_flags_;     // [2 * world] int32: the all-gathered entries of the current backward
  comm::WorkPtr join_work_;   // their all-gather, issued when a synchronised backward begins
  std::vector<int> last_active_;
  std::vector<std::int32_t> join_stop_codes_;
  std::uint64_t shadowed_steps_ = 0;
  bool shadowing_ = false;  // inside shadow_step()
  // Set on every rank alike when the gathered entries show JoinOptions that differ between ranks;
  // raised once the step's collectives are done, and by every later step of this Join (join mode only).
  std::string join_error_;
};

}  // namespace lockstep::ddp
