#include "lockstep/ddp/reducer.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <mutex>
#include <sstream>

#include "core/autograd_compat.hpp"
#include "core/exception_text.hpp"
#include "ddp/parameter_order.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/ddp/model_sync.hpp"

namespace lockstep::ddp {

// Note [Bucket order]
// ~~~~~~~~~~~~~~~~~~~
// Collectives are matched by issue order: the k-th collective one rank issues meets the k-th of
// every other rank. Gradients, though, become ready in whatever order this rank's autograd engine
// runs the graph, and that order can differ between ranks (rank-dependent control flow, branches
// built in a different order, devices with their own autograd threads). So:
//   1. Buckets are numbered once, identically on every rank: assign_buckets() on models that
//      check_same_model() found identical, and after the rebuild from rank 0's observed order,
//      broadcast to all.
//   2. Bucket k is launched only after buckets 0..k-1 were: one that becomes ready early waits
//      in launch_ready_buckets() until those before it are launched.
//   3. At the end of a synchronised backward, every parameter whose gradient never came is
//      completed from what its .grad() holds (zero when undefined), so every bucket is launched,
//      in order, on every rank; then one small all-reduce of per-parameter flags, then the
//      buffer broadcast. Every rank thus issues the same collectives in the same order in every
//      synchronised backward, including one that ends in an error, and no rank is left waiting.

// Note [Join]
// ~~~~~~~~~~~
// Uneven inputs: a rank that runs out of batches while others still train must keep taking part in
// their collectives, or they wait forever (ddp::Join, join.hpp; PyTorch's DDP join() does the same).
// In join mode every synchronised backward of a rank still training begins (in its first gradient
// hook, before any bucket) with an all-gather of one entry per rank: 1 from it (and a stop code: Note
// [Stop in a Join]). A joined rank, in shadow_step(), issues the same all-gather with 0; if no rank
// sent 1, every rank is done (the
// others are in shadow_step() too) and it stops. Otherwise it runs the rest of that backward's
// sequence (Note [Bucket order], point 3) with zero gradients: every bucket through the comm hook,
// in order, the flags all-reduce, the buffer broadcast, and the one-time rebuild. So:
//   - the sum over ranks holds only the training ranks' gradients; the default hooks divide it by
//     the world size (each sample weighs the same whichever rank it came from, PyTorch's default),
//     or, with divide_by_initial_world_size false, the result is scaled by world / active to be the
//     mean over the ranks that took part;
//   - the "every parameter got a gradient" check counts the training ranks only;
//   - buffers are broadcast from the lowest training rank, not from rank 0 (a joined rank 0 runs no
//     forward, so its buffers go stale); while rank 0 trains this is rank 0, so join mode with even
//     inputs gives bitwise the run without it;
//   - a joined rank's .grad()s receive the reduced gradients, so it can take the same optimizer step
//     (Join::finish's shadow step), which a ZeroRedundancyOptimizer needs: its step is collective;
//   - GradBucket::iteration advances on joined ranks too (PowerSGD's warm-up depends on it).
// Every rank records which ranks took part; the last such step names the rank whose model Join
// broadcasts at the end. Cost: one all-gather of 2 x world_size ints per step, only in join mode.
// JoinOptions that differ between ranks show in the gathered entries, alike on every rank. Each rank
// still runs the step's collectives (a training rank has launched buckets already, a joined rank
// launches its zeros), and then every rank raises the same error (join_error_), which every later
// step of this Join raises at once, without a collective. Raised right after the all-gather, the
// joined rank would leave the training ranks' buckets unmatched.
//
// Note [Stop in a Join]: a custom loop on uneven inputs cannot add a collective of its own to each
// step to agree on a stop (a joined rank runs no loop), but the join all-gather already reaches every
// rank, training or joined, once per step. So each entry is a pair: (still training, stop code), the
// code from JoinOptions::stop_code, asked on this rank right before the all-gather (a training rank:
// in its first gradient hook, on autograd's thread; a joined rank: in shadow_step). After the step's
// backward every rank has read the same codes, so a loop that breaks when Join::stop_requested()
// says so leaves after the same step on every rank, and finish() then ends at once (no rank trains
// any more). A stop costs nothing extra per step.

// Note [Gradient views]
// ~~~~~~~~~~~~~~~~~~~~~
// With gradient_as_bucket_view each parameter's .grad() aliases its slice of the bucket buffer,
// so AccumulateGrad sums straight into the buffer (no copy in) and the all-reduce result is the
// gradient (no copy out). Two things break the alias and are repaired in the gradient hook by one
// copy into the slice: the first backward (the gradient is undefined and AccumulateGrad installs a
// fresh tensor) and a gradient reset to undefined (zero_grad with set_to_none, LibTorch 2.x's
// default); create_graph also makes AccumulateGrad replace the tensor instead of adding in place.
// The alias is made with set_() rather than narrow().view(): LibTorch 1.13's Optimizer::zero_grad
// calls detach_() on every gradient, which autograd refuses for views ("Can't detach views
// in-place").
// In a synchronised backward the copy waits until the bucket is full, and when every gradient of the
// bucket needs one (zero_grad with set_to_none, LibTorch 2.x's default, resets them all each step)
// it is one at::cat into the buffer instead of a copy per parameter: for ResNet-18, about 3 kernels
// a step instead of 62. The fresh tensors live until then: at most one bucket's worth of memory.

// Note [Gradient layout]
// ~~~~~~~~~~~~~~~~~~~~~~
// A parameter's slice of the bucket has the parameter's strides, not only its shape, when the
// parameter is dense and non-overlapping (a channels_last convolution weight is: the slice then
// holds the gradient in NHWC order). AccumulateGrad makes a fresh gradient in its parameter's layout
// and sums into an existing one in place, so the gradient keeps aliasing its slice, the optimizer's
// foreach kernels see matching layouts, and a bucket of fresh gradients is still filled by one
// at::cat of their memory (same_layout, flat_in_memory_order). A contiguous slice under a
// channels_last parameter would be correct too, but every step would copy each fresh gradient in one
// by one and every in-place sum would be strided. (PyTorch's DDP lays its bucket views out the same
// way.) A parameter with gaps or overlaps in its strides gets a contiguous slice.

namespace {

at::Tensor alias(const at::Tensor& buffer, std::int64_t offset, const at::Tensor& parameter) {
  const at::IntArrayRef shape = parameter.sizes();
  std::vector<std::int64_t> strides;
  if (parameter.is_non_overlapping_and_dense()) {
    strides = parameter.strides().vec();
  } else {
    strides.assign(shape.size(), 1);
    for (std::size_t d = shape.size(); d-- > 1;) strides[d - 1] = strides[d] * std::max<std::int64_t>(shape[d], 1);
  }
  return at::empty({0}, buffer.options()).set_(buffer.storage(), buffer.storage_offset() + offset, shape, strides);
}

// Whether `a` and `b` put their elements in the same order in memory (strides of size-1 dimensions
// do not matter), both without gaps or overlaps.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || !a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return false;
  for (std::int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// A dense, non-overlapping tensor's elements in memory order, as a 1-D view (view(-1) when contiguous).
at::Tensor flat_in_memory_order(const at::Tensor& t) { return t.as_strided({t.numel()}, {1}); }

bool same_alias(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() && b.defined() && a.is_alias_of(b) && a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

double seconds(comm::Clock::time_point from, comm::Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace

// Kept out of the public header: the accumulators' pointer type differs between LibTorch versions
// (core/autograd_compat.hpp).
// Shared by one reducer's hooks (Note [One reducer per parameter]).
struct HookState {
  std::atomic<bool> active{true};  // false once a newer reducer took the parameters over
  std::mutex mutex;
  std::weak_ptr<HookState> successor;  // that newer reducer's; expires when it is destroyed
  std::string superseded_on;           // the first parameter it took over
  std::vector<char> taken_over;        // by parameter index: a newer reducer hooks it
  std::string superseded_on_locked() {
    std::lock_guard<std::mutex> lock(mutex);
    return superseded_on;
  }
  // An inactive hook's gradient: nothing while the successor lives and hooks this parameter too (it
  // reduces it); otherwise nothing does, so the backward fails here rather than leaving gradients local.
  void check_successor_alive(int rank, std::size_t index, const std::string& name) {
    std::lock_guard<std::mutex> lock(mutex);
    LOCKSTEP_CHECK(!successor.expired(), "DataParallel: this DataParallel was superseded by a newer one built on the "
                   "same parameters (parameter '", superseded_on, "', ...), which has been destroyed since: nothing "
                   "averages these gradients now (rank ", rank, "). Build a new DataParallel (Note [One reducer per "
                   "parameter]).");
    LOCKSTEP_CHECK(taken_over[index] != 0, "DataParallel: parameter '", name,
                   "' belongs to a DataParallel that a newer one, built on part of the same parameters (parameter '",
                   superseded_on, "', ...), superseded; the newer one does not hold this parameter, so nothing "
                   "averages its gradient now and the ranks' models would part (rank ", rank, "). Build the newer "
                   "DataParallel over every parameter that trains, or let the older one go first (Note [One "
                   "reducer per parameter]).");
  }
};

struct Reducer::GradientHooks {
  std::vector<compat::NodePtr> accumulators;
  std::vector<std::uintptr_t> keys;
  std::shared_ptr<HookState> state = std::make_shared<HookState>();
};

namespace {

// Note [One reducer per parameter]: a second DataParallel on the same model while the first is alive
// (a DistributedTrainer per training stage in one scope; a new DataParallel after unfreezing) would
// put a second hook on every gradient accumulator. Both would fire each backward: the second copies
// a gradient the first has already divided by the world size (or averaged, by timing) and divides it
// again, and .grad() ends up anywhere between avg / world and avg, the same on every rank, so nothing
// would flag it. So a hook knows its reducer: the newest reducer on a parameter turns the older ones'
// hooks off, and the older reducer, superseded, refuses to be used again (check_hooks_attached) instead
// of leaving gradients local. This follows SyncBatchNorm's attachment, where the newest DataParallel's
// layers stay attached too.
using PostHookFn = std::function<torch::autograd::variable_list(const torch::autograd::variable_list&,
                                                                const torch::autograd::variable_list&)>;
class ReducerHook final : public torch::autograd::utils::LambdaPostHook {
 public:
  ReducerHook(std::shared_ptr<HookState> state, std::size_t index, PostHookFn fn)
      : LambdaPostHook(std::move(fn)), state_(std::move(state)), index_(index) {}
  // Turns off every hook of the reducer this one belongs to (they share the state) in favour of
  // `successor`'s. An older reducer superseded before is pointed at the newest one too, so that it
  // stays quiet while any reducer after it lives. Only the parameters whose hooks the newest one
  // passed are known to be its: one over part of the model leaves the others' gradients unreduced,
  // which their hooks then refuse (check_successor_alive).
  void supersede(const std::shared_ptr<HookState>& successor, const std::string& parameter) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    if (state_->superseded_on.empty()) state_->superseded_on = parameter;
    if (state_->successor.lock() != successor) {  // a newer successor: what the last one held no longer counts
      std::fill(state_->taken_over.begin(), state_->taken_over.end(), 0);
      state_->successor = successor;
    }
    state_->taken_over[index_] = 1;
    state_->active.store(false);
  }

 private:
  std::shared_ptr<HookState> state_;
  std::size_t index_;
};

}  // namespace

Reducer::Reducer(std::vector<at::Tensor> parameters, std::vector<std::string> names, comm::CommunicatorPtr comm,
                 ReducerOptions options)
    : params_(std::move(parameters)), names_(std::move(names)), comm_(std::move(comm)), options_(std::move(options)) {
  LOCKSTEP_CHECK(comm_ != nullptr, "Reducer needs a communicator");
  LOCKSTEP_CHECK(params_.size() == names_.size(), "Reducer: ", params_.size(), " parameters but ", names_.size(),
                 " names");
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    LOCKSTEP_CHECK(p.defined() && p.requires_grad() && p.is_leaf(), "Reducer: parameter '", names_[i],
                   "' must be a defined leaf tensor that requires grad");
    LOCKSTEP_CHECK(p.layout() == at::kStrided, "Reducer: parameter '", names_[i], "' has layout ", p.layout(),
                   "; only dense (strided) parameters can be bucketed");
  }
  if (!options_.comm_hook) options_.comm_hook = allreduce_hook();
  ready_.assign(params_.size(), 0);
  used_since_sync_.assign(params_.size(), 0);
  newly_used_.reserve(params_.size());
  build_buckets(assign_buckets(params_, reverse_order(params_.size()), options_.first_bucket_cap_bytes,
                               options_.bucket_cap_bytes));

  hooks_ = std::make_unique<GradientHooks>();
  hooks_->state->taken_over.assign(params_.size(), 0);  // before any hook exists to read it
  for (std::size_t i = 0; i < params_.size(); ++i) {
    // The tensor holds its accumulator only weakly: keep it, or the hook dies with it.
    compat::NodePtr accumulator = torch::autograd::impl::grad_accumulator(params_[i]);
    LOCKSTEP_CHECK(static_cast<bool>(accumulator), "Reducer: parameter '", names_[i], "' has no gradient accumulator");
    // Note [One reducer per parameter]: an older reducer's hook here stops, and so does that reducer.
    for (const auto& hook : accumulator->post_hooks()) {
      if (auto* older = dynamic_cast<ReducerHook*>(hook.get())) older->supersede(hooks_->state, names_[i]);
    }
    const std::shared_ptr<HookState> state = hooks_->state;
    const int rank = comm_->rank();
    hooks_->keys.push_back(accumulator->add_post_hook(std::make_unique<ReducerHook>(
        state, i,
        [this, i, state, rank](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          if (state->active.load()) {
            on_gradient_ready(i);
          } else {
            state->check_successor_alive(rank, i, names_[i]);
          }
          return outputs;
        })));
    hooks_->accumulators.push_back(std::move(accumulator));
  }
}



Reducer::~Reducer() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!hooks_) return;
  for (std::size_t i = 0; i < hooks_->accumulators.size(); ++i) {
    hooks_->accumulators[i]->del_post_hook(hooks_->keys[i]);
  }
}

// Built aside and swapped in whole: an allocation that fails partway (out of memory on one rank) leaves
// the buckets and slots as they were, not a mix of two layouts.
void Reducer::build_buckets(const BucketAssignment& assignment) {
  torch::autograd::AutoGradMode no_grad(false);
  std::vector<Bucket> buckets(assignment.size());
  std::vector<Slot> slots(params_.size(), Slot{});
  for (std::size_t b = 0; b < assignment.size(); ++b) {
    Bucket& bucket = buckets[b];
    bucket.params = assignment[b];
    std::int64_t total = 0;
    for (std::size_t i : bucket.params) total += params_[i].numel();
    const at::Tensor& first = params_[bucket.params.front()];
    bucket.grad.buffer = at::zeros({total}, at::TensorOptions().dtype(first.scalar_type()).device(first.device()));
    bucket.grad.index = b;
    bucket.grad.count = assignment.size();
    std::int64_t offset = 0;
    for (std::size_t k = 0; k < bucket.params.size(); ++k) {
      const std::size_t i = bucket.params[k];
      bucket.views.push_back(alias(bucket.grad.buffer, offset, params_[i]));  // Note [Gradient layout]
      bucket.grad.parameter_names.push_back(names_[i]);
      bucket.grad.offsets.push_back(offset);
      bucket.grad.numels.push_back(params_[i].numel());
      bucket.grad.sizes.push_back(params_[i].sizes().vec());
      slots[i] = Slot{b, k};
      offset += params_[i].numel();
    }
  }
  buckets_ = std::move(buckets);
  slots_ = std::move(slots);
}

const at::Tensor& Reducer::view_of(std::size_t index) const {
  const Slot& slot = slots_[index];
  return buckets_[slot.bucket].views[slot.position];
}

void Reducer::set_sync(bool sync) {
  std::lock_guard<std::mutex> lock(mutex_);
  sync_ = sync;
}

bool Reducer::sync() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return sync_;
}

void Reducer::set_broadcast_tensors(std::vector<at::Tensor> tensors) {
  std::lock_guard<std::mutex> lock(mutex_);
  broadcast_tensors_ = std::move(tensors);
}

void Reducer::mark_forward_start() {
  std::lock_guard<std::mutex> lock(mutex_);
  forward_start_ = comm::Clock::now();
}

void Reducer::mark_backward_start() {
  std::lock_guard<std::mutex> lock(mutex_);
  backward_start_ = comm::Clock::now();
}

void Reducer::set_timeline(std::shared_ptr<Timeline> timeline) {
  std::lock_guard<std::mutex> lock(mutex_);
  timeline_ = std::move(timeline);
}

BucketAssignment Reducer::bucket_assignment() const {
  std::lock_guard<std::mutex> lock(mutex_);
  BucketAssignment assignment;
  for (const auto& bucket : buckets_) assignment.push_back(bucket.params);
  return assignment;
}

// ---- during backward ----

void Reducer::on_gradient_ready(std::size_t index) {
  std::lock_guard<std::mutex> lock(mutex_);
  torch::autograd::AutoGradMode no_grad(false);
  settle_abandoned_backward();
  if (!in_backward_) {
    if (sync_) check_can_synchronize();
    check_hooks_attached_locked();
    begin_backward();
  }
  const at::Tensor& grad = params_[index].grad();
  LOCKSTEP_CHECK(!grad.defined() || grad.layout() == at::kStrided, "DataParallel: parameter '", names_[index],
                 "' received a ", grad.layout(), " gradient; only dense gradients can be bucketed (rank ",
                 comm_->rank(), ")");
  const at::Tensor& view = view_of(index);
  LOCKSTEP_CHECK(params_[index].scalar_type() == view.scalar_type() && params_[index].device() == view.device(),
                 "DataParallel: parameter '", names_[index], "' is now ", params_[index].scalar_type(), " on ",
                 params_[index].device(), " but was ", view.scalar_type(), " on ", view.device(),
                 " when DataParallel was built; move the model (to(), half()) before constructing DataParallel");
  if (!used_since_sync_[index]) {
    used_since_sync_[index] = 1;
    newly_used_.push_back(index);
  }
  if (!syncing_) {
    if (options_.gradient_as_bucket_view && grad.defined()) adopt_gradient(index);
    return;
  }
  LOCKSTEP_CHECK(!ready_[index], "DataParallel: parameter '", names_[index], "' received a gradient twice before ",
                 "its reduction finished (rank ", comm_->rank(), "). Either an earlier backward failed partway ",
                 "through, so its reduction never ran and the ranks are out of step, or backward ran twice in one ",
                 "step: wrap all but the last backward of a step in no_sync().");
  ready_[index] = 1;
  ready_order_.push_back(index);
  if (!grad.defined()) {
    view.zero_();
  } else if (!options_.gradient_as_bucket_view) {
    view.copy_(grad);
  } else if (!same_alias(grad, view)) {
    const Slot& slot = slots_[index];
    buckets_[slot.bucket].fresh.push_back(slot.position);  // Note [Gradient views]: copied when full
  }
  mark_ready(index);
}

void Reducer::begin_backward() {
  in_backward_ = true;
  syncing_ = sync_;
  ++backward_count_;
  newly_used_.clear();
  if (backward_start_ == comm::Clock::time_point{}) backward_start_ = comm::Clock::now();
  if (syncing_) {
    prepare_sync();
    if (join_) {
      // Note [Join]: before any bucket, "this rank still trains".
      join_flags_ = at::empty({2 * comm_->size()}, at::kInt);
      join_work_ = comm_->allgather(join_entry(/*training=*/true), join_flags_);
    }
  }
  // Runs when this autograd pass ends, after every gradient hook (called here, from inside a
  // hook, so that it attaches to the running pass). The pass owns the callback, and with it `alive`
  // (Note [Abandoned backward]).
  auto alive = std::make_shared<char>(0);
  pass_alive_ = alive;
  torch::autograd::Engine::get_default_engine().queue_callback([this, alive] { finish_backward(); });
}

// Note [Abandoned backward]
// ~~~~~~~~~~~~~~~~~~~~~~~~~
// A backward begins at its first gradient hook and ends in the callback queued on the autograd pass
// (finish_backward). When the pass fails partway through (an exception in a custom autograd function,
// an out-of-memory error, a check in a hook), LibTorch drops its queued callbacks without running
// them, so the reducer would stay "in backward" for good: a failed no_sync() backward left every later
// backward local-only, silently (ranks training on their own data), and a failed synchronised one made
// every later backward raise "received a gradient twice". The callback therefore owns a token whose
// weak_ptr (pass_alive_) expires when the failed pass is destroyed; the next backward's first hook,
// or the next Join call, finds in_backward_ set with the token gone and ends the abandoned backward:
//   - nothing issued on this rank (a no_sync() backward, or a synchronised one that failed before its
//     first bucket and Join all-gather): the next backward starts afresh, as after a success, and the
//     parameters only the failed pass used count as unused again (find_unused_parameters). A loop
//     that catches the failure and retries the step (a smaller batch after an out-of-memory error,
//     say) works, provided every rank retries: the others' collectives match the retry's;
//   - collectives already issued: other ranks cannot tell which of them belong to the failed step, so
//     the reducer refuses every later synchronised backward with an error naming the cause
//     (out_of_step_), instead of pairing one step's buckets with another's.
// On a GPU an autograd device thread may hold the failed pass a moment longer; a retry that reaches
// its first hook within that moment is not recognised (LibTorch 1.13 has no graph task id to compare).
void Reducer::settle_abandoned_backward() {
  if (!in_backward_ || !pass_alive_.expired() || shadowing_) return;
  const bool issued = syncing_ && issued_this_pass();
  if (issued && out_of_step_.empty()) {
    out_of_step_ = detail::str_cat(
        "DataParallel: an earlier synchronised backward failed partway through on rank ", comm_->rank(),
        " after issuing ", next_launch_, " of ", buckets_.size(), " bucket reductions",
        join_work_ ? " and its Join all-gather" : "",
        options_.launch_at_end ? " (and perhaps SyncBatchNorm's all-gathers)" : "",
        "; the ranks' collectives can no longer be matched, so this rank cannot synchronise again. Restart from "
        "the last checkpoint. (A failure inside backward can be caught and the step retried only if it happens "
        "before the first bucket is reduced, or under no_sync().)");
  }
  end_failed_pass(issued);
  reset_iteration();
}

// With launch_at_end the buckets wait for the end of backward, but SyncBatchNorm's all-gathers may
// have been issued (Note [SyncBatchNorm among the buckets]): counted as issued.
bool Reducer::issued_this_pass() const {
  return next_launch_ > 0 || join_work_ != nullptr || options_.launch_at_end;
}

// What a failed pass leaves besides out_of_step_: nothing issued, the retry starts from the flags of
// the backwards before this one.
void Reducer::end_failed_pass(bool issued) {
  if (!issued) {
    for (std::size_t i : newly_used_) used_since_sync_[i] = 0;
  }
  join_work_.reset();
}

// What makes every later synchronised step refuse to start: this rank's collectives out of step with
// the others' (Note [Abandoned backward]), or a Join whose options differ between ranks (Note [Join]).
void Reducer::check_can_synchronize() const {
  LOCKSTEP_CHECK(out_of_step_.empty(), out_of_step_);
  LOCKSTEP_CHECK(join_error_.empty(), join_error_);
}

void Reducer::check_hooks_attached() const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_hooks_attached_locked();
}

void Reducer::set_frozen(std::vector<at::Tensor> parameters, std::vector<std::string> names) {
  std::lock_guard<std::mutex> lock(mutex_);
  frozen_ = std::move(parameters);
  frozen_names_ = std::move(names);
}

void Reducer::check_hooks_attached_locked() const {
  const std::string superseded_on = hooks_ ? hooks_->state->superseded_on_locked() : std::string();
  LOCKSTEP_CHECK(superseded_on.empty(), "DataParallel: a newer DataParallel (or DistributedTrainer) was built on "
                 "the same parameters (parameter '", superseded_on, "', ...) while this one was alive, and their "
                 "gradients now go to it: this one no longer averages them (rank ", comm_->rank(), "). Use the newer "
                 "one, or let this one go out of scope before building another (Note [One reducer per parameter]).");
  for (std::size_t i = 0; i < frozen_.size(); ++i) {
    LOCKSTEP_CHECK(!frozen_[i].requires_grad(), "DataParallel: parameter '", frozen_names_[i],
                   "' was frozen (requires_grad false) when DataParallel was built and requires grad now: "
                   "DataParallel has no hook on it, so its gradients would stay local to each rank and the "
                   "replicas drift apart (rank ", comm_->rank(), "). Build DataParallel with it trainable (and "
                   "find_unused_parameters while it is frozen), or build a new DataParallel after unfreezing.");
  }
  if (!hooks_) return;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    // A parameter frozen since (requires_grad off) has no accumulator; it counts as unused.
    if (!params_[i].requires_grad() || !params_[i].is_leaf()) continue;
    // Creates the accumulator if the tensor has none: what the next backward would do anyway.
    const compat::NodePtr current = torch::autograd::impl::grad_accumulator(params_[i]);
    if (current.get() == hooks_->accumulators[i].get()) continue;
    const at::Tensor& view = view_of(i);
    LOCKSTEP_FAIL("DataParallel: parameter '", names_[i], "' was moved or cast after DataParallel was built (it is ",
                  params_[i].scalar_type(), " on ", params_[i].device(), ", built as ", view.scalar_type(), " on ",
                  view.device(), "): LibTorch gave it a new gradient accumulator, so its gradients would no longer "
                  "be averaged over ranks (rank ", comm_->rank(), "). Move the model (to(), half()) before "
                  "constructing DataParallel.");
  }
}

void Reducer::set_sync_count(std::uint64_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  settle_abandoned_backward();
  LOCKSTEP_CHECK(!in_backward_, "Reducer::set_sync_count: called during a backward pass");
  sync_count_ = count;
}

// A synchronised backward starts: no parameter ready, no bucket launched.
void Reducer::prepare_sync() {
  std::fill(ready_.begin(), ready_.end(), 0);
  ready_order_.clear();
  bucket_ready_order_.clear();
  launch_order_.clear();
  next_launch_ = 0;
  for (auto& bucket : buckets_) {
    bucket.pending = bucket.params.size();
    bucket.fresh.clear();
    bucket.work.reset();
    bucket.grad.iteration = sync_count_;
  }
}

void Reducer::adopt_gradient(std::size_t index) {
  // Note [Gradient views]
  at::Tensor& grad = params_[index].mutable_grad();
  const at::Tensor& view = view_of(index);
  if (same_alias(grad, view)) return;
  view.copy_(grad);
  grad = view;
}

// Note [Gradient views]: the bucket is full; its fresh gradients move into the buffer.
void Reducer::adopt_fresh(Bucket& bucket) {
  if (bucket.fresh.empty()) return;
  at::Tensor& buffer = bucket.grad.buffer;
  bool at_once = bucket.fresh.size() == bucket.params.size();
  std::vector<at::Tensor> parts;
  if (at_once) {
    parts.reserve(bucket.params.size());
    for (std::size_t k = 0; k < bucket.params.size(); ++k) {  // buffer order
      const at::Tensor& grad = params_[bucket.params[k]].grad();
      if (!same_layout(grad, bucket.views[k]) || grad.scalar_type() != buffer.scalar_type() ||
          grad.device() != buffer.device() || grad.is_alias_of(buffer)) {
        at_once = false;
        break;
      }
      parts.push_back(flat_in_memory_order(grad));  // Note [Gradient layout]
    }
  }
  if (at_once) {
    at::cat_out(buffer, parts);
    for (std::size_t k : bucket.fresh) params_[bucket.params[k]].mutable_grad() = bucket.views[k];
  } else {
    for (std::size_t k : bucket.fresh) adopt_gradient(bucket.params[k]);
  }
  bucket.fresh.clear();
}

void Reducer::mark_ready(std::size_t index) {
  const std::size_t b = slots_[index].bucket;
  if (--buckets_[b].pending == 0) {
    adopt_fresh(buckets_[b]);
    bucket_ready_order_.push_back(b);
    launch_ready_buckets(/*end_of_backward=*/false);
  }
}

void Reducer::launch_ready_buckets(bool end_of_backward) {
  if (options_.launch_at_end && !end_of_backward) return;
  // Note [Bucket order]: strictly in index order, whatever order the buckets became ready in.
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    Bucket& bucket = buckets_[next_launch_];
    bucket.work = options_.comm_hook(*comm_, bucket.grad);
    LOCKSTEP_CHECK(bucket.work != nullptr, "DataParallel: the communication hook returned no Work for bucket ",
                   next_launch_, " (rank ", comm_->rank(), ")");
    launch_order_.push_back(next_launch_);
    ++next_launch_;
  }
}

void Reducer::contribute_unready(std::size_t index) {
  // Note [Bucket order], point 3: a gradient that never came still fills its slot.
  const at::Tensor& grad = params_[index].grad();
  const at::Tensor& view = view_of(index);
  if (!grad.defined()) {
    view.zero_();
  } else if (options_.gradient_as_bucket_view) {
    adopt_gradient(index);
  } else {
    view.copy_(grad);
  }
  mark_ready(index);
}

// ---- at the end of backward ----

void Reducer::finish_backward() {
  std::lock_guard<std::mutex> lock(mutex_);
  torch::autograd::AutoGradMode no_grad(false);
  const comm::Clock::time_point backward_end = comm::Clock::now();
  // Whatever happens below, the next backward starts afresh.
  struct ResetOnExit {
    Reducer* reducer;
    ~ResetOnExit() { reducer->reset_iteration(); }
  } reset{this};

  StepTimings timings;
  timings.backward_index = backward_count_ - 1;
  timings.synchronized = syncing_;
  if (forward_start_ != comm::Clock::time_point{} && forward_start_ < backward_start_) {
    timings.forward_s = seconds(forward_start_, backward_start_);
  }
  timings.backward_s = seconds(backward_start_, backward_end);
  if (timeline_) {
    if (timings.forward_s > 0)
      timeline_->add({"forward", Timeline::Track::Compute, forward_start_, backward_start_, {}});
    timeline_->add({syncing_ ? "backward" : "backward (no_sync)",
                    Timeline::Track::Compute,
                    backward_start_,
                    backward_end,
                    {{"backward_index", static_cast<double>(timings.backward_index)}}});
  }
  if (!syncing_) {
    last_timings_ = timings;
    return;
  }

  try {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (!ready_[i]) contribute_unready(i);
    }
    launch_ready_buckets(/*end_of_backward=*/true);
  } catch (const std::exception& e) {
    // Note [Abandoned backward], for the end of the pass: the buckets launched here (those holding an
    // unused parameter; all of them under launch_at_end) go through the comm hook, which may fail (out
    // of memory compressing one, a user hook's own check), on one rank alone. ResetOnExit ends the
    // pass, so settle_abandoned_backward never sees it: the same rule is applied here, or a retry
    // would pair its collectives with the peers' stale ones.
    const bool issued = issued_this_pass();
    if (issued) note_failed_launch(e, "at the end of its backward pass");
    end_failed_pass(issued);
    throw;
  }
  LOCKSTEP_CHECK(next_launch_ == buckets_.size(), "DataParallel internal error: ", next_launch_, " of ",
                 buckets_.size(), " buckets launched at the end of backward (rank ", comm_->rank(), ")");
  std::vector<int> active;  // Note [Join]: the ranks training in this step
  if (join_work_) {
    comm::WorkPtr work = std::move(join_work_);
    try {
      work->wait();
    } catch (const std::exception& e) {
      note_out_of_step(e, "its Join all-gather");
      throw;
    }
    active = read_join_flags(join_flags_);
  }
  synchronize(timings, backward_end, std::move(active));
}

at::Tensor Reducer::join_entry(bool training) const {
  const std::int32_t code = join_options_.stop_code ? join_options_.stop_code() : 0;  // Note [Stop in a Join]
  at::Tensor entry = at::empty({2}, at::kInt);
  // Bit 0: this rank trains in this step. Bits 1 and 2: its JoinOptions that change the step's result
  // or its collectives, which every rank must share (read_join_flags compares them).
  entry.data_ptr<std::int32_t>()[0] = (training ? 1 : 0) | (join_options_.divide_by_initial_world_size ? 2 : 0) |
                                      (join_options_.throw_on_early_termination ? 4 : 0);
  entry.data_ptr<std::int32_t>()[1] = code;
  return entry;
}

std::vector<int> Reducer::read_join_flags(const at::Tensor& flags) {
  std::vector<int> active;
  const auto* entry = flags.data_ptr<std::int32_t>();
  // The same flags on every rank: every rank records this, and raises it after the step's collectives
  // (Note [Join]). With another divisor the ranks' gradients differ; with another early-termination
  // choice some would raise while the others trained on.
  for (const auto& [bit, option] : {std::pair<int, const char*>{2, "divide_by_initial_world_size"},
                                    std::pair<int, const char*>{4, "throw_on_early_termination"}}) {
    for (int r = 1; r < comm_->size() && join_error_.empty(); ++r) {
      const bool first = (entry[0] & bit) != 0, here = (entry[2 * r] & bit) != 0;
      if (first == here) continue;
      join_error_ = detail::str_cat("Join: the ranks' JoinOptions differ: ", option, " is ", first ? "true" : "false",
                                    " on rank 0 and ", here ? "true" : "false", " on rank ", r, " (this is rank ",
                                    comm_->rank(), "). Every rank must build its Join with the same options.");
    }
  }
  for (int r = 0; r < comm_->size(); ++r) {
    if ((entry[2 * r] & 1) != 0) active.push_back(r);
    std::int32_t& code = join_stop_codes_[static_cast<std::size_t>(r)];
    if (code == 0) code = entry[2 * r + 1];
  }
  return active;
}

// Every bucket has been launched (by this rank's gradients, or with zeros in shadow_step): the
// rest of a synchronised backward, the same on every rank (Note [Bucket order], point 3).
// `active`: in join mode, the ranks training in this step; empty otherwise.
void Reducer::synchronize(StepTimings& timings, comm::Clock::time_point backward_end, std::vector<int> active) {
  const std::size_t n = params_.size();
  const int size = comm_->size();
  if (join_) last_active_ = active;
  // Note [Join]: buffers follow the lowest rank that trained in this step.
  const int root = active.empty() ? 0 : active.front();
  const int active_count = join_ ? static_cast<int>(active.size()) : size;

  // Flags per parameter: did it get a gradient in this backward, and in any backward since the last
  // synchronisation; in join mode (on every rank alike) also: does a rank that trained hold a .grad()
  // for it. Summed over ranks, they name unused parameters on every rank alike (and, in a shadow
  // step, what to leave them: write_back).
  const std::size_t sets = join_ ? 3 : 2;
  at::Tensor flags = at::empty({static_cast<std::int64_t>(sets * n)}, at::kInt);
  auto* flag = flags.data_ptr<std::int32_t>();
  for (std::size_t i = 0; i < n; ++i) {
    flag[i] = ready_[i];
    flag[n + i] = used_since_sync_[i];
    if (join_) flag[2 * n + i] = !shadowing_ && params_[i].grad().defined();
  }
  // At one rank this rank's flags are the sums: no collective (over NCCL it would be a host round trip
  // per step for nothing).
  comm::WorkPtr flags_work = size > 1 ? comm_->allreduce(flags) : nullptr;
  std::vector<comm::WorkPtr> broadcasts;
  if (!broadcast_tensors_.empty()) broadcasts = broadcast_coalesced(*comm_, broadcast_tensors_, root);

  // Strictly in bucket order, on every rank, and only here: a hook's continuation may issue a
  // collective of its own when it runs (Note [PowerSGD collective order]).
  try {
    for (auto& bucket : buckets_) bucket.work->wait();
    if (flags_work) flags_work->wait();
    for (auto& work : broadcasts) work->wait();
  } catch (const std::exception& e) {
    // Later buckets' continuations (which may issue collectives of their own: PowerSGD) and the flags
    // were not waited for on this rank alone, perhaps.
    note_out_of_step(e, "its reductions");
    throw;
  }
  const std::vector<std::int32_t> ready_counts(flag, flag + n);
  const std::vector<std::int32_t> used_counts(flag + n, flag + 2 * n);
  std::fill(used_since_sync_.begin(), used_since_sync_.end(), 0);
  ++sync_count_;
  LOCKSTEP_CHECK(join_error_.empty(), join_error_);  // Note [Join]: now that every collective is done
  if (join_ && join_options_.throw_on_early_termination && active_count < size) fail_uneven();
  if (!options_.find_unused_parameters) {
    for (std::size_t i = 0; i < n; ++i) {
      if (ready_counts[i] < active_count) fail_unready(ready_counts, used_counts, active_count);
    }
  }
  if (join_ && !join_options_.divide_by_initial_world_size && active_count < size) {
    // Note [Join]: the hooks divided by the world size; make it the mean over the ranks that trained.
    for (auto& bucket : buckets_) bucket.grad.buffer.mul_(static_cast<double>(size) / active_count);
  }
  // Past every collective of the step. A failure from here on (out of memory cloning a gradient, or
  // building the rebuilt buckets) leaves this rank's gradients or bucket layout unlike its peers', and
  // its next step would issue what they do not (the rebuild's broadcast a step late, buckets of another
  // layout): it synchronises no more (Note [Abandoned backward]). One that every rank meets alike (a
  // .grad() that cannot be written, installed on every rank) is refused as well: telling it from a
  // failure on one rank would take another collective.
  try {
    write_back(used_counts, shadowing_ ? flag + 2 * n : nullptr);
  } catch (const std::exception& e) {
    mark_out_of_step(e, "writing the reduced gradients back");
    throw;
  }
  const comm::Clock::time_point done = comm::Clock::now();

  timings.exposed_communication_s = seconds(backward_end, done);
  timings.bucket_count = buckets_.size();
  for (const auto& bucket : buckets_) {
    timings.communication_s += seconds(bucket.work->start_time(), bucket.work->end_time());
    timings.bucket_bytes += static_cast<std::int64_t>(bucket.grad.buffer.nbytes());
    if (timeline_) {
      timeline_->add({"allreduce bucket " + std::to_string(bucket.grad.index),
                      Timeline::Track::Communication,
                      bucket.work->start_time(),
                      bucket.work->end_time(),
                      {{"bytes", static_cast<double>(bucket.grad.buffer.nbytes())},
                       {"parameters", static_cast<double>(bucket.params.size())}}});
    }
  }
  if (timeline_) timeline_->add({"wait for reduction", Timeline::Track::Compute, backward_end, done, {}});
  // Done with: what a hook's Work holds (a 16-bit copy of the bucket, PowerSGD's factors) would
  // otherwise stay allocated through the next forward, until the next synchronised backward.
  for (auto& bucket : buckets_) bucket.work.reset();
  last_timings_ = timings;
  if (options_.rebuild_buckets && !rebuilt_) {
    try {
      rebuild_by_ready_order();
    } catch (const std::exception& e) {
      mark_out_of_step(e, "rebuilding the buckets in the order gradients arrived");  // kept if the broadcast set it
      throw;
    }
  }
}

// As after a backward that failed partway through (Note [Abandoned backward]): this rank's collectives
// can no longer be matched with the others'.
void Reducer::note_failed_launch(const std::exception& error, const char* where) {
  mark_out_of_step(error, detail::str_cat("launching bucket ", next_launch_, " of ", buckets_.size(), " ", where,
                                          ", after ", next_launch_, " had been issued"));
}

void Reducer::note_out_of_step(const std::exception& error, const char* waiting_for) {
  mark_out_of_step(error, detail::str_cat("waiting for ", waiting_for));
}

void Reducer::mark_out_of_step(const std::exception& error, const std::string& doing) {
  if (!out_of_step_.empty()) return;
  out_of_step_ = detail::str_cat("DataParallel: an earlier synchronised backward failed on rank ", comm_->rank(),
                                 " while ", doing, " (", detail::exception_text(error),
                                 "); the ranks' collectives can no longer be matched, so this rank cannot "
                                 "synchronise again. Restart from the last checkpoint.");
}

void Reducer::write_back(const std::vector<std::int32_t>& used_counts, const std::int32_t* held_counts) {
  for (auto& bucket : buckets_) {
    for (std::size_t k = 0; k < bucket.params.size(); ++k) {
      const std::size_t i = bucket.params[k];
      // A parameter no rank used keeps its .grad() as it was, as in a single process, so that an
      // optimizer skips an undefined gradient instead of decaying the weight.
      if (options_.find_unused_parameters && used_counts[i] == 0) {
        // Note [Join]: a joined rank's shadow step holds a zero .grad() here. Where no rank that trained
        // holds one (zero_grad with set_to_none, LibTorch 2.x's default), it drops its own too: its
        // optimizer would otherwise apply momentum and weight decay to the parameter while theirs skip it,
        // and the optimizer states would part (Join::finish re-broadcasts the parameters, not them).
        if (held_counts != nullptr && held_counts[i] == 0) params_[i].mutable_grad() = at::Tensor();
        continue;
      }
      at::Tensor& grad = params_[i].mutable_grad();
      if (options_.gradient_as_bucket_view) {
        if (!same_alias(grad, bucket.views[k])) grad = bucket.views[k];
      } else if (!grad.defined()) {
        grad = bucket.views[k].clone();
      } else {
        grad.copy_(bucket.views[k]);
      }
    }
  }
}

void Reducer::fail_unready(const std::vector<std::int32_t>& ready_counts,
                           const std::vector<std::int32_t>& used_counts, int size) {
  // `size`: the ranks that trained in this step (all of them, except under Join).
  std::ostringstream names;
  std::size_t listed = 0, missing = 0;
  bool missing_here = false;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (ready_counts[i] >= size) continue;
    ++missing;
    missing_here = missing_here || !ready_[i];
    if (listed < 8) {
      names << (listed ? ", " : "") << "'" << names_[i] << "' (on " << size - ready_counts[i] << " of " << size
            << " ranks)";
      ++listed;
    }
  }
  if (missing > listed) names << " and " << missing - listed << " more";
  // Frozen after DataParallel was built: the usual advice (set requires_grad(false)) is what was done.
  std::string frozen_since;
  for (std::size_t i = 0; i < params_.size() && frozen_since.empty(); ++i) {
    if (ready_counts[i] < size && !params_[i].requires_grad()) frozen_since = names_[i];
  }
  if (!frozen_since.empty()) {
    LOCKSTEP_FAIL("DataParallel: ", missing, " parameter(s) received no gradient in this backward: ", names.str(),
                  ". '", frozen_since, "' was frozen (requires_grad false) after DataParallel was built, which "
                  "still waits for its gradient: freeze parameters before constructing DataParallel, or construct "
                  "it with DataParallelOptions::find_unused_parameters = true (rank ", comm_->rank(),
                  "). Every rank raises this error; this step's gradients are incomplete: zero them before the next "
                  "step.");
  }
  const std::string here = shadowing_ ? std::string(" has joined (it ran out of inputs) and trains no more.")
                                     : std::string(missing_here ? " some of them" : " none of them") + " went without.";
  LOCKSTEP_FAIL("DataParallel: ", missing, " parameter(s) received no gradient in this backward: ", names.str(),
                ". On this rank (", comm_->rank(), ")", here,
                " Every parameter that requires grad must take part in the loss on every rank, or "
                "its bucket cannot be reduced. If the model has parameters that do not take part in every forward "
                "(optional branches, rank-dependent control flow), construct DataParallel with "
                "DataParallelOptions::find_unused_parameters = true; otherwise remove them or set "
                "requires_grad(false). Every rank raises this error; this step's gradients are incomplete: zero them before "
                "the next step.");
}

void Reducer::fail_uneven() const {
  std::ostringstream training, joined;
  for (int r = 0; r < comm_->size(); ++r) {
    const bool active = std::find(last_active_.begin(), last_active_.end(), r) != last_active_.end();
    std::ostringstream& list = active ? training : joined;
    list << (list.tellp() > 0 ? ", " : "") << r;
  }
  LOCKSTEP_FAIL("DataParallel: uneven inputs: rank(s) ", joined.str(), " ran out of inputs while rank(s) ",
                training.str(), " still had more, in synchronised backward ", sync_count_ - 1,
                " (Join with throw_on_early_termination; rank ", comm_->rank(), "). Every rank raises this error. Give "
                "every rank the same number of batches (e.g. data::ShardedSampler), or let Join shadow the missing "
                "steps (throw_on_early_termination = false).");
}

// ---- join mode (Note [Join]) ----

void Reducer::enable_join(const JoinOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  LOCKSTEP_CHECK(!join_, "DataParallel: a Join is already active on this model (rank ", comm_->rank(), ")");
  settle_abandoned_backward();
  LOCKSTEP_CHECK(!in_backward_, "DataParallel: a Join cannot begin during backward (rank ", comm_->rank(), ")");
  join_ = true;
  join_options_ = options;
  join_error_.clear();
  last_active_.clear();
  for (int r = 0; r < comm_->size(); ++r) last_active_.push_back(r);
  join_stop_codes_.assign(static_cast<std::size_t>(comm_->size()), 0);
}

void Reducer::disable_join() {
  std::lock_guard<std::mutex> lock(mutex_);
  join_ = false;
  join_error_.clear();  // set only in join mode
  join_work_.reset();
}

bool Reducer::shadow_step() {
  std::lock_guard<std::mutex> lock(mutex_);
  torch::autograd::AutoGradMode no_grad(false);
  LOCKSTEP_CHECK(join_, "DataParallel internal error: shadow_step outside join mode (rank ", comm_->rank(), ")");
  settle_abandoned_backward();
  LOCKSTEP_CHECK(!in_backward_, "DataParallel: Join::finish() cannot run during backward (rank ", comm_->rank(), ")");
  check_can_synchronize();
  // Note [Join]: "this rank trains no more"; the others' flags say whether a backward follows.
  at::Tensor flags = at::empty({2 * comm_->size()}, at::kInt);
  try {
    comm_->allgather(join_entry(/*training=*/false), flags)->wait();
  } catch (const std::exception& e) {
    note_out_of_step(e, "a Join all-gather");
    throw;
  }
  std::vector<int> active = read_join_flags(flags);
  if (active.empty()) {
    LOCKSTEP_CHECK(join_error_.empty(), join_error_);  // no collective follows
    return false;
  }

  struct ResetOnExit {
    Reducer* reducer;
    ~ResetOnExit() {
      reducer->shadowing_ = false;
      reducer->reset_iteration();
    }
  } reset{this};
  in_backward_ = true;
  syncing_ = true;
  shadowing_ = true;
  ++backward_count_;
  const comm::Clock::time_point start = comm::Clock::now();
  prepare_sync();
  std::fill(used_since_sync_.begin(), used_since_sync_.end(), 0);
  for (auto& bucket : buckets_) {  // every bucket ready at once, with no gradient of this rank's
    bucket.grad.buffer.zero_();
    bucket.pending = 0;
  }
  if (!options_.gradient_as_bucket_view) {
    // As the zeroed buffers do to gradients that are views of them: this rank's old gradients must
    // not stand in for this step's. write_back() overwrites the reduced ones; a parameter no rank used
    // keeps its .grad(), which here would be this rank's last step's average, applied again by the
    // shadow step's optimizer step while the ranks still training (after zero_grad()) apply zeros.
    at::NoGradGuard no_grad;
    for (auto& parameter : params_) {
      if (parameter.grad().defined()) parameter.mutable_grad().zero_();
    }
  }
  try {
    launch_ready_buckets(/*end_of_backward=*/true);
  } catch (const std::exception& e) {
    // The Join all-gather has completed and the training ranks issue every bucket: always out of step.
    note_failed_launch(e, "in a Join shadow step");
    throw;
  }
  StepTimings timings;
  timings.backward_index = backward_count_ - 1;
  timings.synchronized = true;
  if (timeline_) timeline_->add({"shadow step (joined)", Timeline::Track::Compute, start, start, {}});
  synchronize(timings, start, std::move(active));
  ++shadowed_steps_;
  return true;
}

void Reducer::rebuild_by_ready_order() {
  rebuilt_ = true;
  const std::size_t n = params_.size();
  // Note [Bucket order], point 1: rank 0's observed order, broadcast, decides for everyone.
  std::vector<char> placed(n, 0);
  at::Tensor order = at::empty({static_cast<std::int64_t>(n)}, at::kLong);
  auto* entry = order.data_ptr<std::int64_t>();
  std::size_t k = 0;
  for (std::size_t i : ready_order_) {
    entry[k++] = static_cast<std::int64_t>(i);
    placed[i] = 1;
  }
  for (std::size_t i : reverse_order(n)) {
    if (!placed[i]) entry[k++] = static_cast<std::int64_t>(i);
  }
  if (comm_->size() > 1) {
    try {
      comm_->broadcast(order, comm::BroadcastOptions{0})->wait();
    } catch (const std::exception& e) {
      note_out_of_step(e, "the rebuilt bucket order");
      throw;
    }
  }
  std::vector<std::size_t> agreed(entry, entry + n);
  rebuilt_order_.assign(entry, entry + n);
  adopt_order(agreed);
}

// Note [Bucket order across a resume]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The buckets are rebuilt once, after a process's first synchronised backward, in the order gradients
// arrived. A resumed run has a new Reducer: its first step ran on the initial layout (reverse
// registration order), where the run that never stopped used the rebuilt one. Where the two differ (a
// model whose layers are used in another order than registered: a head registered first, a residual
// branch), the gradients are summed in other messages and at other offsets, and the ring algorithms of
// MPI and NCCL add an element's values in an order that depends on its offset: the resumed run was not
// bitwise the uninterrupted one from its first step on. So the checkpoint keeps the agreed order, and
// the resumed run's Reducer is given it before its first step (set_rebuilt_order), and rebuilds nothing.
void Reducer::set_rebuilt_order(const std::vector<std::int64_t>& order) {
  std::lock_guard<std::mutex> lock(mutex_);
  settle_abandoned_backward();
  LOCKSTEP_CHECK(!in_backward_, "Reducer::set_rebuilt_order: called during a backward pass");
  const std::size_t n = params_.size();
  LOCKSTEP_CHECK(is_parameter_order(order, n), "Reducer::set_rebuilt_order: expected an order of the ", n,
                 " parameters (each index in [0, ", n, ") once), got ", order.size(), " entries that are not one");
  if (!options_.rebuild_buckets) return;
  adopt_order(std::vector<std::size_t>(order.begin(), order.end()));
  rebuilt_ = true;
  rebuilt_order_ = order;
}

void Reducer::adopt_order(const std::vector<std::size_t>& agreed) {
  const std::size_t n = params_.size();
  BucketAssignment assignment =
      assign_buckets(params_, agreed, options_.first_bucket_cap_bytes, options_.bucket_cap_bytes);
  BucketAssignment current;
  for (const auto& bucket : buckets_) current.push_back(bucket.params);
  if (assignment == current) return;

  std::vector<at::Tensor> grads(n);
  for (std::size_t i = 0; i < n; ++i) grads[i] = params_[i].grad();
  build_buckets(assignment);
  for (std::size_t i = 0; i < n; ++i) {
    if (!grads[i].defined()) continue;
    const at::Tensor& view = view_of(i);
    view.copy_(grads[i]);
    if (options_.gradient_as_bucket_view) params_[i].mutable_grad() = view;
  }
}

void Reducer::reset_iteration() {
  in_backward_ = false;
  syncing_ = false;
  forward_start_ = comm::Clock::time_point{};
  backward_start_ = comm::Clock::time_point{};
}

}  // namespace lockstep::ddp
